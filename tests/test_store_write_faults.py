"""A write that the node cannot complete (a full disk or quota, a read-only output, a file size
limit): the error names the object being published (it said only "No space left on device"), it
counts as transient (resume redoes the work once the disk is fixed), and nothing partial stays."""

from __future__ import annotations

import errno
import os

import pytest

from pipeline.failures import is_transient
from pipeline.storage import Store


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG])
def test_a_write_the_disk_refuses_names_the_object_and_leaves_nothing(tmp_path, monkeypatch, code):
    store = Store(str(tmp_path / "out"))
    store.write_bytes_atomic("shards/a.tar", b"old")

    def refused(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refused)
    with pytest.raises(OSError) as err:
        store.write_bytes_atomic("shards/a.tar", b"new bytes")
    assert err.value.errno == code and is_transient(err.value)
    assert str(tmp_path / "out" / "shards" / "a.tar") in str(err.value)
    monkeypatch.undo()
    assert store.read_bytes("shards/a.tar") == b"old"
    assert os.listdir(tmp_path / "out" / "shards") == ["a.tar"]


def test_a_full_disk_in_the_writers_block_is_named_and_its_own_errors_are_not(tmp_path):
    """f.write in the block is where a full disk usually shows: named too. An error of the
    caller's own work that names its file (its input) passes through unchanged."""
    store = Store(str(tmp_path / "out"))
    mine = FileNotFoundError(errno.ENOENT, "No such file", "/data/frame.png")
    with pytest.raises(FileNotFoundError) as err:
        with store.atomic_writer("x.bin") as f:
            f.write(b"1")
            raise mine
    assert err.value is mine and not os.listdir(tmp_path / "out")

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        with store.atomic_writer("shards/b.tar") as f:
            FullFile(f).write(b"x")
    assert "shards/b.tar" in str(err.value) and err.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "out" / "shards") == []
