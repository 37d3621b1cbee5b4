"""Dynamic Replica adapter: round trip through the fixture writer, and malformed inputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import geometry as geo
from pipeline.clip import ClipError, ClipMeta
from pipeline.demo.render import render
from pipeline.demo.writers import dynamic_replica as writer
from stages.ingest import get_adapter

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "samples" / "dynamic_replica"


@pytest.fixture(scope="module")
def rendered():
    return render(writer.demo_spec(0, seed=11))


def _write(rendered, root: Path):
    ws = writer.write(rendered, root, writer.default_scene_id(1))
    adapter = get_adapter("dynamic_replica", str(root))
    return ws, adapter


def _load(adapter, scene, frames=None):
    frames = list(range(scene.num_frames)) if frames is None else frames
    meta = ClipMeta("dynamic_replica", scene.scene, "c", frames, dynamic=True, real=False)
    return adapter.load_clip(scene, frames, meta)


def test_round_trip(rendered, tmp_path):
    ws, adapter = _write(rendered, tmp_path)
    scenes = adapter.discover()
    assert [s.scene for s in scenes] == [ws.scene_id]
    assert scenes[0].num_frames == rendered.spec.num_frames
    clip = _load(adapter, scenes[0])
    assert np.abs(clip.c2w - ws.expected_c2w(rendered.c2w)).max() < 1e-5
    assert np.abs(clip.intrinsics - rendered.intrinsics).max() < 1e-6
    assert np.array_equal(clip.rgb, rendered.rgb)
    # float16 storage: |error| <= 2^-11 relative (round to nearest, 10 mantissa bits).
    assert np.all(np.abs(clip.depth - rendered.depth) <= rendered.depth * 2.0**-11 + 1e-7)
    assert clip.depth_valid.all()
    # Tracks equal the rendered truth in the dataset world.
    assert np.abs(clip.tracks - ws.expected_points(rendered.tracks_world)).max() < 1e-5
    assert np.array_equal(clip.track_visible, rendered.tracks_visible)
    # ... and visible points project onto their pixel with the depth map's depth.
    for t in range(clip.num_frames):
        v = clip.track_visible[t]
        uv, z = geo.project(clip.tracks[t, v], clip.intrinsics[t], clip.c2w[t])
        j, i = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        d = clip.depth[t, i, j]
        assert np.median(np.abs(d - z) / z) < 0.02


def test_flagged_points_outside_the_image_or_behind_the_camera_are_invisible(rendered, tmp_path):
    """Like the authors' loaders: ``verts_inds_vis`` counts only where the point is in view."""
    ws, adapter = _write(rendered, tmp_path)
    scene = adapter.discover()[0]
    traj_dir = tmp_path / ws.scene_id / "trajectories"
    written = [torch.load(traj_dir / f"{t:06d}.pth", weights_only=True) for t in range(scene.num_frames)]
    off = sum(int((f["verts_inds_vis"].numpy() & ~rendered.tracks_visible[t]).sum()) for t, f in enumerate(written))
    assert off > 0  # the writer flags points outside the image visible, as the release's flag does
    clip = _load(adapter, scene)
    assert np.array_equal(clip.track_visible, rendered.tracks_visible)
    assert clip.meta.qc["gt_tracks"] == {"hidden_off_image": off}
    # Every point flagged, and one moved 2 m behind the camera on its optical axis (it projects
    # onto the principal point, inside the image, with negative depth).
    c2w = ws.expected_c2w(rendered.c2w)
    for t, f in enumerate(written):
        f["verts_inds_vis"][:] = True
        f["traj_3d_world"][0] = torch.from_numpy((c2w[t, :3, 3] - 2.0 * c2w[t, :3, 2]).astype(np.float32))
        torch.save(f, traj_dir / f"{t:06d}.pth")
    clip = _load(adapter, scene)
    assert not clip.track_visible[:, 0].any()
    for t in range(clip.num_frames):
        uv, z = geo.project(clip.tracks[t].astype(np.float64), clip.intrinsics[t], clip.c2w[t])
        h, w = clip.rgb.shape[1:3]
        inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
        assert np.array_equal(clip.track_visible[t], inside)


def test_sub_window_and_right_view_filter(rendered, tmp_path):
    ws, adapter = _write(rendered, tmp_path)
    # A right-view entry set (here duplicating the left files) must not create a default scene.
    ann = tmp_path / "train" / "frame_annotations_train.jgz"
    entries = json.loads(gzip.decompress(ann.read_bytes()))
    right = [dict(e, camera_name="right") for e in entries]
    ann.write_bytes(gzip.compress(json.dumps(entries + right).encode()))
    adapter = get_adapter("dynamic_replica", str(tmp_path))
    assert [s.scene for s in adapter.discover()] == [ws.scene_id]
    both = get_adapter("dynamic_replica", str(tmp_path), {"views": ["left", "right"]}).discover()
    assert [s.scene for s in both] == [ws.scene_id, ws.scene_id.replace("_left", "_right")]
    clip = _load(adapter, adapter.discover()[0], [2, 4, 6])
    assert np.abs(clip.c2w - ws.expected_c2w(rendered.c2w[[2, 4, 6]])).max() < 1e-5


def test_trajectory_files_load_weights_only(rendered, tmp_path):
    ws, _ = _write(rendered, tmp_path)
    f = tmp_path / "train" / ws.scene_id.split("/")[1] / "trajectories" / "000000.pth"
    obj = torch.load(f, weights_only=True)
    assert set(obj) == {"traj_3d_world", "traj_2d", "verts_inds_vis", "img", "instances"}
    assert obj["traj_2d"].shape == (rendered.spec.num_tracks, 3)


def _rchar() -> int:
    """Bytes this process has read through read() calls (Linux): a mapped file's pages are not."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_a_clip_reads_the_trajectories_not_the_images_they_carry(rendered, tmp_path):
    """A release trajectory file also holds the frame's image (``img``: 2.7 MB at 1280x720), which
    d4s never uses: a local file is memory-mapped, so only the arrays read are read."""
    ws, adapter = _write(rendered, tmp_path)
    traj = sorted((_scene_dir(tmp_path, ws) / "trajectories").glob("*.pth"))
    for f in traj:  # the release's image size
        obj = torch.load(f, weights_only=True)
        obj["img"] = torch.randint(0, 256, (720, 1280, 3), dtype=torch.uint8)
        torch.save(obj, f)
    scene = adapter.discover()[0]
    frames = [0, 1, 2, 3]
    want = _load(adapter, scene, frames)
    before = _rchar()
    got = _load(adapter, scene, frames)
    read = _rchar() - before
    np.testing.assert_array_equal(got.tracks, want.tracks)
    images = 4 * 720 * 1280 * 3
    assert read < 0.25 * images, (read, images)
    # a legacy (not zip) trajectory file cannot be mapped: it is read whole, with the same result
    for f in traj:
        torch.save(torch.load(f, weights_only=True), f, _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(_load(adapter, scene, frames).tracks, want.tracks)


def _scene_dir(tmp_path, ws):
    return tmp_path / "train" / ws.scene_id.split("/")[1]


def _edit_annotations(tmp_path, fn):
    ann = tmp_path / "train" / "frame_annotations_train.jgz"
    entries = json.loads(gzip.decompress(ann.read_bytes()))
    fn(entries)
    ann.write_bytes(gzip.compress(json.dumps(entries).encode()))


def _expect_error(tmp_path, needle_path: str, needle_reason: str):
    adapter = get_adapter("dynamic_replica", str(tmp_path))
    with pytest.raises(ClipError) as err:
        _load(adapter, adapter.discover()[0])
    assert needle_path in str(err.value.path) and needle_reason in err.value.reason, str(err.value)


def test_truncated_image(rendered, tmp_path):
    ws, _ = _write(rendered, tmp_path)
    p = _scene_dir(tmp_path, ws) / "images" / f"{ws.scene_id.split('/')[1]}-0003.png"
    p.write_bytes(p.read_bytes()[:60])
    _expect_error(tmp_path, p.name, "truncated")


def test_nan_in_viewpoint(rendered, tmp_path):
    ws, _ = _write(rendered, tmp_path)
    _edit_annotations(tmp_path, lambda es: es[2]["viewpoint"]["T"].__setitem__(1, float("nan")))
    _expect_error(tmp_path, "frame_annotations_train.jgz", "NaN")


def test_unknown_intrinsics_format(rendered, tmp_path):
    ws, _ = _write(rendered, tmp_path)
    _edit_annotations(tmp_path, lambda es: es[0]["viewpoint"].__setitem__("intrinsics_format", "pixels"))
    _expect_error(tmp_path, "frame_annotations_train.jgz", "intrinsics_format")


@pytest.mark.parametrize(
    "field, value, needle",
    [
        (("depth", "scale_adjustment"), 0, "scale_adjustment"),  # was read as 1.0
        (("depth", "scale_adjustment"), -1.0, "scale_adjustment"),  # was a frame with no valid depth
        (("depth", "scale_adjustment"), "abc", "scale_adjustment"),  # was a ValueError naming no file
        (("viewpoint", "focal_length"), [0.0, 0.0], "focal_length"),  # was refused by Clip.validate, no file
        (("viewpoint", "focal_length"), [-2.0, -2.0], "focal_length"),
        (("image", "path"), 12345, "image.path"),  # was a TypeError naming no file
        (("image", "size"), ["x", "y"], "image.size"),  # was a ValueError naming no file
        (("image", "path"), "../../../../etc/passwd", "leaves the dataset root"),  # was PathEscapeError, no file
    ],
)
def test_bad_annotation_values_name_the_annotation_file(rendered, tmp_path, field, value, needle):
    ws, _ = _write(rendered, tmp_path)
    _edit_annotations(tmp_path, lambda es: es[1][field[0]].__setitem__(field[1], value))
    _expect_error(tmp_path, "frame_annotations_train.jgz", needle)


def test_depth_size_mismatch(rendered, tmp_path):
    ws, _ = _write(rendered, tmp_path)
    p = _scene_dir(tmp_path, ws) / "depths" / f"{ws.scene_id.split('/')[1]}_0001.geometric.png"
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(p)
    _expect_error(tmp_path, p.name, "depth is 10x10")


def test_corrupt_trajectory(rendered, tmp_path):
    ws, _ = _write(rendered, tmp_path)
    p = _scene_dir(tmp_path, ws) / "trajectories" / "000004.pth"
    p.write_bytes(p.read_bytes()[:100])
    _expect_error(tmp_path, "000004.pth", "unreadable trajectory")


def test_trajectory_point_count_mismatch(rendered, tmp_path):
    ws, _ = _write(rendered, tmp_path)
    p = _scene_dir(tmp_path, ws) / "trajectories" / "000005.pth"
    obj = torch.load(p, weights_only=True)
    obj["traj_3d_world"] = obj["traj_3d_world"][:-3]
    obj["verts_inds_vis"] = obj["verts_inds_vis"][:-3]
    torch.save(obj, p)
    _expect_error(tmp_path, "000005.pth", "tracked points")


def test_missing_frame_entry(rendered, tmp_path):
    ws, adapter = _write(rendered, tmp_path)
    scene = adapter.discover()[0]
    _edit_annotations(tmp_path, lambda es: es.pop(3))
    fresh = get_adapter("dynamic_replica", str(tmp_path))
    with pytest.raises(ClipError) as err:
        _load(fresh, scene)  # the scene was planned with 10 frames; the annotations now hold 9
    assert "frame_annotations_train.jgz" in err.value.path and "annotated frames" in err.value.reason


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda es: es[3].__setitem__("frame_number", es[2]["frame_number"]), "duplicate frame numbers"),
        # a copied entry naming another frame's files loaded as a duplicated frame of the clip
        (lambda es: es[3]["image"].__setitem__("path", es[2]["image"]["path"]), "image"),
        (lambda es: es[3]["depth"].__setitem__("path", es[2]["depth"]["path"]), "depth"),
    ],
)
def test_a_sequence_with_repeated_frames_fails_alone(rendered, tmp_path, edit, needle):
    """A sequence whose entries repeat a frame number or another frame's files fails its own
    clips, naming the annotation file; it used to fail the whole split (number) or load the same
    frame twice (files)."""
    ws, _ = _write(rendered, tmp_path)
    other = writer.write(rendered, tmp_path, writer.default_scene_id(2))
    seq = ws.scene_id.split("/")[1].rsplit("_source_", 1)[0]

    def edit_one(entries):
        edit([e for e in entries if e["sequence_name"] == seq])

    _edit_annotations(tmp_path, edit_one)
    scenes = {s.scene: s for s in get_adapter("dynamic_replica", str(tmp_path)).discover()}
    fresh = get_adapter("dynamic_replica", str(tmp_path))
    assert _load(fresh, scenes[other.scene_id]).num_frames == 10  # the other sequence loads
    with pytest.raises(ClipError) as err:
        _load(fresh, scenes[ws.scene_id])
    assert "frame_annotations_train.jgz" in err.value.path and needle in err.value.reason, str(err.value)


def test_unreadable_annotations(rendered, tmp_path):
    _write(rendered, tmp_path)
    (tmp_path / "train" / "frame_annotations_train.jgz").write_bytes(b"not gzip")
    (scene,) = get_adapter("dynamic_replica", str(tmp_path)).discover()  # listed, failing with the reason
    with pytest.raises(ClipError) as err:
        scene.refuse_if_unreadable()
    assert "frame_annotations_train.jgz" in err.value.path and "gzip JSON" in err.value.reason


@pytest.mark.skipif(not SAMPLES.exists(), reason="no real Dynamic Replica sample in shared/datasets/samples")
def test_real_sample():
    adapter = get_adapter("dynamic_replica", str(SAMPLES))
    scenes = adapter.discover()
    assert scenes
    s = scenes[0]
    clip = _load(adapter, s, list(range(min(4, s.num_frames))))
    assert np.all(geo.rotation_error(clip.c2w[:, :3, :3]) < 1e-4)
    h, w = clip.rgb.shape[1:3]
    assert np.all((clip.intrinsics[:, 0] > 0.3 * w) & (clip.intrinsics[:, 0] < 5 * w))
    assert clip.depth_valid.mean() > 0.5
