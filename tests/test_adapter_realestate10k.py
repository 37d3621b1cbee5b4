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
    return ClipMeta(
        dataset="realestate10k",
        scene=scene,
        clip_id=f"{scene}:{frames[0]}",
        frame_indices=list(frames),
        dynamic=False,
        real=True,
        depth_source="none",
        track_source="none",
    )


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
    uv_true, z_true = geo.project(
        rendered.tracks_world[frames[1]][vis], rendered.intrinsics[1], rendered.c2w[frames[1]]
    )
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


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda ls: ls[:3] + [" ".join(ls[3].split()[:18])] + ls[4:], "line 4: expected 19 values, found 18"),
        (lambda ls: ls[:2] + [ls[2].replace(ls[2].split()[10], "nan", 1)] + ls[3:], "line 3: NaN/inf"),
        (lambda ls: ls[:2] + [ls[1]] + ls[3:], "line 3: timestamp"),
        (
            lambda ls: ls[:4] + [ls[4].replace(ls[4].split()[8], "0.500000000", 1)] + ls[5:],
            "line 5: rotation is not orthonormal",
        ),
        (lambda ls: ls[:2] + [" ".join(ls[2].split()[:5] + ["0.1"] + ls[2].split()[6:])] + ls[3:], "distortion"),
        (lambda ls: ls[1:], "line 1 should be the video URL"),
        (lambda ls: ls[:2] + ["12 abc" + " 0" * 17] + ls[3:], "line 3: not a number"),
    ],
)
def test_bad_camera_lines(written, tmp_path, edit, needle):
    root, txt, folder, ws = _copy(written, tmp_path)
    adapter = get_adapter("realestate10k", str(root))
    scene = next(s for s in adapter.discover() if s.scene == SCENE) if "URL" not in needle else None
    _edit_lines(txt, edit)
    if scene is None:  # a camera file (16 hex digits) without the URL line: listed, failing with it
        scene = next(s for s in adapter.discover() if s.scene == SCENE)
        assert any(needle in p for p in inspect_camera_file(str(txt))["problems"])
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


# -- from the downloaded YouTube video ------------------------------------------------------------


@pytest.fixture(scope="module")
def youtube(tmp_path_factory, rendered):
    """The camera file lists every 2nd frame of a 29.97 fps video 45 s in; the frames between are
    colour-inverted, before is grey: only the exact frames match the render."""
    root = tmp_path_factory.mktemp("re10k_yt")
    ws = writer.write(rendered, root, SCENE, with_frames=False, with_youtube_video=True, video_step=2)
    return root, ws


def _video_path(root):
    (path,) = (root / "videos").glob("*.mp4")
    return path


def test_round_trip_youtube_video_whole_scene(youtube, rendered):
    root, ws = youtube
    clip = _load(root, list(range(10)))  # the whole scene in one call
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(rendered.c2w), atol=POSE_TOL)
    np.testing.assert_allclose(clip.intrinsics, rendered.intrinsics, atol=INTR_TOL)
    assert_lossy_close(clip.rgb, rendered.rgb, luma_tol=6.0)  # H.264 crf 18: measured ~4.2
    per_frame = np.abs(_luma(clip.rgb) - _luma(rendered.rgb)).mean(axis=(1, 2))
    assert per_frame.max() < 8  # an inverted neighbour or the grey lead-in would be > 40
    assert clip.meta.extra["frames_from"] == "video"
    np.testing.assert_allclose(clip.meta.extra["frame_times_us"], ws.frame_ids, atol=1)


def test_youtube_video_subset_in_any_order(youtube, rendered):
    root, _ = youtube
    clip = _load(root, [9, 0, 5])
    assert np.abs(_luma(clip.rgb) - _luma(rendered.rgb[[9, 0, 5]])).mean(axis=(1, 2)).max() < 8


def test_video_map_and_video_root(youtube, tmp_path, rendered):
    root, _ = youtube
    dst = tmp_path / "data"
    shutil.copytree(root, dst)
    video = _video_path(dst)
    store = tmp_path / "downloads"
    store.mkdir()
    video.rename(store / "walkthrough [dl].mp4")
    vid = video.stem
    with pytest.raises(ClipError, match="no frames"):
        _load(dst, [0])
    (dst / "map.csv").write_text(f"video_id,path\n{vid},walkthrough [dl].mp4\n")
    opts = {"video_map": "map.csv", "video_root": str(store)}
    adapter = get_adapter("realestate10k", str(dst), opts)
    (scene,) = adapter.discover()
    clip = adapter.load_clip(scene, [2, 3], _meta(scene.scene, [2, 3]))
    assert np.abs(_luma(clip.rgb) - _luma(rendered.rgb[[2, 3]])).mean() < 6
    (dst / "map.csv").write_text(f"{vid},../escape.mp4\n")
    adapter = get_adapter("realestate10k", str(dst), opts)
    with pytest.raises(ClipError, match="leaves the video root"):
        adapter.load_clip(scene, [0], _meta(scene.scene, [0]))


def test_options_are_typed(written):
    root, _ = written
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ValueError, match="frmes"):
        get_adapter("realestate10k", str(root), {"frmes": "video"})
    with pytest.raises(ValueError, match="decoder"):
        get_adapter("realestate10k", str(root), {"decoder": "ffmpeg"})
    bad = f"output: /tmp/x\ndatasets:\n  realestate10k: {{root: {root}, options: {{video_patern: x}}}}\n"
    with pytest.raises(ConfigError, match="video_patern"):
        load_config(bad, is_text=True)
    assert get_adapter("realestate10k", str(root), {"video_pattern": "v/{video_id}.mp4"}).opts.video_pattern == [
        "v/{video_id}.mp4"
    ]


def test_video_shorter_than_its_camera_file(youtube, tmp_path):
    root, ws = youtube
    dst = tmp_path / "c"
    shutil.copytree(root, dst)
    # A camera line a minute after the video ends: every clip of the scene fails, naming the video.
    _edit_lines(dst / f"{SCENE}.txt", lambda ls: ls + [ls[-1].replace(str(ws.frame_ids[-1]), "106000000", 1)])
    adapter = get_adapter("realestate10k", str(dst))
    (scene,) = adapter.discover()
    with pytest.raises(ClipError) as exc:
        adapter.load_clip(scene, [0, 1], _meta(scene.scene, [0, 1]))
    assert exc.value.path == str(_video_path(dst))
    assert "video is shorter than its camera file" in exc.value.reason and "106.000 s" in exc.value.reason


def test_truncated_and_variable_rate_youtube_video(youtube, tmp_path, rendered):
    root, _ = youtube
    dst = tmp_path / "t"
    shutil.copytree(root, dst)
    video = _video_path(dst)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    with pytest.raises(ClipError, match="unreadable or truncated video"):
        _load(dst, [0])
    # Variable frame rate: the same frames, with a 20 ms hiccup halfway through the sequence.
    period = writer.FRAME_PERIOD_US / 1e6
    times = [
        k * period + (0.02 if k >= writer.FIRST_FRAME + 9 else 0.0)
        for k in range(len(writer.youtube_frames(rendered.rgb, 2)))
    ]
    writer.write_youtube_video(rendered.rgb, video, 2, frame_times_s=times)
    with pytest.raises(ClipError, match="variable frame rate"):
        _load(dst, list(range(10)))


def test_no_youtube_id_in_url(youtube, tmp_path):
    root, _ = youtube
    dst = tmp_path / "u"
    shutil.copytree(root, dst)
    _edit_lines(dst / f"{SCENE}.txt", lambda ls: ["https://example.com/walkthrough"] + ls[1:])
    with pytest.raises(ClipError, match="no YouTube video id"):
        _load(dst, [0])


# -- from pixelSplat chunks ---------------------------------------------------------------------------

OTHER = writer.default_scene_id(4)  # another train/ sequence
# Chunks store cameras as float32 (as convert.py does): ~1e-7 relative.
CHUNK_POSE_TOL = 2e-6


@pytest.fixture(scope="module")
def chunk(tmp_path_factory, rendered):
    root = tmp_path_factory.mktemp("re10k_chunk")
    other = render(writer.demo_spec(4, seed=9))
    ws = writer.write_chunk([(rendered, SCENE), (other, OTHER)], root)
    return root, ws, other


def test_round_trip_chunk(chunk, rendered):
    root, ws, other = chunk
    adapter = get_adapter("realestate10k", str(root))
    scenes = {s.scene: s for s in adapter.discover()}
    assert set(scenes) == {SCENE, OTHER} and scenes[SCENE].extra == ("chunk", "train/000000.torch", 0)
    clip = adapter.load_clip(scenes[SCENE], list(range(10)), _meta(SCENE, list(range(10))))
    np.testing.assert_allclose(clip.c2w, ws[0].expected_c2w(rendered.c2w), atol=CHUNK_POSE_TOL)
    np.testing.assert_allclose(clip.intrinsics, rendered.intrinsics, atol=1e-4)
    assert_lossy_close(clip.rgb, rendered.rgb, luma_tol=3.0)  # JPEG q95
    assert clip.meta.extra["frames_from"] == "chunk" and clip.meta.extra["timestamps_us"] == ws[0].frame_ids
    sub = adapter.load_clip(scenes[OTHER], [7, 2], _meta(OTHER, [7, 2]))
    assert_lossy_close(sub.rgb, other.rgb[[7, 2]], luma_tol=3.0)


def _edit_chunk(path, fn):
    import torch

    examples = torch.load(path, weights_only=True)
    fn(examples)
    torch.save(examples, path)


def test_chunk_bad_inputs(chunk, tmp_path):
    import torch

    root, ws, _ = chunk
    dst = tmp_path / "c"
    shutil.copytree(root, dst)
    path = dst / "train" / "000000.torch"
    # A corrupt JPEG fails the clips that need it, naming the chunk, the example and the image.
    _edit_chunk(path, lambda ex: ex[0]["images"].__setitem__(3, ex[0]["images"][3][:100].clone()))
    adapter = get_adapter("realestate10k", str(dst))
    scene = next(s for s in adapter.discover() if s.scene == SCENE)
    with pytest.raises(ClipError) as exc:
        adapter.load_clip(scene, [2, 3], _meta(SCENE, [2, 3]))
    assert exc.value.path == str(path) and f"image 3 (timestamp {ws[0].frame_ids[3]} us)" in exc.value.reason
    adapter.load_clip(scene, [0, 1], _meta(SCENE, [0, 1]))
    # A missing key: the scene is listed and fails with the reason.
    _edit_chunk(path, lambda ex: ex[1].pop("cameras"))
    scenes = {s.scene: s for s in get_adapter("realestate10k", str(dst)).discover()}
    with pytest.raises(ClipError, match=r"is missing \['cameras'\]") as exc:
        get_adapter("realestate10k", str(dst)).load_clip(scenes[OTHER], [0], _meta(OTHER, [0]))
    assert exc.value.path == str(path)
    # A chunk that needs arbitrary unpickling is refused.
    torch.save([{"key": "abc", "payload": np.arange(3)}], dst / "train" / "000001.torch")
    scenes = {s.scene: s for s in get_adapter("realestate10k", str(dst)).discover()}
    with pytest.raises(ClipError, match="refused to load.*weights_only=True"):
        get_adapter("realestate10k", str(dst)).load_clip(
            scenes["train/chunk-000001"], [0], _meta("train/chunk-000001", [0])
        )


def test_same_sequence_in_two_places(chunk, tmp_path, rendered):
    root, _, _ = chunk
    dst = tmp_path / "d"
    shutil.copytree(root, dst)
    writer.write(rendered, dst, SCENE)  # the camera file + frames of a sequence also in the chunk
    adapter = get_adapter("realestate10k", str(dst))
    scene = next(s for s in adapter.discover() if s.scene == SCENE)
    with pytest.raises(ClipError, match=r"appears more than once: train/\w+\.txt, train/000000\.torch"):
        adapter.load_clip(scene, [0], _meta(SCENE, [0]))
    only = get_adapter("realestate10k", str(dst), {"form": "camera_files"})
    assert [s.extra for s in only.discover()] == [()]


def test_inspect_chunk_cli(chunk, tmp_path):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    root, ws, _ = chunk
    res = CliRunner().invoke(app, ["inspect", "realestate10k", str(root / "train" / "000000.torch"), "--json"])
    assert res.exit_code == 0, res.output
    reps = json.loads(res.output)
    assert [r["scene"] for r in reps] == [SCENE.split("/")[1], OTHER.split("/")[1]]
    like_txt = inspect_camera_file(SAMPLE)
    assert all(set(r) == set(like_txt) for r in reps)
    assert reps[0]["image_size"] == [64, 36] and reps[0]["problems"] == [] and reps[0]["num_frames"] == 10
    assert reps[0]["timestamps_us"] == ws[0].frame_ids


def test_demo_scenes_use_video_and_chunk(tmp_path):
    from pipeline.demo.build_demo import write_demo_data

    write_demo_data(tmp_path, ["realestate10k"], scenes=2)
    adapter = get_adapter("realestate10k", str(tmp_path / "realestate10k"))
    got = {}
    for scene in adapter.discover():
        clip = adapter.load_clip(scene, [0, 1], _meta(scene.scene, [0, 1]))
        got[clip.meta.extra["frames_from"]] = clip.rgb.shape
    assert got == {"video": (2, 36, 64, 3), "chunk": (2, 36, 64, 3)}


def test_ingest_stage_passes_list_options(written):
    """The ingest stage built its adapters from scalar options only: a list (video_pattern) was dropped."""
    from pipeline.config import BuildConfig
    from stages.ingest.stage import adapter_for

    root, _ = written
    cfg = BuildConfig.model_validate(
        {
            "output": "/tmp/unused",
            "datasets": {
                "realestate10k": {
                    "root": str(root),
                    "options": {"video_pattern": ["dl/{video_id}.mp4"], "frames": "video"},
                }
            },
        }
    )
    adapter = adapter_for(cfg.resolved(), "realestate10k")
    assert adapter.opts.video_pattern == ["dl/{video_id}.mp4"] and adapter.opts.frames == "video"
