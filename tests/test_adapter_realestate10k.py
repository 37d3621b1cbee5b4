"""RealEstate10K adapter: render -> official layout (camera .txt + extracted frames) -> adapter,
malformed inputs, the real sample camera file, and ``inspect_camera_file``."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import geometry as geo
from pipeline.clip import ClipError, ClipMeta
from pipeline.demo.render import render
from pipeline.demo.writers import realestate10k as writer
from stages.ingest import get_adapter
from stages.ingest.inspect_file import inspect_camera_file
from stages.ingest.realestate10k import parse_camera_text

SAMPLE = "/work/shared/datasets/samples/realestate10k/0bf152ef84195293.txt"
SCENE = writer.default_scene_id(0)  # "train/<16 hex>"
# The .txt prints 9 decimals: w2c entries are exact to 5e-10, so c2w to ~1e-8 after inversion.
POSE_TOL = 1e-5
# Normalised intrinsics printed with 9 decimals, times W <= 64 px.
INTR_TOL = 1e-6


@pytest.fixture(scope="module")
def rendered():
    return render(writer.demo_spec(0, seed=3))


@pytest.fixture(scope="module")
def written(tmp_path_factory, rendered):
    root = tmp_path_factory.mktemp("re10k")
    ws = writer.write(rendered, root, SCENE)
    writer.write(render(writer.demo_spec(3, seed=4)), root, writer.default_scene_id(3))  # a test/ sequence
    return root, ws


def _meta(scene, frames):
    return ClipMeta(dataset="realestate10k", scene=scene, clip_id=f"{scene}:{frames[0]}", frame_indices=list(frames),
                    dynamic=False, real=True, depth_source="none", track_source="none")


def _load(root, frames, scene_id=SCENE):
    adapter = get_adapter("realestate10k", str(root))
    scene = next(s for s in adapter.discover() if s.scene == scene_id)
    return adapter.load_clip(scene, frames, _meta(scene.scene, frames))


def _copy(written, tmp_path):
    root, ws = written
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst, dst / f"{SCENE}.txt", dst / SCENE, ws


def _luma(rgb):
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def assert_lossy_close(got, want, luma_tol):
    """Lossy codecs use 4:2:0 chroma, which smears this tiny high-contrast texture's colours, so
    compare luma per pixel (mean abs, 0..255) and colour only as per-frame channel means."""
    assert got.shape == want.shape
    err = np.abs(_luma(got) - _luma(want)).mean()
    assert err < luma_tol, err
    np.testing.assert_allclose(got.mean(axis=(1, 2)), want.astype(np.float64).mean(axis=(1, 2)), atol=3.0)


def _edit_lines(path, fn):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


# -- round trip ---------------------------------------------------------------------------------


def test_discover_splits_sorted(written):
    root, _ = written
    adapter = get_adapter("realestate10k", str(root))
    scenes = adapter.discover()
    assert [s.scene for s in scenes] == sorted([SCENE, writer.default_scene_id(3)])
    assert {s.scene.split("/")[0] for s in scenes} == {"train", "test"}
    assert all(s.num_frames == 10 for s in scenes)
    assert adapter.capabilities.metric_poses is False and adapter.capabilities.has_depth is False
    assert adapter.defaults.depth_source == "megasam" and adapter.defaults.track_source == "cotracker"


def test_round_trip_png(written, rendered):
    root, ws = written
    frames = list(range(10))
    clip = _load(root, frames)
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(rendered.c2w[frames]), atol=POSE_TOL)
    assert np.allclose(clip.c2w[0], np.eye(4), atol=POSE_TOL)  # the fixture's world is the first camera
    np.testing.assert_allclose(clip.intrinsics, rendered.intrinsics[frames], atol=INTR_TOL)
    assert np.array_equal(clip.rgb, rendered.rgb[frames])  # PNG: exact
    assert clip.depth is None and clip.tracks is None
    assert clip.meta.extra["timestamps_us"] == ws.frame_ids
    assert clip.meta.extra["source_url"].startswith("https://www.youtube.com/watch?v=")


def test_round_trip_subset_and_geometry(written, rendered):
    """A strided subset; rendered points reproject through the adapter's cameras (scale-aware)."""
    root, ws = written
    frames = [1, 4, 7]
    clip = _load(root, frames)
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(rendered.c2w[frames]), atol=POSE_TOL)
    vis = rendered.tracks_visible[frames[1]]
    pts = ws.expected_points(rendered.tracks_world[frames[1]][vis])
    uv, z = geo.project(pts, clip.intrinsics[1], clip.c2w[1])
    uv_true, z_true = geo.project(rendered.tracks_world[frames[1]][vis], rendered.intrinsics[1], rendered.c2w[frames[1]])
    np.testing.assert_allclose(uv, uv_true, atol=1e-4)
    np.testing.assert_allclose(z, z_true * writer.POSE_SCALE, rtol=1e-5)


def test_round_trip_jpeg(tmp_path, rendered):
    ws = writer.write(rendered, tmp_path, SCENE, image_ext=".jpg", jpeg_quality=95)
    clip = _load(tmp_path, list(range(10)))
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(rendered.c2w), atol=POSE_TOL)
    assert_lossy_close(clip.rgb, rendered.rgb, luma_tol=3.0)  # JPEG q95: measured ~1.6


def test_round_trip_clip_video(tmp_path, rendered):
    ws = writer.write(rendered, tmp_path, SCENE, with_frames=False, with_video=True)
    clip = _load(tmp_path, [0, 5, 9])
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(rendered.c2w[[0, 5, 9]]), atol=POSE_TOL)
    assert_lossy_close(clip.rgb, rendered.rgb[[0, 5, 9]], luma_tol=6.0)  # H.264 crf 18: measured ~3.8
    # Order: each decoded frame is nearest to its own rendered frame.
    for j, i in enumerate([0, 5, 9]):
        errs = [np.abs(_luma(clip.rgb[j]) - _luma(rendered.rgb[t])).mean() for t in range(10)]
        assert int(np.argmin(errs)) == i


# -- malformed inputs ---------------------------------------------------------------------------


def test_missing_frames_reported_per_clip(written, tmp_path):
    root, txt, folder, ws = _copy(written, tmp_path)
    (folder / f"{ws.frame_ids[3]}.png").unlink()
    (folder / f"{ws.frame_ids[5]}.png").unlink()
    with pytest.raises(ClipError) as exc:
        _load(root, list(range(8)))
    assert exc.value.path.endswith(f"{SCENE}/{ws.frame_ids[3]}.png")
    assert "2 of 8 frames" in exc.value.reason and str(ws.frame_ids[5]) in exc.value.reason
    _load(root, [0, 1, 2])  # a clip that avoids the gaps still loads


def test_truncated_frame(written, tmp_path):
    root, txt, folder, ws = _copy(written, tmp_path)
    f = folder / f"{ws.frame_ids[2]}.png"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ClipError) as exc:
        _load(root, [1, 2, 3])
    assert exc.value.path.endswith(f"{ws.frame_ids[2]}.png") and "truncated" in exc.value.reason


def test_frame_size_mismatch(written, tmp_path):
    root, txt, folder, ws = _copy(written, tmp_path)
    Image.new("RGB", (32, 18)).save(folder / f"{ws.frame_ids[1]}.png")
    with pytest.raises(ClipError) as exc:
        _load(root, [0, 1])
    assert exc.value.path.endswith(f"{ws.frame_ids[1]}.png") and "expected 64x36" in exc.value.reason


@pytest.mark.parametrize("edit, needle", [
    (lambda ls: ls[:3] + [" ".join(ls[3].split()[:18])] + ls[4:], "line 4: expected 19 values, found 18"),
    (lambda ls: ls[:2] + [ls[2].replace(ls[2].split()[10], "nan", 1)] + ls[3:], "line 3: NaN/inf"),
    (lambda ls: ls[:2] + [ls[1]] + ls[3:], "line 3: timestamp"),
    (lambda ls: ls[:4] + [ls[4].replace(ls[4].split()[8], "0.500000000", 1)] + ls[5:], "line 5: rotation is not orthonormal"),
    (lambda ls: ls[:2] + [" ".join(ls[2].split()[:5] + ["0.1"] + ls[2].split()[6:])] + ls[3:], "distortion"),
    (lambda ls: ls[1:], "line 1 should be the video URL"),
    (lambda ls: ls[:2] + ["12 abc" + " 0" * 17] + ls[3:], "line 3: not a number"),
])
def test_bad_camera_lines(written, tmp_path, edit, needle):
    root, txt, folder, ws = _copy(written, tmp_path)
    adapter = get_adapter("realestate10k", str(root))
    scene = next(s for s in adapter.discover() if s.scene == SCENE) if "URL" not in needle else None
    _edit_lines(txt, edit)
    if scene is None:  # a file without the URL line is not discovered as a camera file
        assert SCENE not in [s.scene for s in adapter.discover()]
        assert any(needle in p for p in inspect_camera_file(str(txt))["problems"])
        return
    with pytest.raises(ClipError) as exc:
        adapter.load_clip(scene, [0, 1], _meta(scene.scene, [0, 1]))
    assert exc.value.path.endswith(f"{SCENE}.txt") and needle in exc.value.reason, exc.value


def test_extra_camera_line_after_discovery(written, tmp_path):
    root, txt, folder, ws = _copy(written, tmp_path)
    adapter = get_adapter("realestate10k", str(root))
    scene = next(s for s in adapter.discover() if s.scene == SCENE)
    _edit_lines(txt, lambda ls: ls + [ls[-1].replace(str(ws.frame_ids[-1]), str(ws.frame_ids[-1] + 33367), 1)])
    with pytest.raises(ClipError) as exc:
        adapter.load_clip(scene, [0], _meta(scene.scene, [0]))
    assert exc.value.path.endswith(".txt") and "11 camera lines, expected 10" in exc.value.reason


def test_truncated_clip_video(tmp_path, rendered):
    writer.write(rendered, tmp_path, SCENE, with_frames=False, with_video=True)
    mp4 = tmp_path / f"{SCENE}.mp4"
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    with pytest.raises(ClipError) as exc:
        _load(tmp_path, [0, 1])
    assert exc.value.path.endswith(f"{SCENE}.mp4") and "video" in exc.value.reason


def test_no_frames_at_all(tmp_path, rendered):
    writer.write(rendered, tmp_path, SCENE, with_frames=False)
    with pytest.raises(ClipError) as exc:
        _load(tmp_path, [0])
    assert exc.value.path.endswith(SCENE) and "no frames" in exc.value.reason


# -- the real sample ------------------------------------------------------------------------------


def test_real_sample_camera_file(tmp_path):
    cam = parse_camera_text(open(SAMPLE).read())
    assert cam.problems == [] and cam.num_frames == 16
    assert cam.url == "https://www.youtube.com/watch?v=QShWPZxTDoE"
    assert np.all(np.diff(cam.timestamps) > 0)
    # ~8 frames of a 29.97 fps video between kept lines (CameraCtrl's 16-frame subset).
    assert np.all((np.diff(cam.timestamps) > 2.5e5) & (np.diff(cam.timestamps) < 3.1e5))
    c2w = cam.c2w()
    assert np.all(np.isfinite(c2w)) and geo.rotation_error(c2w[:, :3, :3]).max() < 1e-6
    assert np.all(cam.distortion == 0)
    k = cam.intrinsics_norm
    assert np.allclose(k[:, 2:], 0.5)
    # Square pixels on a 16:9 video: fx/W * 16 == fy/H * 9.
    np.testing.assert_allclose(k[:, 0] * 16, k[:, 1] * 9, rtol=1e-6)
    hfov = np.degrees(2 * np.arctan(0.5 / k[:, 0]))
    assert np.all((hfov > 40) & (hfov < 120))
    steps = np.linalg.norm(np.diff(c2w[:, :3, 3], axis=0), axis=1)
    assert steps.max() < 5 * np.median(steps)  # smooth walkthrough, no jumps

    # Through the adapter: discovered in a split folder, and reported as having no frames.
    (tmp_path / "train").mkdir()
    shutil.copy(SAMPLE, tmp_path / "train")
    adapter = get_adapter("realestate10k", str(tmp_path))
    (scene,) = adapter.discover()
    assert scene.scene == "train/0bf152ef84195293" and scene.num_frames == 16
    with pytest.raises(ClipError, match="no frames"):
        adapter.load_clip(scene, [0, 1], _meta(scene.scene, [0, 1]))


def test_inspect_real_sample():
    r = inspect_camera_file(SAMPLE)
    assert r["dataset"] == "realestate10k" and r["scene"] == "0bf152ef84195293" and r["num_frames"] == 16
    assert r["problems"] == [] and r["image_size"] is None and r["intrinsics_normalized"] is True
    assert np.asarray(r["c2w"]).shape == (16, 4, 4) and np.asarray(r["intrinsics"]).shape == (16, 4)
    assert abs(r["implied_aspect"] - 16 / 9) < 1e-4
    assert r["path_length"] > 0


def test_inspect_with_frames(written, tmp_path, rendered):
    root, txt, folder, ws = _copy(written, tmp_path)
    r = inspect_camera_file(str(txt))
    assert r["scene"] == SCENE and r["image_size"] == [64, 36] and r["intrinsics_normalized"] is False
    np.testing.assert_allclose(r["intrinsics"], rendered.intrinsics, atol=INTR_TOL)
    np.testing.assert_allclose(r["c2w"], ws.expected_c2w(rendered.c2w), atol=POSE_TOL)
    assert r["problems"] == []
    (folder / f"{ws.frame_ids[4]}.png").unlink()
    _edit_lines(txt, lambda ls: ls[:3] + ["1 2 3"] + ls[3:])
    problems = inspect_camera_file(str(txt))["problems"]
    assert any("line 4: expected 19 values" in p for p in problems)
    assert any("1 of" in p and f"{ws.frame_ids[4]}.png" in p for p in problems)
