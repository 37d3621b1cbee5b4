"""Scratch folders in the shared temporary directory: MegaSaM's frames, outputs and logs, and Ray
Train's bookkeeping for an object-store workdir, went to fixed names (/tmp/d4s-megasam,
/tmp/d4s-ray-train) that any user of the node could create first (world-writable, or a link
elsewhere) and so read the logs or swap a run's frames and npz. Now per user, 0700, checked."""

from __future__ import annotations

import os
import stat
import sys
import tempfile

import pytest

from pipeline.private_tmp import UnsafeScratchError, private_temp_dir
from stages.align.megasam import MegaSaMRunner
from training.trainer import ray_storage_path

CMD = f"{sys.executable} -c pass {{out_npz}}"


@pytest.fixture()
def tmpdir_env(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_the_default_megasam_folder_is_this_users_and_private(tmpdir_env):
    r = MegaSaMRunner(CMD)
    assert r.work_dir == tmpdir_env / f"d4s-megasam-{os.getuid()}"
    assert stat.S_IMODE(os.stat(r.work_dir).st_mode) == 0o700
    assert r.log_path("re10k__a__0").parent.parent == r.work_dir


def test_a_world_writable_or_linked_scratch_folder_is_refused(tmpdir_env):
    planted = tmpdir_env / f"d4s-megasam-{os.getuid()}"
    planted.mkdir()
    os.chmod(planted, 0o777)
    with pytest.raises(UnsafeScratchError, match="may be written by other users"):
        MegaSaMRunner(CMD)
    planted.rmdir()
    elsewhere = tmpdir_env / "victim"
    elsewhere.mkdir()
    planted.symlink_to(elsewhere)
    with pytest.raises(UnsafeScratchError, match="symbolic link") as err:
        MegaSaMRunner(CMD)
    assert str(planted) in str(err.value)
    assert not list(elsewhere.iterdir())


def test_ray_trains_bookkeeping_for_an_object_store_workdir_is_private(tmpdir_env):
    p = ray_storage_path("s3://bucket/run")
    assert p.startswith(str(private_temp_dir("d4s-ray-train")))
    assert ray_storage_path("s3://bucket/other") != p
