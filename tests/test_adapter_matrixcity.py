"""MatrixCity adapter: round trip through the fixture writer, and malformed inputs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import geometry as geo
from pipeline.clip import ClipError, ClipMeta
from pipeline.demo.render import render
from pipeline.demo.writers import matrixcity as writer
from stages.ingest import get_adapter

pytest.importorskip("OpenEXR")

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "samples" / "matrixcity"


@pytest.fixture(scope="module")
def rendered():
    return {i: render(writer.demo_spec(i, seed=5 + i)) for i in (0, 1)}


def _load(adapter, scene, frames=None):
    frames = list(range(scene.num_frames)) if frames is None else frames
    meta = ClipMeta("matrixcity", scene.scene, "c", frames, dynamic=False, real=False)
    return adapter.load_clip(scene, frames, meta)


def _check(clip, ws, sc, frames):
    assert np.abs(clip.c2w - ws.expected_c2w(sc.c2w[frames])).max() < 1e-5
    assert np.abs(clip.intrinsics - sc.intrinsics[frames]).max() < 1e-6
    assert np.array_equal(clip.rgb, sc.rgb[frames])
    # half-float centimetres: |error| <= 2^-11 relative.
    truth = sc.depth[frames]
    assert np.all(np.abs(clip.depth - truth) <= truth * 2.0**-11 + 1e-6)
    assert clip.depth_valid.all()


def test_round_trip_street_and_aerial(rendered, tmp_path):
    written = {i: writer.write(rendered[i], tmp_path, writer.default_scene_id(i)) for i in (0, 1)}
    adapter = get_adapter("matrixcity", str(tmp_path))
    scenes = adapter.discover()
    assert [s.scene for s in scenes] == sorted(ws.scene_id for ws in written.values())
    for i, ws in written.items():
        scene = next(s for s in scenes if s.scene == ws.scene_id)
        assert scene.num_frames == rendered[i].spec.num_frames
        _check(_load(adapter, scene), ws, rendered[i], list(range(scene.num_frames)))
        _check(_load(adapter, scene, [1, 3, 5]), ws, rendered[i], [1, 3, 5])


def test_nested_tar_folders(rendered, tmp_path):
    """Untarring can leave <block>/<block>/NNNN.png and <block>_depth/<block>_depth/NNNN.exr."""
    ws = writer.write(rendered[0], tmp_path, writer.default_scene_id(0))
    block_dir = tmp_path / ws.scene_id
    nested = block_dir / block_dir.name
    nested.mkdir()
    for p in block_dir.glob("*.png"):
        shutil.move(str(p), nested / p.name)
    city, view, split, block = ws.scene_id.split("/")
    ddir = tmp_path / f"{city}_depth" / view / split / f"{block}_depth"
    (ddir / ddir.name).mkdir()
    for p in ddir.glob("*.exr"):
        shutil.move(str(p), ddir / ddir.name / p.name)
    adapter = get_adapter("matrixcity", str(tmp_path))
    _check(_load(adapter, adapter.discover()[0]), ws, rendered[0], list(range(rendered[0].spec.num_frames)))


def test_sky_sentinel_is_invalid(rendered, tmp_path):
    ws = writer.write(rendered[0], tmp_path, writer.default_scene_id(0))
    city, view, split, block = ws.scene_id.split("/")
    cm = rendered[0].depth[2].astype(np.float64) * 100
    cm[:5, :] = 1e9  # written as 65504
    writer.write_exr_depth(tmp_path / f"{city}_depth" / view / split / f"{block}_depth" / "0002.exr", cm)
    adapter = get_adapter("matrixcity", str(tmp_path))
    clip = _load(adapter, adapter.discover()[0], [2])
    assert not clip.depth_valid[0, :5].any() and clip.depth_valid[0, 5:].all()


# -- malformed inputs ----------------------------------------------------------------------------


@pytest.fixture
def block(rendered, tmp_path):
    ws = writer.write(rendered[0], tmp_path, writer.default_scene_id(0))
    city, view, split, name = ws.scene_id.split("/")
    return ws, tmp_path / ws.scene_id, tmp_path / f"{city}_depth" / view / split / f"{name}_depth"


def _expect(tmp_path, name, reason, scene=None):
    adapter = get_adapter("matrixcity", str(tmp_path))
    with pytest.raises(ClipError) as err:
        _load(adapter, scene or adapter.discover()[0])
    assert name in str(err.value.path) and reason in err.value.reason, str(err.value)


def _edit_transforms(block_dir, fn):
    tj = json.loads((block_dir / "transforms.json").read_text())
    fn(tj)
    (block_dir / "transforms.json").write_text(json.dumps(tj))


def test_truncated_png(block, tmp_path):
    _, bdir, _ = block
    p = bdir / "0004.png"
    p.write_bytes(p.read_bytes()[:50])
    _expect(tmp_path, "0004.png", "truncated")


def test_nan_pose(block, tmp_path):
    _, bdir, _ = block
    _edit_transforms(bdir, lambda tj: tj["frames"][3]["rot_mat"][0].__setitem__(3, float("nan")))
    _expect(tmp_path, "transforms.json", "NaN")


def test_wrong_pose_shape_and_scale(block, tmp_path):
    _, bdir, _ = block
    _edit_transforms(bdir, lambda tj: tj["frames"][1].__setitem__("rot_mat", tj["frames"][1]["rot_mat"][:3]))
    _expect(tmp_path, "transforms.json", "shape (3, 4)")
    _edit_transforms(bdir, lambda tj: tj["frames"][1].__setitem__("rot_mat", (np.eye(4) * 0.5).tolist()))
    _expect(tmp_path, "transforms.json", "scale")


def test_missing_pose_line(block, tmp_path):
    _, bdir, _ = block
    scene = get_adapter("matrixcity", str(tmp_path)).discover()[0]
    _edit_transforms(bdir, lambda tj: tj["frames"].pop())
    _expect(tmp_path, "transforms.json", "frames listed, expected 10", scene=scene)


@pytest.mark.parametrize("bad", [1.9, True, "1", None])
def test_frame_index_that_is_no_integer_is_refused(block, tmp_path, bad):
    """1.9 was truncated to 1 (a frame read under another's name), true read as 1 and "1" parsed."""
    _, bdir, _ = block
    _edit_transforms(bdir, lambda tj: tj["frames"][2].__setitem__("frame_index", bad))
    _expect(tmp_path, "transforms.json", "needs an integer frame_index")


def test_truncated_exr(block, tmp_path):
    _, _, ddir = block
    p = ddir / "0006.exr"
    p.write_bytes(p.read_bytes()[:120])
    _expect(tmp_path, "0006.exr", "unreadable EXR")


def test_depth_size_mismatch(block, tmp_path):
    _, _, ddir = block
    writer.write_exr_depth(ddir / "0000.exr", np.full((7, 9), 300.0))
    _expect(tmp_path, "0000.exr", "depth is 9x7")


def test_missing_depth_folder(block, tmp_path):
    _, _, ddir = block
    shutil.rmtree(ddir)
    _expect(tmp_path, "demo_block_0_depth", "depth folder is missing")


def test_missing_openexr_is_a_clear_error(block, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "OpenEXR", None)  # import now raises ImportError
    _expect(tmp_path, "0000.exr", "needs the OpenEXR package")


def test_bad_transforms_json(block, tmp_path):
    _, bdir, _ = block
    (bdir / "transforms.json").write_text('{"frames": [')
    (scene,) = get_adapter("matrixcity", str(tmp_path)).discover()  # listed, failing with the reason
    with pytest.raises(ClipError) as err:
        scene.refuse_if_unreadable()
    assert "transforms.json" in err.value.path and "not a MatrixCity transforms.json" in err.value.reason


@pytest.mark.skipif(not SAMPLES.exists(), reason="no real MatrixCity sample in shared/datasets/samples")
def test_real_sample():
    adapter = get_adapter("matrixcity", str(SAMPLES))
    scenes = adapter.discover()
    assert scenes
    s = scenes[0]
    clip = _load(adapter, s, list(range(min(4, s.num_frames))))
    assert np.all(geo.rotation_error(clip.c2w[:, :3, :3]) < 1e-3)
    w = clip.rgb.shape[2]
    assert np.all((clip.intrinsics[:, 0] > 0.3 * w) & (clip.intrinsics[:, 0] < 5 * w))
