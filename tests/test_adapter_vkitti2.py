"""Virtual KITTI 2 adapter: render -> official layout -> adapter, plus malformed inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import geometry as geo
from pipeline.clip import ClipError, ClipMeta
from pipeline.demo.render import render
from pipeline.demo.writers import vkitti2 as writer
from stages.ingest import get_adapter

DEPTH_STEP = 0.01  # centimetres, rounded by the writer: error <= 0.005 m


@pytest.fixture(scope="module")
def rendered():
    return render(writer.demo_spec(0, seed=5))


@pytest.fixture(scope="module")
def written(tmp_path_factory, rendered):
    root = tmp_path_factory.mktemp("vk")
    ws = writer.write(rendered, root, writer.default_scene_id(0))
    return root, ws


def _meta(scene, frames):
    return ClipMeta(
        dataset="vkitti2",
        scene=scene,
        clip_id=f"{scene}:{frames[0]}",
        frame_indices=list(frames),
        dynamic=True,
        real=False,
        depth_source="gt",
        track_source="none",
    )


def _scenes(root, options=None):
    adapter = get_adapter("vkitti2", str(root), options)
    return adapter, adapter.discover()


def _load(root, frames, options=None, index=0):
    adapter, scenes = _scenes(root, options)
    scene = scenes[index]
    return adapter.load_clip(scene, frames, _meta(scene.scene, frames))


def _copy(written, tmp_path):
    root, _ = written
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst, dst / "Scene01" / "clone"


def _edit_lines(path, fn):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


# -- round trip ---------------------------------------------------------------------------------


def test_discover_default_camera_0_and_options(tmp_path, rendered):
    writer.write(rendered, tmp_path, "Scene01/clone/Camera_0")
    writer.write(rendered, tmp_path, "Scene01/fog/Camera_0", cameras=(0,))
    writer.write(rendered, tmp_path, "Scene20/30-deg-left/Camera_0")
    _, scenes = _scenes(tmp_path)
    assert [s.scene for s in scenes] == [
        "Scene01/clone/Camera_0",
        "Scene01/fog/Camera_0",
        "Scene20/30-deg-left/Camera_0",
    ]
    assert all(s.num_frames == rendered.spec.num_frames for s in scenes)
    _, both = _scenes(tmp_path, {"cameras": [0, 1]})
    assert [s.scene for s in both] == [
        "Scene01/clone/Camera_0",
        "Scene01/clone/Camera_1",
        "Scene01/fog/Camera_0",
        "Scene20/30-deg-left/Camera_0",
        "Scene20/30-deg-left/Camera_1",
    ]
    _, some = _scenes(tmp_path, {"variations": ["fog"]})
    assert [s.scene for s in some] == ["Scene01/fog/Camera_0"]


def test_round_trip(written, rendered):
    root, ws = written
    frames = [0, 1, 4, 8, 9]
    clip = _load(root, frames)
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(rendered.c2w[frames]), atol=1e-5)
    # The file has pixel centres at integers (cx = (W-1)/2); the adapter shifts back by +0.5.
    np.testing.assert_allclose(clip.intrinsics, rendered.intrinsics[frames], atol=1e-6)
    truth = rendered.depth[frames]
    assert clip.depth_valid.all()
    assert np.abs(clip.depth - truth).max() <= DEPTH_STEP / 2 + 1e-5
    diff = np.abs(clip.rgb.astype(int) - rendered.rgb[frames])
    assert diff.mean() < 6 and diff.max() < 60
    assert clip.tracks is None


def test_principal_point_matches_release_convention(written, rendered):
    root, ws = written
    text = (root / ws.scene_id.rsplit("/", 1)[0] / "intrinsic.txt").read_text().splitlines()
    fx, fy, cx, cy = map(float, text[1].split()[2:])
    h, w = rendered.spec.height, rendered.spec.width
    assert (cx, cy) == ((w - 1) / 2, (h - 1) / 2)  # as the release: 620.5, 187.0 for 1242x375


def test_depth_unprojection_consistent_across_frames(written, rendered):
    """Static room points seen at frame 0 reproject into frame 3 at the depth it records."""
    root, _ = written
    clip = _load(root, [0, 3])
    pts = geo.unproject(clip.depth[0], clip.intrinsics[0], clip.c2w[0])
    static = ~rendered.dynamic_mask[0]
    uv, z = geo.project(pts[static], clip.intrinsics[1], clip.c2w[1])
    h, w = clip.depth.shape[1:]
    ok = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    col, row = np.floor(uv[ok]).astype(int).T
    close = np.abs(clip.depth[1, row, col] - z[ok]) < 0.03 * z[ok] + DEPTH_STEP
    assert ok.sum() > 100 and close.mean() > 0.85


def test_right_camera(written):
    root, _ = written
    left = _load(root, [0, 5], {"cameras": [0, 1]}, index=0)
    right = _load(root, [0, 5], {"cameras": [0, 1]}, index=1)
    rel = geo.invert_pose(left.c2w) @ right.c2w
    np.testing.assert_allclose(rel[:, :3, :3], np.tile(np.eye(3), (2, 1, 1)), atol=1e-6)
    np.testing.assert_allclose(rel[:, :3, 3], [[writer.BASELINE_M, 0, 0]] * 2, atol=1e-5)


def test_side_by_side_archives(tmp_path, rendered):
    ws = writer.write(rendered, tmp_path, "Scene06/rain", archives=True)
    assert ws.scene_id == "Scene06/rain/Camera_0"
    assert (tmp_path / "vkitti_2.0.3_textgt" / "Scene06" / "rain" / "extrinsic.txt").exists()
    clip = _load(tmp_path, [2, 3])
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(rendered.c2w[[2, 3]]), atol=1e-5)


def test_sky_and_zero_depth_invalid(written, tmp_path):
    root, var = _copy(written, tmp_path)
    p = var / "frames" / "depth" / "Camera_0" / "depth_00000.png"
    raw = np.asarray(Image.open(p)).astype(np.uint16).copy()
    raw[0, :5] = 65535
    raw[1, :5] = 0
    Image.fromarray(raw).save(p)
    clip = _load(root, [0])
    assert not clip.depth_valid[0, :2, :5].any() and clip.depth_valid[0, 2:].all()


# -- malformed inputs -----------------------------------------------------------------------


def _expect(root, frames, *needles, options=None):
    with pytest.raises(ClipError) as info:
        _load(root, frames, options)
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_truncated_jpeg(written, tmp_path):
    root, var = _copy(written, tmp_path)
    p = var / "frames" / "rgb" / "Camera_0" / "rgb_00004.jpg"
    p.write_bytes(p.read_bytes()[:150])
    _expect(root, [3, 4], "rgb_00004.jpg", "truncated")


def test_missing_extrinsic_row(written, tmp_path):
    root, var = _copy(written, tmp_path)
    _edit_lines(var / "extrinsic.txt", lambda ls: [line for line in ls if not line.startswith("7 0 ")])
    _expect(root, [0], "extrinsic.txt", "camera 0: 9 rows", "expected frames 0..9")


def test_extra_intrinsic_row(written, tmp_path):
    root, var = _copy(written, tmp_path)
    _edit_lines(var / "intrinsic.txt", lambda ls: ls + ["10 0 10 10 5 5"])
    _expect(root, [0], "intrinsic.txt", "11 rows")


def test_duplicate_row(written, tmp_path):
    root, var = _copy(written, tmp_path)
    _edit_lines(var / "extrinsic.txt", lambda ls: ls + [ls[1]])
    _expect(root, [0], "extrinsic.txt", "frame 0 appears more than once")


def test_nan_in_extrinsic(written, tmp_path):
    root, var = _copy(written, tmp_path)

    def poison(lines):
        parts = lines[3].split()  # frame 1, camera 0
        parts[5] = "nan"
        lines[3] = " ".join(parts)
        return lines

    _edit_lines(var / "extrinsic.txt", poison)
    _expect(root, [1], "extrinsic.txt", "NaN/inf")
    _load(root, [0, 2])  # other frames still load


def test_wrong_column_count_and_missing_header(written, tmp_path):
    root, var = _copy(written, tmp_path)
    _edit_lines(var / "extrinsic.txt", lambda ls: ls[:2] + [" ".join(ls[2].split()[:-1])] + ls[3:])
    _expect(root, [0], "extrinsic.txt", "line 3: expected 18 values, found 17")
    root2, var2 = _copy(written, tmp_path / "b")
    _edit_lines(var2 / "intrinsic.txt", lambda ls: ls[1:])
    _expect(root2, [0], "intrinsic.txt", "header")


def test_not_a_rotation(written, tmp_path):
    root, var = _copy(written, tmp_path)

    def scale(lines):
        parts = lines[1].split()
        parts[2] = str(2 * float(parts[2]))
        lines[1] = " ".join(parts)
        return lines

    _edit_lines(var / "extrinsic.txt", scale)
    _expect(root, [0], "extrinsic.txt", "orthonormal")


def test_bad_depth_files(written, tmp_path):
    root, var = _copy(written, tmp_path)
    d = var / "frames" / "depth" / "Camera_0"
    Image.fromarray(np.zeros((24, 80), np.uint8)).save(d / "depth_00002.png")
    _expect(root, [2], "depth_00002.png", "16-bit")
    Image.fromarray(np.ones((12, 40), np.uint16)).save(d / "depth_00002.png")
    _expect(root, [2], "depth_00002.png", "40x12")
    (d / "depth_00002.png").unlink()
    _expect(root, [2], "depth_00002.png", "missing")


def test_image_count_differs_from_tables(written, tmp_path):
    """More images than table rows: the table is short, every clip fails naming it (a missing last
    image is the clips' own missing file, test below)."""
    root, var = _copy(written, tmp_path)
    rgb = var / "frames" / "rgb" / "Camera_0"
    shutil.copy(rgb / "rgb_00009.jpg", rgb / "rgb_00010.jpg")
    _expect(root, [0], "extrinsic.txt", "expected frames 0..10")


def test_a_missing_image_fails_only_the_clips_that_use_it(written, tmp_path):
    """A deleted middle image: clips without that frame load; those with it fail naming the image
    (the scene's frame count came from the images, so every clip failed on extrinsic.txt)."""
    root, var = _copy(written, tmp_path)
    (var / "frames" / "rgb" / "Camera_0" / "rgb_00005.jpg").unlink()
    assert _load(root, [0, 1, 2]).rgb.shape[0] == 3
    _expect(root, [4, 5], "rgb_00005.jpg", "missing")


def test_a_missing_last_image_fails_only_the_clips_that_use_it(written, tmp_path):
    """A deleted last image: the scene keeps its length (from its camera table), the clips without
    that frame load and those with it fail naming the image (the count came from the images, one
    short of the table, so every clip of the scene failed on the table)."""
    root, var = _copy(written, tmp_path)
    n = _scenes(root)[1][0].num_frames
    last = var / "frames" / "rgb" / "Camera_0" / f"rgb_{n - 1:05d}.jpg"
    last.unlink()
    assert _scenes(root)[1][0].num_frames == n
    assert _load(root, [0, 1, 2]).rgb.shape[0] == 3
    _expect(root, [n - 2, n - 1], last.name, "missing")
