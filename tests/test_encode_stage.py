"""The encode stage runs per clip, before the write task (stages/encode.py).

A shard's clips are encoded in parallel as soon as each is done, and the write task receives
their bytes instead of the clips' arrays. The shard must not change: the same tar, byte for byte,
and the same ledger rows as when the write task encoded the clips itself; a failure at encoding
is recorded with its reason and keeps the clip's counters.
"""

from __future__ import annotations

import pickle

import numpy as np
from test_status_reads import _clip, _config

from pipeline.clip import ClipFailure
from stages.encode import EncodedClip, encode_for_shard
from stages.write import write_shard

SHARD = {
    "shard_id": "realestate10k-000000",
    "dataset": "realestate10k",
    "path": "shards/realestate10k/realestate10k-000000.tar",
}


def _clips():
    ids = [f"realestate10k__s__{i:06d}" for i in range(3)]
    clips = [_clip(ids[0]), ClipFailure(ids[1], "ingest", "file is missing", "/d/x.png"), _clip(ids[2])]
    clips[0].aux["stats"] = {"depth.passes": 1}
    clips[2].rgb[:, 2:5] = 200  # two clips with different pictures
    return clips


def _without_times(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in ("timings", "started_at", "finished_at", "log", "fingerprint")}
    out["stage_counts"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "seconds"} for k, v in out["stage_counts"].items()
    }
    return out


def test_a_shard_of_clips_encoded_beforehand_is_the_shard_encoded_in_the_write(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    inline = write_shard(SHARD, _clips(), _config(a))
    cfg = _config(b)
    encoded = [encode_for_shard(c, cfg.jpeg_quality) for c in _clips()]
    assert [type(e) for e in encoded] == [EncodedClip, ClipFailure, EncodedClip]
    early = write_shard(SHARD, encoded, cfg)
    assert (a / SHARD["path"]).read_bytes() == (b / SHARD["path"]).read_bytes()
    assert _without_times(inline) == _without_times(early)
    assert early["stats"] == {"depth.passes": 1}
    assert set(early["timings"]) == {"ingest", "depth", "align", "encode", "write"}
    assert early["timings"]["ingest"] == 1.0  # 0.5 per written clip, summed


def test_what_reaches_the_write_task_is_a_fraction_of_the_clip():
    clip = _clip("realestate10k__s__000000")
    big = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    clip.rgb = big
    clip.depth = np.full((4, 64, 64), 2.0, np.float32)
    clip.depth_valid = np.ones((4, 64, 64), bool)
    clip.intrinsics, clip.c2w = np.tile([32.0, 32.0, 32.0, 32.0], (4, 1)), np.tile(np.eye(4), (4, 1, 1))
    clip.meta.frame_indices = [0, 1, 2, 3]
    enc = encode_for_shard(clip, 90)
    assert isinstance(enc, EncodedClip) and enc.num_frames == 4
    assert len(pickle.dumps(enc)) < len(pickle.dumps(clip)) / 2


def test_a_clip_that_cannot_be_encoded_fails_with_the_reason_and_keeps_its_counters(tmp_path):
    clip = _clip("realestate10k__s__000000")
    clip.aux["stats"] = {"depth.passes": 1}
    clip.depth = clip.depth[:1]  # a shape the sample format refuses
    out = encode_for_shard(clip, 90)
    assert isinstance(out, ClipFailure) and out.stage == "encode" and "depth" in out.reason
    assert out.stats == {"depth.passes": 1}
    result = write_shard(SHARD, [out], _config(tmp_path / "out"))
    assert result["samples_written"] == 0 and result["clips_failed"][0]["stage"] == "encode"
    assert result["stats"] == {"depth.passes": 1}


def test_the_depth_png_level_changes_the_bytes_never_a_value():
    from pipeline.demo.render import random_scene, render
    from pipeline.sample_format import decode_sample, encode_clip

    r = render(random_scene("lvl", seed=3, dynamic=False, num_frames=3, height=48, width=64))
    clip = _clip("realestate10k__s__000000")
    clip.rgb, clip.intrinsics, clip.c2w = r.rgb, r.intrinsics, r.c2w
    clip.depth, clip.depth_valid = r.depth.astype(np.float32), np.isfinite(r.depth)
    clip.meta.frame_indices = [0, 1, 2]
    fast, small = encode_clip(clip, 95, 1), encode_clip(clip, 95, 9)
    depth_bytes = [sum(len(v) for k, v in s.items() if k.startswith("depth.")) for s in (fast, small)]
    assert depth_bytes[0] > depth_bytes[1]  # level 1 compresses less
    a, b = decode_sample(fast), decode_sample(small)
    np.testing.assert_array_equal(a.depth, b.depth)
    np.testing.assert_array_equal(a.depth_valid, b.depth_valid)
