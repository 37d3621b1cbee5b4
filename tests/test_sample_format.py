import numpy as np

from pipeline.clip import Clip, ClipMeta
from pipeline.sample_format import DEPTH_REL_ERROR_BOUND, decode_depth, decode_sample, encode_clip, encode_depth
from stages.write import shard_bytes


def _clip(t=3, h=20, w=24, tracks=True):
    rng = np.random.default_rng(1)
    depth = rng.uniform(0.5, 20, (t, h, w)).astype(np.float32)
    valid = rng.random((t, h, w)) > 0.1
    tr = rng.standard_normal((t, 7, 3)).astype(np.float32) if tracks else None
    vis = rng.random((t, 7)) > 0.3 if tracks else None
    meta = ClipMeta(
        "tartanair",
        "a/b",
        "tartanair__a-b__000003",
        [3, 4, 5],
        False,
        False,
        depth_source="gt",
        track_source="gt" if tracks else "none",
    )
    c2w = np.tile(np.eye(4), (t, 1, 1))
    c2w[:, :3, 3] = rng.standard_normal((t, 3))
    return Clip(
        meta,
        rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8),
        np.tile([20.0, 21.0, 12.0, 10.0], (t, 1)),
        c2w,
        depth,
        valid,
        tr,
        vis,
    )


def test_depth_codec_precision_over_0p1m_to_1km():
    d = np.geomspace(0.1, 1000.0, 200_000).reshape(400, 500)
    back, valid = decode_depth(encode_depth(d, np.ones_like(d, bool)))
    rel = np.abs(back - d) / d
    assert valid.all()
    assert rel.max() <= DEPTH_REL_ERROR_BOUND * 1.001 + 1e-7  # float32 output rounding
    assert DEPTH_REL_ERROR_BOUND < 1e-4
    # invalid and out-of-range depth is stored as invalid
    _, v = decode_depth(encode_depth(np.array([0.001, 5.0, 1e5, np.nan]), np.array([True, False, True, True])))
    assert v.tolist() == [False, False, False, False]


def test_sample_roundtrip():
    clip = _clip()
    sample = encode_clip(clip, jpeg_quality=95)
    assert all("." not in sample["__key__"] for _ in [0])
    back = decode_sample({k: v for k, v in sample.items() if k != "__key__"})
    np.testing.assert_array_equal(back.c2w, clip.c2w)
    np.testing.assert_array_equal(back.intrinsics, clip.intrinsics)
    assert np.abs(back.rgb.astype(int) - clip.rgb).mean() < 8  # JPEG of random noise
    np.testing.assert_array_equal(back.depth_valid, clip.depth_valid)
    rel = np.abs(back.depth - clip.depth)[clip.depth_valid] / clip.depth[clip.depth_valid]
    assert rel.max() < 1.1e-4
    np.testing.assert_array_equal(back.track_visible, clip.track_visible)
    np.testing.assert_allclose(back.tracks[clip.track_visible], clip.tracks[clip.track_visible])
    assert back.meta == clip.meta
    sub = decode_sample(sample, frames=[0, 2])
    assert sub.num_frames == 2 and sub.meta.frame_indices == [3, 5]


def test_shards_are_byte_reproducible_and_readable_by_webdataset(tmp_path):
    import webdataset as wds

    s1 = [encode_clip(_clip(), 95)]
    a, off = shard_bytes(s1)
    b, _ = shard_bytes([encode_clip(_clip(), 95)])
    assert a == b and off == [("tartanair__a-b__000003", 0)]
    p = tmp_path / "x.tar"
    p.write_bytes(a)
    samples = list(wds.WebDataset(str(p), shardshuffle=False))
    assert len(samples) == 1 and samples[0]["__key__"] == "tartanair__a-b__000003"
    clip = decode_sample(samples[0])
    assert clip.num_frames == 3
