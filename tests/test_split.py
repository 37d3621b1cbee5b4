"""The validation split: by scene, deterministic, recorded in index.parquet, never read by training."""

import itertools

import pyarrow as pa
import pytest

from pipeline.split import TRAIN, VAL, split_of_clips, validation_scenes


def test_split_is_by_scene_deterministic_and_stable_when_a_dataset_grows():
    scenes = [f"scene{i:04d}" for i in range(2000)]
    held = validation_scenes("tartanair", scenes, 0.1)
    assert 150 < len(held) < 250  # about the fraction
    assert validation_scenes("tartanair", list(reversed(scenes)), 0.1) == held  # order does not matter
    # more scenes: the old ones keep their split; a larger fraction only adds held-out scenes
    grown = validation_scenes("tartanair", scenes + [f"new{i}" for i in range(500)], 0.1)
    assert grown & set(scenes) == held
    assert held <= validation_scenes("tartanair", scenes, 0.2)
    # another dataset with the same scene names gets another choice
    assert validation_scenes("spring", scenes, 0.1) != held
    assert validation_scenes("tartanair", scenes, 0.0) == set()


def test_small_datasets_hold_out_one_scene_but_never_their_only_one():
    assert len(validation_scenes("spring", ["a", "b", "c"], 0.01)) == 1
    assert validation_scenes("spring", ["only"], 0.5) == set()
    with pytest.raises(ValueError, match="val_fraction"):
        validation_scenes("spring", ["a"], 1.0)


def test_every_clip_of_a_held_out_scene_is_validation():
    clips = [
        {"clip_id": f"{ds}__{sc}__{k}", "dataset": ds, "scene": sc}
        for ds, sc, k in itertools.product(["tartanair", "vkitti2"], [f"s{i}" for i in range(40)], range(3))
    ]
    split = split_of_clips(clips, {"tartanair": 0.25})
    by_scene: dict = {}
    for c in clips:
        by_scene.setdefault((c["dataset"], c["scene"]), set()).add(split[c["clip_id"]])
    assert all(len(v) == 1 for v in by_scene.values())  # a scene is wholly train or wholly val
    assert {v for (ds, _), (v,) in by_scene.items() if ds == "vkitti2"} == {TRAIN}  # fraction 0
    assert VAL in {v for (ds, _), (v,) in by_scene.items() if ds == "tartanair"}


def test_index_rows_carry_scene_and_split_in_the_schema():
    from manifests.schemas import INDEX_SCHEMA
    from pipeline.plan import Plan
    from pipeline.runner import write_index

    clips = [
        {"clip_id": f"tartanair__s{i}__0", "dataset": "tartanair", "scene": f"s{i}", "shard_id": "tartanair-000000"}
        for i in range(6)
    ]
    plan = Plan(
        scenes=[],
        clips=clips,
        shards=[
            {"shard_id": "tartanair-000000", "dataset": "tartanair", "path": "shards/tartanair/tartanair-000000.tar"}
        ],
    )

    class FakeManifests:
        rows = None

        def ledger(self, columns=None):
            return {
                "tartanair-000000": {
                    "state": "done",
                    "samples": [[c["clip_id"], 512 * i, 4, False] for i, c in enumerate(clips)],
                }
            }

        def write_index(self, rows):
            FakeManifests.rows = rows

    write_index(FakeManifests(), plan, {"tartanair": 0.3})
    table = pa.Table.from_pylist(FakeManifests.rows, INDEX_SCHEMA)  # fits the schema
    rows = table.to_pylist()
    want = split_of_clips(clips, {"tartanair": 0.3})
    assert [(r["key"], r["scene"], r["split"]) for r in rows] == [
        (c["clip_id"], c["scene"], want[c["clip_id"]]) for c in clips
    ]
    assert {r["split"] for r in rows} == {TRAIN, VAL}


def test_val_fraction_is_validated_and_changes_no_shard_byte():
    from pipeline.config import BuildConfig

    base = {"output": "/tmp/x", "datasets": {"tartanair": {"root": "/data/t"}}}
    a = BuildConfig.model_validate(base)
    b = BuildConfig.model_validate({**base, "datasets": {"tartanair": {"root": "/data/t", "val_fraction": 0.1}}})
    assert a.content_hash() == b.content_hash() and a.planning_hash() == b.planning_hash()
    for bad in (1.0, -0.1):
        with pytest.raises(Exception, match="val_fraction"):
            BuildConfig.model_validate({**base, "datasets": {"tartanair": {"root": "/data/t", "val_fraction": bad}}})


def test_training_never_reads_held_out_scenes(tmp_path):
    from training.config import DataConfig, StageConfig
    from training.data import ShardStream, resolve_catalog
    from training.synthetic import write_shards

    write_shards(
        str(tmp_path), n_clips=6, per_shard=3, t=5, size=16, datasets=("synth",), val=lambda ds, i: i in (1, 4)
    )
    val = resolve_catalog(DataConfig(root=str(tmp_path)), split="val")
    assert sorted(val.keys) == ["synth__s1__0", "synth__s4__0"]
    stage = StageConfig(name="s", steps=1, resolution=16, num_frames=5, max_frame_stride=1)
    stream = iter(ShardStream(DataConfig(root=str(tmp_path), shuffle_buffer=2), stage, 0, 4, 1))
    seen = {next(stream)["key"][0] for _ in range(24)}
    assert seen == {"synth__s0__0", "synth__s2__0", "synth__s3__0", "synth__s5__0"}
