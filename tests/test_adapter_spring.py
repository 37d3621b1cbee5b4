"""Spring adapter: render -> official layout (2x disparity in HDF5) -> adapter, plus malformed inputs."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline import geometry as geo
from pipeline.clip import ClipError, ClipMeta
from pipeline.demo.render import render
from pipeline.demo.writers import spring as writer
from stages.ingest import get_adapter


@pytest.fixture(scope="module")
def rendered():
    scene = render(writer.demo_spec(0, seed=2))
    return scene, writer.render_2x(scene)


@pytest.fixture(scope="module")
def written(tmp_path_factory, rendered):
    scene, hires = rendered
    root = tmp_path_factory.mktemp("spring")
    ws = writer.write(scene, root, writer.default_scene_id(0), hires=hires)
    return root, ws


def _meta(scene, frames):
    return ClipMeta(
        dataset="spring",
        scene=scene,
        clip_id=f"{scene}:{frames[0]}",
        frame_indices=list(frames),
        dynamic=True,
        real=False,
        depth_source="gt",
        track_source="none",
    )


def _load(root, frames, options=None):
    adapter = get_adapter("spring", str(root), options)
    (scene,) = adapter.discover()
    return adapter.load_clip(scene, frames, _meta(scene.scene, frames))


def _copy(written, tmp_path):
    root, ws = written
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst, dst / ws.scene_id


def _edit_lines(path, fn):
    path.write_text("\n".join(fn(path.read_text().splitlines())) + "\n")


# -- round trip ---------------------------------------------------------------------------------


def test_discover(tmp_path, rendered):
    scene, hires = rendered
    for sid in ("train/0002", "train/0001"):
        writer.write(scene, tmp_path, sid, hires=hires)
    (tmp_path / "test" / "0003" / "frame_left").mkdir(parents=True)  # test split: no cam_data/disparity
    scenes = get_adapter("spring", str(tmp_path)).discover()
    assert [s.scene for s in scenes] == ["train/0001", "train/0002"]
    assert all(s.num_frames == scene.spec.num_frames for s in scenes)


def test_round_trip_poses_intrinsics_rgb(written, rendered):
    scene, _ = rendered
    root, ws = written
    frames = [0, 3, 4, 9]
    clip = _load(root, frames)
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(scene.c2w[frames]), atol=1e-5)
    np.testing.assert_allclose(clip.intrinsics, scene.intrinsics[frames], atol=1e-6)
    np.testing.assert_array_equal(clip.rgb, scene.rgb[frames])  # PNG: exact
    assert ws.frame_ids[0] == 1  # files numbered from 0001


def test_depth_block_mean_is_exact_on_planes(written, rendered):
    """Block mean of the 2x grid = disparity at the pixel centre wherever the block is planar."""
    scene, _ = rendered
    root, _ = written
    frames = list(range(10))
    clip = _load(root, frames)
    valid = clip.depth_valid
    assert valid.mean() > 0.95
    rel = np.abs(clip.depth - scene.depth[frames]) / scene.depth[frames]
    assert np.quantile(rel[valid], 0.95) < 1e-4  # float32 disparity: ~1e-7 on planar blocks
    assert rel[valid].max() < 0.05  # blocks straddling a crease of the room / boxes


def test_depth_subsample_matches_official_decoding(written, rendered):
    """disp[::2, ::2] and Z = fx * 0.065 / d, exactly as the Spring toolkit."""
    scene, hires = rendered
    root, _ = written
    frames = [1, 6]
    clip = _load(root, frames, {"disparity_downsample": "subsample"})
    assert clip.depth_valid.all()
    truth = hires.depth[frames][:, ::2, ::2]
    np.testing.assert_allclose(clip.depth, truth, rtol=1e-5)


def test_depth_unprojects_consistently(written, rendered):
    scene, _ = rendered
    root, _ = written
    clip = _load(root, [0, 2])
    pts = geo.unproject(clip.depth[0], clip.intrinsics[0], clip.c2w[0])
    keep = clip.depth_valid[0] & ~scene.dynamic_mask[0]
    uv, z = geo.project(pts[keep], clip.intrinsics[1], clip.c2w[1])
    h, w = clip.depth.shape[1:]
    ok = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    col, row = np.floor(uv[ok]).astype(int).T
    assert ok.sum() > 100 and (np.abs(clip.depth[1, row, col] - z[ok]) < 0.03 * z[ok]).mean() > 0.85


def test_sky_and_nan_disparity_invalid(written, tmp_path):
    root, sdir = _copy(written, tmp_path)
    p = sdir / "disp1_left" / "disp1_left_0001.dsp5"
    with h5py.File(p, "r") as f:
        disp = f["disparity"][()]
    disp[:4, :8] = 0.0  # sky: zero disparity
    disp[10:12, 10:12] = np.nan
    with h5py.File(p, "w") as f:
        f.create_dataset("disparity", data=disp, compression="gzip", compression_opts=5)
    for mode in ("block_mean", "subsample"):
        clip = _load(root, [0], {"disparity_downsample": mode})
        assert not clip.depth_valid[0, :2, :4].any() and not clip.depth_valid[0, 5, 5]
        assert np.all(np.isfinite(clip.depth))


# -- malformed inputs -----------------------------------------------------------------------


def _expect(root, frames, *needles, options=None):
    with pytest.raises(ClipError) as info:
        _load(root, frames, options)
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_truncated_png(written, tmp_path):
    root, sdir = _copy(written, tmp_path)
    p = sdir / "frame_left" / "frame_left_0005.png"
    p.write_bytes(p.read_bytes()[:100])
    _expect(root, [3, 4], "frame_left_0005.png", "truncated")


def test_dsp5_wrong_key_and_garbage(written, tmp_path):
    root, sdir = _copy(written, tmp_path)
    p = sdir / "disp1_left" / "disp1_left_0003.dsp5"
    with h5py.File(p, "w") as f:
        f.create_dataset("flow", data=np.zeros((72, 128), np.float32))
    _expect(root, [2], "disp1_left_0003.dsp5", "no 'disparity' dataset")
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    _expect(root, [2], "disp1_left_0003.dsp5", "unreadable")


def test_disparity_not_twice_the_image(written, tmp_path):
    root, sdir = _copy(written, tmp_path)
    with h5py.File(sdir / "disp1_left" / "disp1_left_0002.dsp5", "w") as f:
        f.create_dataset("disparity", data=np.ones((36, 64), np.float32))
    _expect(root, [1], "disp1_left_0002.dsp5", "expected 128x72")


def test_missing_extrinsics_line(written, tmp_path):
    root, sdir = _copy(written, tmp_path)
    _edit_lines(sdir / "cam_data" / "extrinsics.txt", lambda ls: ls[:-1])
    _expect(root, [0], "extrinsics.txt", "9 lines, expected 10")


def test_extra_intrinsics_line(written, tmp_path):
    root, sdir = _copy(written, tmp_path)
    _edit_lines(sdir / "cam_data" / "intrinsics.txt", lambda ls: ls + ls[-1:])
    _expect(root, [0], "intrinsics.txt", "11 lines, expected 10")


def test_nan_and_short_rows(written, tmp_path):
    root, sdir = _copy(written, tmp_path)
    _edit_lines(sdir / "cam_data" / "intrinsics.txt", lambda ls: ls[:4] + ["nan " + ls[4].split(" ", 1)[1]] + ls[5:])
    _expect(root, [4], "intrinsics.txt", "NaN/inf")
    _load(root, [3])  # other frames are fine
    _edit_lines(sdir / "cam_data" / "extrinsics.txt", lambda ls: [" ".join(ls[0].split()[:15])] + ls[1:])
    _expect(root, [3], "extrinsics.txt", "line 1: expected 16 values, found 15")


def test_not_a_rigid_pose(written, tmp_path):
    root, sdir = _copy(written, tmp_path)

    def shear(lines):
        v = lines[2].split()
        v[1] = str(float(v[1]) + 0.3)
        lines[2] = " ".join(v)
        return lines

    _edit_lines(sdir / "cam_data" / "extrinsics.txt", shear)
    _expect(root, [2], "extrinsics.txt", "orthonormal")


def test_numbering_must_start_at_0001(written, tmp_path):
    root, sdir = _copy(written, tmp_path)
    fl = sdir / "frame_left"
    (fl / "frame_left_0010.png").rename(fl / "frame_left_0000.png")
    _expect(root, [0], "frame_left_0000.png", "numbering must start at 0001")


def test_rgb_size_mismatch(written, tmp_path):
    root, sdir = _copy(written, tmp_path)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(sdir / "frame_left" / "frame_left_0002.png")
    _expect(root, [0, 1], "frame_left_0002.png", "expected 64x36")


def test_a_missing_image_fails_only_the_clips_that_use_it(written, tmp_path):
    """A deleted middle image: clips without that frame load; those with it fail naming the image
    (the scene's frame count came from the images, so every clip failed on the camera file)."""
    root, sdir = _copy(written, tmp_path)
    (sdir / "frame_left" / "frame_left_0006.png").unlink()
    assert _load(root, [0, 1, 2]).rgb.shape[0] == 3
    _expect(root, [4, 5], "frame_left_0006.png", "missing")


def test_a_missing_last_image_fails_only_the_clips_that_use_it(written, tmp_path):
    """A deleted last image: the scene keeps its length (from its camera table), the clips without
    that frame load and those with it fail naming the image (the count came from the images, one
    short of the table, so every clip of the scene failed on the table)."""
    root, sdir = _copy(written, tmp_path)
    n = get_adapter("spring", str(root)).discover()[0].num_frames
    last = sdir / "frame_left" / f"frame_left_{n:04d}.png"
    last.unlink()
    assert get_adapter("spring", str(root)).discover()[0].num_frames == n
    assert _load(root, [0, 1, 2]).rgb.shape[0] == 3
    _expect(root, [n - 2, n - 1], last.name, "missing")
