"""TartanAir adapter: depth files of the wrong kind are refused, naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_tartanair

from pipeline.clip import ClipError, ClipMeta
from stages.ingest import get_adapter


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.uint16, np.complex64])
def test_depth_that_is_not_floating_point_metres_is_refused(tmp_path, dtype):
    """TartanAir's depth is float32 metres. Integer, boolean or complex arrays were cast to float
    and, with the self-check off, reached the shard as depth of 0/1 or 1..5 m."""
    write_tartanair(tmp_path, n_scenes=1, frames=4)
    (npy,) = tmp_path.rglob("000001_left_depth.npy")
    np.save(npy, np.load(npy).astype(dtype))
    adapter = get_adapter("tartanair", str(tmp_path))
    (scene,) = adapter.discover()
    meta = ClipMeta("tartanair", scene.scene, "c", [0, 1, 2], dynamic=False, real=False)
    with pytest.raises(ClipError) as err:
        adapter.load_clip(scene, [0, 1, 2], meta)
    assert err.value.path.endswith("000001_left_depth.npy") and "floating-point" in err.value.reason


def test_a_path_leaving_the_root_is_bad_input_naming_it(tmp_path):
    """A path taken from a dataset's metadata that leaves its root is never read, and is bad input
    of the clip (permanent, with the path), not a bare PathEscapeError without a file."""
    from pipeline.failures import is_transient

    write_tartanair(tmp_path / "data", n_scenes=1, frames=4)
    (tmp_path / "secret.txt").write_text("not the dataset's")
    adapter = get_adapter("tartanair", str(tmp_path / "data"))
    for rel in ("../secret.txt", "/etc/hostname"):
        with pytest.raises(ClipError) as err:
            adapter.read(rel)
        assert repr(rel) in err.value.reason and "leaves the dataset root" in err.value.reason
        assert err.value.path == str(tmp_path / "data") and not is_transient(err.value)
