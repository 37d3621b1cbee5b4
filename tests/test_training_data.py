"""The shard stream: decode, resize + intrinsics, determinism, resume position, rank split, mixtures."""

import numpy as np
import pytest
import torch

from training.config import make_config
from training.data import DatasetStream, ShardStream, crop_resize, iter_tar, resolve_shards
from training.synthetic import make_clip, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(str(out), n_clips=6, per_shard=1, t=9, size=32)
    return str(out)


def _keys(stream, n):
    it = iter(stream)
    return [next(it)["key"][0] for _ in range(n)]


def test_index_and_tar_reading(shards):
    by_ds, counts, keys = resolve_shards(make_config("tiny", data={"root": shards}).data)
    assert set(by_ds) == {"synth_static", "synth_dynamic"} and counts == {"synth_static": 3, "synth_dynamic": 3}
    s = next(iter_tar(by_ds["synth_static"][0]))
    assert "meta.json" in s and "rgb.000.jpg" in s and keys[s["__key__"]] == "synth_static"


def test_crop_resize_keeps_projection():
    clip = make_clip(3, t=3, size=32)
    clip.rgb = np.pad(clip.rgb, ((0, 0), (0, 0), (4, 4), (0, 0)))  # 32 x 40: crops 4 px each side
    clip.intrinsics[:, 2] += 4
    clip.depth = np.pad(clip.depth, ((0, 0), (0, 0), (4, 4)))
    clip.depth_valid = np.pad(clip.depth_valid, ((0, 0), (0, 0), (4, 4)))
    from pipeline.geometry import project

    rgb, intr, depth, valid = crop_resize(clip, 16)
    assert rgb.shape == (3, 16, 16, 3) and depth.shape == (3, 16, 16)
    p = clip.tracks[0, :4].astype(np.float64)
    uv0, _ = project(p, clip.intrinsics[0], clip.c2w[0])
    uv1, _ = project(p, intr[0], clip.c2w[0])
    assert np.allclose(uv1, (uv0 - [4, 0]) * 0.5, atol=1e-9)


def test_deterministic_resumable_and_split(shards):
    cfg = make_config("tiny", data={"root": shards})
    st = cfg.stages[0]
    full = _keys(ShardStream(cfg.data, st, 0, 8, 1), 10)
    assert full == _keys(ShardStream(cfg.data, st, 0, 8, 1), 10)  # deterministic
    assert _keys(ShardStream(cfg.data, st, 0, 8, 1, start_batches=4), 6) == full[4:]  # resume position
    b1 = next(iter(ShardStream(cfg.data, st, 0, 8, 1)))
    b2 = next(iter(ShardStream(cfg.data, st, 0, 8, 1)))
    assert all(torch.equal(b1[k], b2[k]) for k in b1 if k not in ("key", "caption"))  # same frames / crops / tracks
    assert b1["video"].shape == (1, 5, 3, 24, 24) and b1["intrinsics"].shape == (1, 5, 4)
    assert torch.allclose(b1["c2w"][0, 0], torch.eye(4), atol=1e-6)  # world = first camera
    # split by node: within an epoch the parts' samples are disjoint and cover the dataset
    by_ds, _, keys = resolve_shards(cfg.data)
    for n_parts, shards_ in (
        (2, by_ds["synth_static"]),
        (2, by_ds["synth_static"][:1] * 1),
        (4, by_ds["synth_static"]),
    ):
        parts = [
            [
                s["__key__"]
                for s in DatasetStream("synth_static", shards_, p, n_parts, 0, 4, lambda s: True, keys)._epoch(0)
            ]
            for p in range(n_parts)
        ]
        flat = [k for p in parts for k in p]
        every = {k for u in shards_ for k in (s["__key__"] for s in iter_tar(u))}
        assert set(flat) == every
        if len(every) >= n_parts:
            assert len(flat) == len(set(flat))  # disjoint
        else:  # fewer samples than parts: every part still emits one (sample p mod N, as with an index)
            assert [len(p) for p in parts] == [1] * n_parts


def test_mixture_and_scene_filter(shards):
    cfg = make_config("tiny", data={"root": shards})
    st = cfg.stages[0].model_copy(update={"mixture": {"synth_dynamic": 1.0}})
    assert all(k.startswith("synth_dynamic") for k in _keys(ShardStream(cfg.data, st, 0, 8, 1), 6))
    st = cfg.stages[0].model_copy(update={"scenes": "static"})
    assert all(k.startswith("synth_static") for k in _keys(ShardStream(cfg.data, st, 0, 8, 1), 6))
    st = cfg.stages[0].model_copy(update={"mixture": {"synth_static": 1.0, "synth_dynamic": 1.0}})
    data = cfg.data.model_copy(update={"repeat": {"synth_static": 9.0}})
    keys = _keys(ShardStream(data, st, 0, 8, 1), 40)
    assert sum(k.startswith("synth_static") for k in keys) > 28  # ~90 % static


def test_reads_a_real_build_output(tmp_path, ray_local):
    """The trainer's reader on what `d4s build` actually writes (index schema, shard layout); and on
    the same output without its index (a driver stopped before writing it): the same catalog, from
    the ledger and the plan. Without the index every done shard was read as training data, held-out
    scenes with it, and validation had nothing."""
    import os

    from conftest import tartanair_config, write_tartanair

    from pipeline.runner import build
    from pipeline.sample_format import decode_sample
    from training.data import resolve_catalog
    from training.evaluate import data_clips

    write_tartanair(tmp_path / "data", n_scenes=4, frames=7)
    ds = {"root": str(tmp_path / "data"), "clip_length": 4, "clip_stride": 3, "track_source": "none"}
    build(tartanair_config(tmp_path, tmp_path / "data", datasets={"tartanair": {**ds, "val_fraction": 0.5}}), False)
    data = make_config("tiny", data={"root": str(tmp_path / "out")}).data
    by_ds, counts, keys = resolve_shards(data)
    assert set(by_ds) == {"tartanair"} and counts == {"tartanair": len(keys)}
    sample = next(iter_tar(by_ds["tartanair"][0]))
    assert keys[sample["__key__"]] == "tartanair"
    assert decode_sample(sample).depth is not None
    indexed = {split: resolve_catalog(data, split) for split in ("train", "val")}
    assert indexed["val"].keys and not set(indexed["val"].keys) & set(indexed["train"].keys)
    assert len(indexed["val"].keys) + len(indexed["train"].keys) == 8  # 4 scenes of 2 clips
    evaluated = {split: [c.key for c in data_clips([str(tmp_path / "out")], split, None)[0]] for split in indexed}
    assert sorted(evaluated["val"]) == sorted(indexed["val"].keys)
    os.remove(tmp_path / "out" / "index.parquet")
    for split, cat in indexed.items():
        assert resolve_catalog(data, split) == cat, split
        # `d4s eval` reads the same clips (it refused an output whose driver stopped before the index)
        assert [c.key for c in data_clips([str(tmp_path / "out")], split, None)[0]] == evaluated[split], split


# --- mixtures follow the stage's filter; splitting; resume with workers; clips too short ---------------
def _mixed(tmp):
    """synth_mixed: 3 clips, only clip 0 static (one shard each); synth_static: 2 static clips (one shard)."""
    out = str(tmp)
    write_shards(out, n_clips=3, per_shard=1, t=5, size=24, datasets=("synth_mixed",), dynamic=lambda ds, i: i != 0)
    write_shards(out + "/b", n_clips=2, per_shard=2, t=5, size=24, datasets=("synth_static",))
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b = pq.read_table(out + "/index.parquet"), pq.read_table(out + "/b/index.parquet")
    b = b.set_column(
        b.schema.get_field_index("shard_path"),
        "shard_path",
        pa.array(["b/" + p for p in b.column("shard_path").to_pylist()]),
    )
    pq.write_table(pa.concat_tables([a, b]), out + "/index.parquet")
    return out


class _Reads:
    """Counts the bytes read from every shard opened through fsspec."""

    def __init__(self, monkeypatch):
        import fsspec

        self.bytes: dict[str, int] = {}
        real = fsspec.open
        reads = self

        class Counted:
            def __init__(self, f, url):
                self.f, self.url = f, url

            def read(self, n=-1):
                b = self.f.read(n)
                reads.bytes[self.url] = reads.bytes.get(self.url, 0) + len(b)
                return b

            def __getattr__(self, k):
                return getattr(self.f, k)

        class Opened:
            def __init__(self, url, *a, **kw):
                self.of, self.url = real(url, *a, **kw), url

            def __enter__(self):
                return Counted(self.of.__enter__(), self.url)

            def __exit__(self, *a):
                return self.of.__exit__(*a)

        monkeypatch.setattr(fsspec, "open", Opened)


def test_default_mixture_weights_count_clips_passing_the_stage_filter(tmp_path, monkeypatch):
    out = _mixed(tmp_path)
    cfg = make_config("tiny", data={"root": out, "shuffle_buffer": 1})
    static = cfg.stages[0].model_copy(update={"scenes": "static"})
    assert ShardStream(cfg.data, static, 0, 8, 1).weights() == {"synth_mixed": 1.0, "synth_static": 2.0}
    keys = _keys(ShardStream(cfg.data, static, 0, 8, 1), 60)
    share = sum(k.startswith("synth_mixed") for k in keys) / len(keys)
    assert 0.15 < share < 0.5, share  # 1 clip of 3 static clips: ~1/3, not ~3/5 as by dataset size
    # a dataset with no clip passing the filter is left out without reading any of its shards
    dynamic = cfg.stages[0].model_copy(update={"scenes": "dynamic"})
    reads = _Reads(monkeypatch)
    assert set(_keys(ShardStream(cfg.data, dynamic, 0, 8, 1), 6)) <= {"synth_mixed__s1__0", "synth_mixed__s2__0"}
    assert reads.bytes and not [u for u in reads.bytes if "/b/" in u]
    assert ShardStream(cfg.data, dynamic, 0, 8, 1).weights() == {"synth_mixed": 2.0}


def test_fewer_shards_than_streams_each_stream_reads_its_share(tmp_path, monkeypatch):
    """One shard, four ranks: each rank reads its own sample, not the whole shard."""
    import os

    out = str(tmp_path)
    write_shards(out, n_clips=4, per_shard=4, t=9, size=32, datasets=("synth_static",))
    cfg = make_config("tiny", data={"root": out, "shuffle_buffer": 1})
    (shard,) = resolve_shards(cfg.data)[0]["synth_static"]
    reads = _Reads(monkeypatch)
    first = [next(iter(ShardStream(cfg.data, cfg.stages[0], 0, 8, 1, rank=r, world=4)))["key"][0] for r in range(4)]
    read = sum(n for u, n in reads.bytes.items() if u.endswith(".tar"))
    assert read < 1.3 * os.path.getsize(shard), (read, os.path.getsize(shard))  # was 3.5 x: each read up to its sample
    assert sorted(first) == sorted(s["__key__"] for s in iter_tar(shard))  # disjoint, covering


def test_resume_with_loader_workers_gives_the_uninterrupted_stream(shards):
    from training.data import make_loader

    cfg = make_config("tiny", data={"root": shards, "num_workers": 2, "shuffle_buffer": 2})
    st = cfg.stages[0]

    def keys(start, n):
        it = iter(make_loader(cfg.data, st, 0, 8, 1, 0, 1, start_batches=start))
        return [next(it)["key"][0] for _ in range(n)]

    full = keys(0, 8)
    assert keys(3, 5) == full[3:]
    assert keys(4, 4) == full[4:]


@pytest.mark.timeout(120)
def test_clips_shorter_than_the_stage_fail_clearly(tmp_path):
    out = str(tmp_path)
    write_shards(out, n_clips=2, per_shard=1, t=5, size=24)
    cfg = make_config("tiny", data={"root": out})
    long = cfg.stages[0].model_copy(update={"num_frames": 9})
    with pytest.raises(ValueError, match="9 frames"):  # from the index, before reading a shard
        next(iter(ShardStream(cfg.data, long, 0, 8, 1)))
    glob = make_config("tiny", data={"shards": [out + "/shards/*.tar"]})  # no index: after one epoch
    with pytest.raises(RuntimeError, match="9 frames"):
        next(iter(ShardStream(glob.data, long, 0, 8, 1)))


def test_fewer_samples_than_streams_each_clip_is_drawn_alike(tmp_path):
    """One shard of 10 clips, 8 streams: each stream read a contiguous range of 1 or 2 samples,
    the same every epoch, so the clips of the 1-sample ranges were drawn twice as often. The
    ranges are now equally long and walk on each epoch: every clip is drawn alike."""
    from collections import Counter

    out = str(tmp_path)
    write_shards(out, n_clips=10, per_shard=10, t=5, size=16, datasets=("synth_static",))
    cfg = make_config("tiny", data={"root": out, "shuffle_buffer": 1})
    stage = cfg.stages[0].model_copy(update={"num_frames": 5})
    counts = Counter(k for r in range(8) for k in _keys(ShardStream(cfg.data, stage, 0, 8, 1, rank=r, world=8), 10))
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 1, counts


def test_without_an_index_a_stage_filter_finds_clips_in_other_streams_shards(tmp_path):
    """``data.shards`` (no index), 4 one-clip shards, only one clip static, 2 ranks: a rank whose
    shards of an epoch held no static clip ended its stream, and the stage failed as if no clip
    passed the filter anywhere. Such a rank now takes its share of the accepted clips of every shard."""
    out = str(tmp_path)
    write_shards(out, n_clips=4, per_shard=1, t=5, size=16, datasets=("synth",), dynamic=lambda ds, i: i != 0)
    cfg = make_config("tiny", data={"shards": [out + "/shards/**/*.tar"], "shuffle_buffer": 1})
    static = cfg.stages[0].model_copy(update={"scenes": "static", "num_frames": 5})
    for world in (2, 8):  # by shard; and fewer shards than streams (each keeps every 8th sample)
        for r in range(world):
            got = _keys(ShardStream(cfg.data, static, 0, 8, 1, rank=r, world=world), 3)
            assert set(got) == {"synth__s0__0"}, (world, r)


def test_a_mixture_or_repeat_naming_no_dataset_of_the_data_is_refused(tmp_path):
    """A typo in a stage's mixture (or in data.repeat) was ignored: that dataset silently got no
    weight (or its repeat none)."""
    out = _mixed(tmp_path)
    cfg = make_config("tiny", data={"root": out, "shuffle_buffer": 1})
    typo = cfg.stages[0].model_copy(update={"mixture": {"synth_mixed": 1.0, "synth_statc": 1.0}})
    with pytest.raises(ValueError, match="synth_statc") as err:
        ShardStream(cfg.data, typo, 0, 8, 1).weights()
    assert "synth_static" in str(err.value)  # what the data holds
    repeat = make_config("tiny", data={"root": out, "repeat": {"synth_mixd": 2.0}})
    with pytest.raises(ValueError, match="synth_mixd"):
        ShardStream(repeat.data, repeat.stages[0], 0, 8, 1).weights()


def test_a_builds_repeat_weight_scales_its_datasets_mixture_weight(tmp_path):
    """``datasets.<name>.repeat_weight`` of the build (Virtual KITTI 2's default 0.5: its ten
    variations re-render the same geometry) reached no one: training weighed every dataset by its
    clip count alone. Now it multiplies the default weight; ``data.repeat[ds]`` replaces it."""
    import yaml

    out = str(tmp_path)
    write_shards(out, n_clips=4, per_shard=2, t=5, size=16, datasets=("vkitti2", "spring"))
    recorded = {
        "output": out,
        "datasets": {"vkitti2": {"root": str(tmp_path / "v")}, "spring": {"root": str(tmp_path / "s")}},
    }
    (tmp_path / "config.resolved.yaml").write_text(yaml.safe_dump(recorded))
    cfg = make_config("tiny", data={"root": out, "shuffle_buffer": 1})
    stage = cfg.stages[0].model_copy(update={"num_frames": 5})
    counts = resolve_shards(cfg.data)[1]
    assert counts["vkitti2"] == counts["spring"] == 2  # training clips (the rest held out)
    assert ShardStream(cfg.data, stage, 0, 8, 1).weights() == {"vkitti2": 1.0, "spring": 2.0}
    mixed = stage.model_copy(update={"mixture": {"vkitti2": 1.0, "spring": 1.0}})
    assert ShardStream(cfg.data, mixed, 0, 8, 1).weights() == {"vkitti2": 0.5, "spring": 1.0}
    over = make_config("tiny", data={"root": out, "shuffle_buffer": 1, "repeat": {"vkitti2": 3.0}})
    assert ShardStream(over.data, stage, 0, 8, 1).weights() == {"vkitti2": 6.0, "spring": 2.0}


def test_fewer_shards_than_parts_every_clip_is_drawn_alike_over_many_epochs(tmp_path):
    """10 clips in 3 shards, 8 parts: the parts' ranges walked over the samples in each epoch's
    shard order, which the epoch's permutation reshuffles, so the counts drifted apart like a
    random walk (40 epochs: 59 to 69 reads for an expected 64). They walk over a fixed order now:
    after any number of epochs every clip is read as often as every other, within one."""
    from collections import Counter

    from training.data import resolve_catalog

    out = str(tmp_path)
    write_shards(out, n_clips=10, per_shard=4, t=5, size=16, datasets=("synth_static",), val=lambda ds, i: False)
    cfg = make_config("tiny", data={"root": out, "shuffle_buffer": 1})
    cat = resolve_catalog(cfg.data)
    (urls,) = cat.shards.values()
    assert len(urls) == 3
    streams = [
        DatasetStream("synth_static", urls, p, 8, 0, 1, lambda s: True, cat.keys, cat.samples, None, {})
        for p in range(8)
    ]
    counts: Counter = Counter()
    for e in range(40):
        for st in streams:
            counts.update(s["__key__"] for s in st._epoch(e))
        assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 1, (e, counts)


@pytest.mark.parametrize("n_clips", [3, 10])
def test_without_an_index_fewer_samples_than_parts_every_clip_is_drawn_alike(tmp_path, n_clips):
    """``data.shards`` (no index), one shard, 8 parts: each part kept every 8th sample, so with 10
    clips parts of one clip drew theirs twice as often as parts of two; with 3, five parts fell
    back to the first clip (drawn 6 times as often as the others). The parts now cut equally long
    ranges of the accepted clips, as with an index: every clip is read alike, within one."""
    from collections import Counter

    out = str(tmp_path)
    write_shards(out, n_clips=n_clips, per_shard=n_clips, t=5, size=16, datasets=("s",), val=lambda ds, i: False)
    cfg = make_config("tiny", data={"shards": [out + "/shards/**/*.tar"], "shuffle_buffer": 1})
    (urls,) = resolve_shards(cfg.data)[0].values()
    streams = [DatasetStream("all", urls, p, 8, 0, 1, lambda s: True, {}) for p in range(8)]
    counts: Counter = Counter()
    for e in range(12):
        per_part = [[s["__key__"] for s in st._epoch(e)] for st in streams]
        assert len({len(k) for k in per_part}) == 1, per_part  # every part emits at the same rate
        counts.update(k for keys in per_part for k in keys)
        assert len(counts) == n_clips and max(counts.values()) - min(counts.values()) <= 1, (e, counts)
