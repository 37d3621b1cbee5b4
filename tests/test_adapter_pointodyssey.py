"""PointOdyssey adapter: render -> official layout -> adapter, plus malformed inputs."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipeline import geometry as geo
from pipeline.clip import ClipError, ClipMeta
from pipeline.demo.render import render
from pipeline.demo.writers import pointodyssey as writer
from stages.ingest import get_adapter

DEPTH_STEP = 1000.0 / 65535.0  # one depth unit; the exporter truncates, so error < one step


@pytest.fixture(scope="module")
def rendered():
    return render(writer.demo_spec(0, seed=3))


@pytest.fixture(scope="module")
def written(tmp_path_factory, rendered):
    root = tmp_path_factory.mktemp("po")
    ws = writer.write(rendered, root, writer.default_scene_id(0))
    return root, ws


def _meta(scene, frames):
    return ClipMeta(
        dataset="pointodyssey",
        scene=scene,
        clip_id=f"{scene}:{frames[0]}",
        frame_indices=list(frames),
        dynamic=True,
        real=False,
        depth_source="gt",
        track_source="gt",
    )


def _load(root, frames, options=None):
    adapter = get_adapter("pointodyssey", str(root), options)
    (scene,) = adapter.discover()
    return adapter.load_clip(scene, frames, _meta(scene.scene, frames))


def _copy(written, tmp_path):
    root, ws = written
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst, dst / ws.scene_id


def _rewrite_anno(scene_dir, **changes):
    with np.load(scene_dir / "anno.npz") as z:
        anno = {k: z[k] for k in z.files}
    anno.update(changes)
    np.savez(scene_dir / "anno.npz", **anno)
    return anno


# -- round trip ---------------------------------------------------------------------------------


def test_discover_splits(tmp_path, rendered):
    for i in range(3):
        writer.write(rendered, tmp_path, writer.default_scene_id(i))
    (tmp_path / "train" / "not_a_scene").mkdir()
    scenes = get_adapter("pointodyssey", str(tmp_path)).discover()
    assert [s.scene for s in scenes] == ["test/demo_scene_002", "train/demo_scene_000", "val/demo_scene_001"]
    assert all(s.num_frames == rendered.spec.num_frames for s in scenes)


def test_round_trip(written, rendered):
    root, ws = written
    frames = [0, 2, 3, 7, 9]
    clip = _load(root, frames)
    # Poses and intrinsics (the file stores float32).
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(rendered.c2w[frames]), atol=1e-5)
    np.testing.assert_allclose(clip.intrinsics, rendered.intrinsics[frames], atol=1e-4)
    # Depth: 16-bit units of 1000/65535 m, truncated.
    truth = rendered.depth[frames]
    assert clip.depth_valid.all()
    err = truth - clip.depth
    assert err.min() >= -1e-5 and err.max() <= DEPTH_STEP + 1e-5
    # JPEG (quality 95, 4:4:4): close, not exact.
    diff = np.abs(clip.rgb.astype(int) - rendered.rgb[frames])
    assert diff.mean() < 6 and diff.max() < 60
    # Tracks: equal to the rendered truth in PointOdyssey's world, same visibility.
    np.testing.assert_allclose(clip.tracks, ws.expected_points(rendered.tracks_world[frames]), atol=1e-5)
    np.testing.assert_array_equal(clip.track_visible, rendered.tracks_visible[frames])
    assert clip.track_visible.any()


def test_visible_tracks_project_onto_depth(written):
    root, _ = written
    frames = list(range(16))
    clip = _load(root, frames)
    h, w = clip.depth.shape[1:]
    hits = total = 0
    for t in range(len(frames)):
        vis = clip.track_visible[t]
        uv, z = geo.project(clip.tracks[t, vis], clip.intrinsics[t], clip.c2w[t])
        assert np.all(z > 0)
        assert np.all((uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h))
        col, row = np.floor(uv).astype(int).T
        d = clip.depth[t, row, col]
        hits += int(np.sum(np.abs(d - z) < 0.03 * z + 2 * DEPTH_STEP))
        total += len(z)
    assert total > 0 and hits / total > 0.9


def test_compressed_anno_and_max_tracks(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        anno = {k: z[k] for k in z.files}
    np.savez_compressed(scene_dir / "anno.npz", **anno)
    ref = _load(written[0], [1, 4])
    clip = _load(root, [1, 4])
    np.testing.assert_array_equal(clip.tracks, ref.tracks)
    np.testing.assert_array_equal(clip.c2w, ref.c2w)
    assert _load(root, [1, 4], {"max_tracks": 10}).tracks.shape == (2, 10, 3)


def test_nonfinite_track_points_become_invisible(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        trajs = z["trajs_3d"].copy()
    trajs[2, :5] = np.inf
    _rewrite_anno(scene_dir, trajs_3d=trajs)
    clip = _load(root, [1, 2])
    assert not clip.track_visible[1, :5].any()
    assert np.all(np.isfinite(clip.tracks))


# -- ground-truth hygiene (the filters of the authors' loaders) -------------------------------


def test_tracks_with_impossible_jumps_are_dropped_and_counted(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        trajs, valids = z["trajs_3d"].copy(), z["valids"].copy()
    trajs[5, 3] += [40.0, 0.0, 0.0]  # a one-frame glitch of 40 m
    trajs[6:, 4] += [0.0, 0.0, 3.0]  # teleports 3 m between frames 5 and 6, stays there
    trajs[3, 7] += [0.0, 60.0, 0.0]  # 60 m off where the point is flagged invalid: no claim, kept
    valids[3, 7] = False
    trajs[:, 8] += np.arange(len(trajs))[:, None] * [0.5, 0.0, 0.0]  # 0.5 m/frame (15 m/s): possible, kept
    _rewrite_anno(scene_dir, trajs_3d=trajs, valids=valids)
    n = trajs.shape[1]
    clip = _load(root, list(range(10)))
    assert clip.tracks.shape[1] == n - 2 and clip.meta.qc["gt_tracks"] == {"dropped_jumps": 2, "num_tracks": n}
    kept = np.delete(np.arange(n), [3, 4])
    np.testing.assert_allclose(clip.tracks, trajs[:10, kept], atol=1e-6)
    # The rule is per source frame: frames 4 and 8 (gap 4) of track 4 are 3 m apart, 0.75 m/frame.
    assert _load(root, [4, 8]).tracks.shape[1] == n
    assert _load(root, [4, 8], {"max_track_jump_m": 0.5}).meta.qc["gt_tracks"]["dropped_jumps"] == 1


@pytest.mark.parametrize(
    "empty", [np.array([None], dtype=object), np.zeros((16, 0, 3), np.float32)], ids=["None-placeholder", "no-points"]
)
def test_scene_with_empty_3d_tracks_loads_without_tracks(written, tmp_path, empty):
    root, scene_dir = _copy(written, tmp_path)
    changes = {"trajs_3d": empty}
    if empty.dtype.hasobject:  # the release's placeholder scenes carry no usable track arrays at all
        changes.update(visibs=np.array([None], dtype=object), valids=np.array([None], dtype=object))
    _rewrite_anno(scene_dir, **changes)
    clip = _load(root, [0, 3, 5])
    assert clip.tracks is None and clip.track_visible is None and clip.meta.qc["gt_tracks"] == {"missing": True}
    np.testing.assert_allclose(clip.c2w, _load(written[0], [0, 3, 5]).c2w)


def test_object_track_array_with_content_is_still_refused(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    _rewrite_anno(scene_dir, trajs_3d=np.array([None, None], dtype=object))
    _expect(root, [0, 1], "anno.npz", "refusing to unpickle")


# -- malformed inputs -----------------------------------------------------------------------


def _expect(root, frames, *needles):
    with pytest.raises(ClipError) as info:
        _load(root, frames)
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_truncated_jpeg(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    p = scene_dir / "rgbs" / "rgb_00003.jpg"
    p.write_bytes(p.read_bytes()[:200])
    _expect(root, [2, 3], "rgb_00003.jpg", "truncated")


def test_nan_in_extrinsics(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        ext = z["extrinsics"].copy()
    ext[4, 0, 3] = np.nan
    _rewrite_anno(scene_dir, extrinsics=ext)
    _expect(root, [3, 4], "anno.npz", "extrinsics contains NaN/inf")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda k: k[:, 0, 0].__setitem__(slice(None), 0.0), "focal"),  # was refused by Clip.validate, no file
        (lambda k: k[:, 1, 1].__setitem__(slice(None), -500.0), "focal"),
        (lambda k: k[:, 0, 1].__setitem__(slice(None), 300.0), "skew"),  # was dropped silently
        (lambda k: k[:, 2].__setitem__(slice(None), [5.0, 5.0, 0.0]), "bottom row"),
    ],
)
def test_intrinsics_that_are_no_pinhole_camera_name_the_annotations(written, tmp_path, edit, needle):
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        k = z["intrinsics"].copy()
    edit(k)
    _rewrite_anno(scene_dir, intrinsics=k)
    _expect(root, [3, 4], "anno.npz", needle)


@pytest.mark.parametrize("key", ["intrinsics", "extrinsics", "trajs_3d"])
@pytest.mark.parametrize("kind", ["U", "c"])
def test_annotations_that_are_not_real_numbers_are_refused(written, tmp_path, key, kind):
    """Text arrays were parsed as numbers by astype (an export that wrote strings was trusted) and
    complex ones lost their imaginary part with a warning; both now name the array and the file."""
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        arr = z[key]
    _rewrite_anno(scene_dir, **{key: arr.astype(str) if kind == "U" else arr.astype(np.complex64)})
    _expect(root, [3, 4], "anno.npz", key, "real numbers")


def test_annotation_frame_count_mismatch(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        anno = {k: z[k][:-1] for k in z.files}
    np.savez(scene_dir / "anno.npz", **anno)
    _expect(root, [0, 1], "anno.npz", "annotations cover 15 frames but the images", "rgb_00015.jpg (16 frames)")


def test_arrays_disagree_on_frames(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        vis = z["visibs"][:-2]
    _rewrite_anno(scene_dir, visibs=vis)
    _expect(root, [0], "anno.npz", "disagree")


def test_wrong_extrinsics_shape(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        ext = z["extrinsics"][:, :3, :]
    _rewrite_anno(scene_dir, extrinsics=ext)
    _expect(root, [0], "anno.npz", "extrinsics must be (T,4,4)")


def test_missing_key_and_not_a_zip(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        anno = {k: z[k] for k in z.files if k != "trajs_3d"}
    np.savez(scene_dir / "anno.npz", **anno)
    _expect(root, [0], "anno.npz", "no 'trajs_3d'")
    (scene_dir / "anno.npz").write_bytes(b"garbage")
    _expect(root, [0], "anno.npz", "unreadable .npz")


def test_truncated_stored_member(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    data = (scene_dir / "anno.npz").read_bytes()
    # Cut the archive inside its last member: the zip directory is lost, so it is unreadable.
    (scene_dir / "anno.npz").write_bytes(data[: len(data) // 2])
    _expect(root, [0], "anno.npz")


def test_missing_depth_and_8bit_depth(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    p = scene_dir / "depths" / "depth_00005.png"
    p.unlink()
    _expect(root, [5], "depth_00005.png", "missing")
    Image.fromarray(np.zeros((36, 64), np.uint8)).save(p)
    _expect(root, [5], "depth_00005.png", "16-bit")


def test_depth_size_mismatch(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    Image.fromarray(np.ones((10, 10), np.uint16)).save(scene_dir / "depths" / "depth_00001.png")
    _expect(root, [1], "depth_00001.png", "10x10")


def test_gap_in_frame_numbers(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    (scene_dir / "rgbs" / "rgb_00015.jpg").rename(scene_dir / "rgbs" / "rgb_00017.jpg")
    _expect(root, [15], "anno.npz", "numbered up to rgb_00017.jpg")  # an image beyond the annotations


def test_saturated_and_zero_depth_invalid(written, tmp_path):
    root, scene_dir = _copy(written, tmp_path)
    p = scene_dir / "depths" / "depth_00000.png"
    raw = np.asarray(Image.open(p)).astype(np.uint16).copy()
    raw[0, :4] = 65535
    raw[1, :4] = 0
    Image.fromarray(raw).save(p)
    clip = _load(root, [0])
    assert not clip.depth_valid[0, 0, :4].any() and not clip.depth_valid[0, 1, :4].any()
    assert clip.depth_valid[0, 2:].all()


def test_stored_members_are_read_by_rows(written):
    """The fixture's anno.npz is np.savez output (stored), which the row reader handles."""
    root, ws = written
    with zipfile.ZipFile(root / ws.scene_id / "anno.npz") as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    buf = io.BytesIO((root / ws.scene_id / "info.npz").read_bytes())
    with np.load(buf) as info:
        assert tuple(info["trajs_3d"]) == (16, 96, 3)


def test_float16_annotations_load(written, tmp_path, rendered):
    """Older exports stored annotations as float16: rotations are then only ~1e-3 orthonormal."""
    root, scene_dir = _copy(written, tmp_path)
    _, ws = written
    with np.load(scene_dir / "anno.npz") as z:
        anno = {k: (z[k].astype(np.float16) if z[k].dtype.kind == "f" else z[k]) for k in z.files}
    np.savez(scene_dir / "anno.npz", **anno)
    clip = _load(root, [0, 5])
    assert np.all(geo.rotation_error(clip.c2w[:, :3, :3]) < 1e-9)  # projected back onto SO(3)
    np.testing.assert_allclose(clip.c2w, ws.expected_c2w(rendered.c2w[[0, 5]]), atol=1e-2)


def test_a_missing_image_fails_only_the_clips_that_use_it(written, tmp_path):
    """A deleted middle image: clips without that frame load; those with it fail naming the image
    (the scene's frame count came from the images, so every clip failed on anno.npz)."""
    root, scene_dir = _copy(written, tmp_path)
    (scene_dir / "rgbs" / "rgb_00005.jpg").unlink()
    assert _load(root, [0, 1, 2]).rgb.shape[0] == 3
    _expect(root, [4, 5], "rgb_00005.jpg", "missing")


def test_a_missing_last_image_fails_only_the_clips_that_use_it(written, tmp_path):
    """A deleted last image: the scene keeps its length (from its camera table), the clips without
    that frame load and those with it fail naming the image (the count came from the images, one
    short of the table, so every clip of the scene failed on the table)."""
    root, scene_dir = _copy(written, tmp_path)
    n = get_adapter("pointodyssey", str(root)).discover()[0].num_frames
    last = scene_dir / "rgbs" / f"rgb_{n - 1:05d}.jpg"
    last.unlink()
    assert get_adapter("pointodyssey", str(root)).discover()[0].num_frames == n
    assert _load(root, [0, 1, 2]).rgb.shape[0] == 3
    _expect(root, [n - 2, n - 1], last.name, "missing")


def test_a_root_named_with_glob_characters_is_read_literally(written, tmp_path):
    """Discovery globbed under the root as a pattern: a root 'po[1]' found no scene (or a sibling's)."""
    root, _ = written
    shutil.copytree(root, tmp_path / "po[1]")
    shutil.copytree(root, tmp_path / "po1")
    (scene,) = get_adapter("pointodyssey", str(tmp_path / "po[1]")).discover()
    assert _load(tmp_path / "po[1]", [0, 1]).rgb.shape[0] == 2 and scene.num_frames > 2


# -- on an object store ---------------------------------------------------------------------------


def _bigger_scene(written, tmp_path, reps_t: int = 6, reps_n: int = 96, compressed: bool = False):
    """The demo scene with ``reps_t`` times its frames (images copied, annotations tiled in time) and
    ``reps_n`` times its tracks: an anno.npz of ~20 MB, of which a clip needs a few rows."""
    root, scene_dir = _copy(written, tmp_path)
    with np.load(scene_dir / "anno.npz") as z:
        anno = {k: z[k] for k in z.files}
    t0 = anno["extrinsics"].shape[0]
    for sub, stem, ext in (("rgbs", "rgb", "jpg"), ("depths", "depth", "png")):
        for t in range(t0, t0 * reps_t):
            shutil.copy(scene_dir / sub / f"{stem}_{t % t0:05d}.{ext}", scene_dir / sub / f"{stem}_{t:05d}.{ext}")
    big = {}
    for k, v in anno.items():
        v = np.concatenate([v] * reps_t, axis=0)
        big[k] = np.concatenate([v] * reps_n, axis=1) if k in ("trajs_2d", "trajs_3d", "valids", "visibs") else v
    (np.savez_compressed if compressed else np.savez)(scene_dir / "anno.npz", **big)
    return root, scene_dir


def _to_s3(s3_env, root, prefix):
    return get_adapter("pointodyssey", s3_env.put_tree(root, prefix), {"max_tracks": 100_000})


def _same_clip(a, b):
    for name in ("c2w", "intrinsics", "depth", "rgb", "tracks", "track_visible"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_a_clip_on_s3_fetches_its_rows_not_the_whole_annotations(written, tmp_path, s3_env, s3_traffic):
    """A clip needs a few rows of each annotation array; the reader seeks to them. On an object
    store each seek fetched s3fs's 50 MiB read-ahead block: the whole file (hundreds of MB in the
    release) for every clip. Now: each run of nearby rows in one request, with a small read-ahead."""
    root, scene_dir = _bigger_scene(written, tmp_path)
    frames = [33, 36, 39, 42]  # stride 3, inside one time tile (its tracks move smoothly)
    local = get_adapter("pointodyssey", str(root), {"max_tracks": 100_000})
    (scene,) = local.discover()
    want = local.load_clip(scene, frames, _meta(scene.scene, frames))
    assert want.tracks.shape[1] > 1000  # every tiled track kept
    remote = _to_s3(s3_env, root, "po-rows")
    (rscene,) = remote.discover()
    s3_traffic["bytes"] = 0
    got = remote.load_clip(rscene, frames, _meta(rscene.scene, frames))
    _same_clip(got, want)
    anno = (scene_dir / "anno.npz").stat().st_size
    images = sum(
        (scene_dir / sub / f"{stem}_{t:05d}.{ext}").stat().st_size
        for t in frames
        for sub, stem, ext in (("rgbs", "rgb", "jpg"), ("depths", "depth", "png"))
    )
    assert anno > 15e6
    assert s3_traffic["bytes"] < images + 0.1 * anno, (s3_traffic["bytes"], images, anno)


def test_compressed_annotations_on_s3_load_whole(written, tmp_path, s3_env):
    """A compressed anno.npz cannot be read by rows: its arrays are read whole, on S3 as locally."""
    root, scene_dir = _bigger_scene(written, tmp_path, reps_t=2, reps_n=4, compressed=True)
    with zipfile.ZipFile(scene_dir / "anno.npz") as zf:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
    frames = [3, 4, 20, 21]
    local = get_adapter("pointodyssey", str(root), {"max_tracks": 100_000})
    (scene,) = local.discover()
    remote = _to_s3(s3_env, root, "po-deflated")
    (rscene,) = remote.discover()
    _same_clip(
        remote.load_clip(rscene, frames, _meta(rscene.scene, frames)),
        local.load_clip(scene, frames, _meta(scene.scene, frames)),
    )
