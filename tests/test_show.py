"""``d4s show``: one clip from its shard into a Rerun recording, read back with Rerun's dataframe API."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner
from viz_output import FAILED_REASON, write_output

from pipeline.cli import app

rr = pytest.importorskip("rerun", reason="d4s show needs rerun-sdk (pip install -e '.[dev]')")
pytest.importorskip("datafusion", reason="reading a recording back needs rerun-sdk[catalog] (in the dev extra)")
runner = CliRunner()
KEY = "pointodyssey__scene1__000000"
ENTITIES = {
    "/gt",
    "/gt/camera_path",
    "/gt/camera",
    "/gt/camera/image",
    "/gt/camera/image/rgb",
    "/gt/camera/image/depth",
    "/gt/camera/image/tracks",
    "/gt/tracks",
    "/gt/tracks/trails",
}


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return write_output(tmp_path_factory.mktemp("show"))


@pytest.fixture(scope="module")
def recording(output, tmp_path_factory):
    """(the clip as the shard holds it, the recording's frame table, its static/properties rows)."""
    from rerun.chunk import RrdReader

    from pipeline.sample_format import decode_sample, encode_clip

    path = tmp_path_factory.mktemp("rrd") / "sub dir" / "clip.rrd"
    r = runner.invoke(app, ["show", output["output"], "--clip", KEY, "--rrd", str(path)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(path) and path.is_file()
    reader = RrdReader(path)
    (entry,) = reader.recordings()
    assert (entry.application_id, entry.recording_id) == ("d4s", KEY)
    store = reader.stream().collect()
    frames = store.reader(index="frame").to_arrow_table()
    static = store.reader(index=None, contents="/**").to_arrow_table().to_pylist()
    props = store.reader(index=None, contents="/__properties/**").to_arrow_table().to_pylist()
    clip = decode_sample(encode_clip(output["clips"][KEY]))  # what the shard holds (JPEG, quantised depth)
    return clip, frames, static, props, store


def _col(table, entity: str, component: str) -> list:
    return table.column(f"{entity}:{component}").to_pylist()


def test_recording_entities_frames_and_camera_pose(recording):
    clip, frames, _, _, store = recording
    entities = {line.split()[0] for line in store.summary().splitlines()}
    assert ENTITIES <= entities, ENTITIES - entities
    t = clip.num_frames
    assert frames.num_rows == t and frames.column("frame").to_pylist() == list(range(t))
    assert frames.column("source_frame").to_pylist() == clip.meta.frame_indices
    # camera pose of frame 5: the clip's camera-to-world, exactly
    k = 5
    trans = np.array(_col(frames, "/gt/camera", "Transform3D:translation")[k][0])
    mat = np.array(_col(frames, "/gt/camera", "Transform3D:mat3x3")[k][0]).reshape(3, 3, order="F")
    assert np.allclose(trans, clip.c2w[k, :3, 3], atol=1e-6) and np.allclose(mat, clip.c2w[k, :3, :3], atol=1e-6)
    assert not np.allclose(trans, clip.c2w[0, :3, 3])  # the camera moves: frame 5 is not frame 0
    # pinhole: K in pixels, W x H, OpenCV axes (Right-Down-Forward)
    fx, fy, cx, cy = clip.intrinsics[k]
    kmat = np.array(_col(frames, "/gt/camera/image", "Pinhole:image_from_camera")[k][0]).reshape(3, 3, order="F")
    assert np.allclose(kmat, [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], atol=1e-4)
    assert _col(frames, "/gt/camera/image", "Pinhole:resolution")[k][0] == [32.0, 24.0]
    rgb = _col(frames, "/gt/camera/image/rgb", "EncodedImage:blob")
    assert all(b is not None and bytes(b[0][:2]) == b"\xff\xd8" for b in rgb)  # the shard's JPEGs, one per frame


def test_recording_depth_in_metres_and_tracks_with_visibility(recording):
    clip, frames, _, _, _ = recording
    k = 3
    depth = np.frombuffer(bytes(_col(frames, "/gt/camera/image/depth", "DepthImage:buffer")[k][0]), np.float32)
    assert _col(frames, "/gt/camera/image/depth", "DepthImage:meter")[k] == [1.0]
    want = np.where(clip.depth_valid[k], clip.depth[k], 0.0).ravel()
    assert np.allclose(depth, want, rtol=1e-6)
    for t in range(clip.num_frames):
        ids = _col(frames, "/gt/tracks", "track_id")[t]
        pos = np.array(_col(frames, "/gt/tracks", "Points3D:positions")[t])
        vis = np.flatnonzero(clip.track_visible[t])
        assert ids == vis.tolist() and pos.shape == (len(vis), 3)
        assert np.allclose(pos, clip.tracks[t, vis], atol=1e-5)
    assert not clip.track_visible.all()  # some points are hidden at some frame: visibility is exercised


def test_recording_properties_hold_meta_and_qc(recording):
    _, _, static, props, _ = recording
    p = props[0]
    assert p["property:RecordingInfo:name"] == [KEY]
    assert p["property:clip:dataset"] == ["pointodyssey"] and p["property:clip:depth_source"] == ["gt"]
    assert p["property:qc:tracks_visible_fraction"] == [pytest.approx(0.8)]
    assert p["property:qc:per_frame_error"] == [0.1, 0.2, 0.3]
    # the demo renderer's world is y-down (floor at y = +1.5): declared so the viewer shows it upright
    (row,) = [r for r in static if r.get("/gt:ViewCoordinates:xyz")]
    y_down = [d.value for d in rr.ViewCoordinates.RIGHT_HAND_Y_DOWN.coordinates]
    assert row["/gt:ViewCoordinates:xyz"] == [y_down]


def test_world_up_of_a_ned_world_is_z_down():
    from pipeline.geometry import ned_c2w_to_opencv
    from pipeline.rerun_log import world_view_coordinates

    ned = np.tile(np.eye(4), (2, 1, 1))
    assert world_view_coordinates(ned_c2w_to_opencv(ned)) == rr.ViewCoordinates.RIGHT_HAND_Z_DOWN
    assert world_view_coordinates(np.tile(np.eye(4), (2, 1, 1))) == rr.ViewCoordinates.RIGHT_HAND_Y_DOWN


def test_show_errors_are_one_line(output, tmp_path, monkeypatch):
    out = output["output"]
    cases = [
        (["show", out, "--clip", KEY], "exactly one of --rrd"),
        (["show", out, "--clip", KEY, "--rrd", str(tmp_path / "a.rrd"), "--spawn"], "exactly one of --rrd"),
        (["show", out, "--clip", KEY + "x", "--rrd", str(tmp_path / "a.rrd")], f"did you mean {KEY}"),
        (["show", out, "--clip", output["failed"], "--rrd", str(tmp_path / "a.rrd")], "failed at align"),
        (["show", str(tmp_path), "--clip", KEY, "--rrd", str(tmp_path / "a.rrd")], "not a d4s output"),
        (["show", out, "--clip", KEY, "--rrd", str(tmp_path)], "is a folder"),  # was an IsADirectoryError traceback
        # a file where a folder of the path should be: was a FileExistsError traceback
        (["show", out, "--clip", KEY, "--rrd", str(tmp_path / "afile" / "c.rrd")], "afile is a file"),
    ]
    (tmp_path / "afile").write_text("x")
    for args, msg in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["show", out, "--clip", output["failed"], "--rrd", str(tmp_path / "a.rrd")])
    assert FAILED_REASON in r.output and "[/data/<s1>/cam.txt]" in r.output  # printed as is, not as markup
    assert not (tmp_path / "a.rrd").exists()
    from pipeline import show

    monkeypatch.setattr(show.shutil, "which", lambda name: None)
    r = runner.invoke(app, ["show", out, "--clip", KEY, "--spawn"])
    assert r.exit_code == 2 and "no Rerun viewer found" in r.output
    monkeypatch.setitem(__import__("sys").modules, "rerun", None)
    r = runner.invoke(app, ["show", out, "--clip", KEY, "--rrd", str(tmp_path / "a.rrd")])
    assert r.exit_code == 2 and "pip install 'd4s[viz]'" in r.output


def test_show_and_gallery_read_an_s3_output(tmp_path):
    """Both readers seek into shards on an object store (ranged reads); the recording is written there too."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from rerun.chunk import RrdReader
    from s3_server import LocalS3

    from manifests.store import ManifestStore
    from pipeline.gallery import render_gallery
    from pipeline.storage import Store

    srv = LocalS3().start()
    try:
        srv.create_bucket()
        srv.apply_env()
        out = write_output(srv.url("viz"))["output"]
        r = runner.invoke(app, ["show", out, "--clip", KEY, "--rrd", f"{out}/views/clip.rrd"])
        assert r.exit_code == 0 and r.stdout.strip() == f"{out}/views/clip.rrd", r.output
        local = tmp_path / "clip.rrd"
        local.write_bytes(Store(out).read_bytes("views/clip.rrd"))
        frames = RrdReader(local).stream().collect().reader(index="frame").to_arrow_table()
        assert frames.num_rows == 8
        ms = ManifestStore(Store(out))
        html, n_read = render_gallery(Store(out), ms.shards(), ms.ledger_events(), [], 2)
        assert n_read == 3 and "could not read" not in html
    finally:
        srv.restore_env()
        srv.stop()
