"""Kubric MOVi-F adapter: TFRecord/Example round trip through the fixture writer, malformed inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import geometry as geo
from pipeline.clip import ClipError, ClipMeta
from pipeline.demo.render import render
from pipeline.demo.writers import kubric_movi_f as writer
from stages.ingest import get_adapter
from stages.ingest.kubric import crc32c, frame_record, iter_record_offsets, parse_example

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "samples" / "kubric_movi_f"
SHARD = "movi_f/48x48/1.0.0/movi_f-train.tfrecord-00000-of-00001"


@pytest.fixture(scope="module")
def rendered():
    return [render(writer.demo_spec(i, seed=21 + i)) for i in (0, 1)]


def _load(adapter, scene, frames=None):
    frames = list(range(scene.num_frames)) if frames is None else frames
    meta = ClipMeta("kubric_movi_f", scene.scene, "c", frames, dynamic=True, real=False)
    return adapter.load_clip(scene, frames, meta)


def test_crc32c_reference_value():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_round_trip_two_records_in_one_shard(rendered, tmp_path):
    written = [writer.write(sc, tmp_path, f"{SHARD}/{k:05d}") for k, sc in enumerate(rendered)]
    adapter = get_adapter("kubric_movi_f", str(tmp_path))
    scenes = adapter.discover()
    assert [s.scene for s in scenes] == [ws.scene_id for ws in written]
    for scene, ws, sc in zip(scenes, written, rendered):
        assert scene.num_frames == sc.spec.num_frames
        for frames in (list(range(scene.num_frames)), [0, 5, 11]):
            clip = _load(adapter, scene, frames)
            assert np.abs(clip.c2w - ws.expected_c2w(sc.c2w[frames])).max() < 1e-5  # float32 storage
            assert np.abs(clip.intrinsics - sc.intrinsics[frames]).max() < 1e-4
            assert np.array_equal(clip.rgb, sc.rgb[frames])
            # uint16 over depth_range: |distance error| <= range / 65535 / 2, and z <= distance.
            dist = sc.depth  # z-depth truth
            bound = (dist.max() * 1.5 - dist.min()) / 65535 * 0.5 + 1e-5
            assert np.abs(clip.depth - sc.depth[frames]).max() <= bound
            assert clip.tracks is None and clip.depth_valid.all()
    # The depth stored is the camera-centre distance, not z: check the decoder undid it.
    clip = _load(adapter, scenes[0], [0])
    uv, z = geo.project(geo.unproject(clip.depth[0], clip.intrinsics[0], clip.c2w[0]), clip.intrinsics[0], clip.c2w[0])
    assert np.allclose(z, clip.depth[0], atol=1e-4)


def test_record_is_an_example_with_release_keys(rendered, tmp_path):
    writer.write(rendered[0], tmp_path, f"{SHARD}/00000")
    with open(tmp_path / SHARD, "rb") as f:
        ((off, length),) = iter_record_offsets(f, "x")
        f.seek(off)
        ex = parse_example(f.read(length), "x")
    for key in (
        "video",
        "depth",
        "camera/focal_length",
        "camera/sensor_width",
        "camera/positions",
        "camera/quaternions",
        "metadata/depth_range",
        "metadata/num_frames",
    ):
        assert key in ex
    q = np.asarray(ex["camera/quaternions"]).reshape(-1, 4)
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)


# -- malformed -------------------------------------------------------------------------------------


def _rewrite(tmp_path, sc, mutate):
    """Write one record whose feature dict was altered by ``mutate``."""
    from stages.ingest.kubric import build_example

    payload = writer.encode_example(sc, "bad")
    ex = parse_example(payload, "x")
    kinds = {k: ("bytes" if v and isinstance(v[0], bytes) else "float") for k, v in ex.items()}
    for k in ("metadata/width", "metadata/height", "metadata/num_frames", "metadata/num_instances"):
        kinds[k] = "int64"
    mutate(ex)
    shard = tmp_path / SHARD
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(frame_record(build_example({k: (kinds.get(k, "float"), v) for k, v in ex.items()})))


def _expect(tmp_path, reason):
    adapter = get_adapter("kubric_movi_f", str(tmp_path))
    with pytest.raises(ClipError) as err:
        _load(adapter, adapter.discover()[0])
    assert SHARD.rsplit("/", 1)[1] in str(err.value.path) and reason in err.value.reason, str(err.value)


def test_corrupt_payload_crc(rendered, tmp_path):
    writer.write(rendered[0], tmp_path, f"{SHARD}/00000")
    p = tmp_path / SHARD
    data = bytearray(p.read_bytes())
    data[5000] ^= 0xFF
    p.write_bytes(bytes(data))
    _expect(tmp_path, "payload CRC")


def test_truncated_shard(rendered, tmp_path):
    writer.write(rendered[0], tmp_path, f"{SHARD}/00000")
    p = tmp_path / SHARD
    adapter = get_adapter("kubric_movi_f", str(tmp_path))
    scene = adapter.discover()[0]
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(ClipError) as err:
        _load(get_adapter("kubric_movi_f", str(tmp_path)), scene)
    assert "truncated TFRecord payload" in err.value.reason


def test_nan_camera_position(rendered, tmp_path):
    _rewrite(tmp_path, rendered[0], lambda ex: ex["camera/positions"].__setitem__(4, float("nan")))
    _expect(tmp_path, "NaN")


@pytest.mark.parametrize("drange", [[9.0, 2.0], [3.0, 3.0], [-1.0, 5.0]])
def test_depth_range_that_is_no_range_is_refused(rendered, tmp_path, drange):
    """Reversed, empty or negative: the depth decoded from it was garbage (or all one value)
    and reached the shard when the self-check was off."""
    _rewrite(tmp_path, rendered[0], lambda ex: ex.__setitem__("metadata/depth_range", drange))
    _expect(tmp_path, "depth_range")


def test_wrong_quaternion_count(rendered, tmp_path):
    _rewrite(tmp_path, rendered[0], lambda ex: ex.__setitem__("camera/quaternions", ex["camera/quaternions"][:-4]))
    _expect(tmp_path, "camera/quaternions")


def test_truncated_png_frame(rendered, tmp_path):
    _rewrite(tmp_path, rendered[0], lambda ex: ex["video"].__setitem__(3, ex["video"][3][:40]))
    _expect(tmp_path, "video frame 3")


def test_depth_frame_count_mismatch(rendered, tmp_path):
    _rewrite(tmp_path, rendered[0], lambda ex: ex.__setitem__("depth", ex["depth"][:-2]))
    _expect(tmp_path, "frame counts disagree")


def test_not_an_example(tmp_path):
    shard = tmp_path / SHARD
    shard.parent.mkdir(parents=True)
    shard.write_bytes(frame_record(b"\xff\xff\xff\xff garbage"))
    (scene,) = get_adapter("kubric_movi_f", str(tmp_path)).discover()  # listed, failing with the reason
    with pytest.raises(ClipError) as err:
        scene.refuse_if_unreadable()
    assert "tf.train.Example" in err.value.reason and SHARD.rsplit("/", 1)[1] in err.value.path


@pytest.mark.skipif(not SAMPLES.exists(), reason="no real MOVi-F shard in shared/datasets/samples")
def test_real_sample():
    adapter = get_adapter("kubric_movi_f", str(SAMPLES))
    scenes = adapter.discover()
    assert scenes and scenes[0].num_frames == 24
    clip = _load(adapter, scenes[0], [0, 1, 2])
    assert np.all(geo.rotation_error(clip.c2w[:, :3, :3]) < 1e-4)
    assert clip.depth_valid.mean() > 0.9
