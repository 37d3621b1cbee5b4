"""The typed build config: every routing field, threshold and adapter option is checked at load, and a
typo fails with the field's path and what is allowed (pipeline/config.py, pipeline/config_errors.py)."""

from __future__ import annotations

import types
import typing

import pytest
import yaml

from pipeline.config import BuildConfig, ConfigError, load_config


def load(**datasets_and_more) -> BuildConfig:
    raw = {"output": "/tmp/out", "datasets": {"tartanair": {"root": "/data/t"}}}
    for k, v in datasets_and_more.items():
        raw[k] = v
    return load_config(yaml.safe_dump(raw), is_text=True)


def error_of(**raw) -> str:
    with pytest.raises(ConfigError) as exc:
        load(**raw)
    return str(exc.value)


# ------------------------------------------------------------------------------------------
# enumerations


@pytest.mark.parametrize(
    "field, bad, good",
    [
        ("depth_source", "megasm", "'megasam'"),
        ("track_source", "cotraker", "'cotracker'"),
    ],
)
def test_misspelt_routing_fails_at_load_with_path_and_allowed_values(field, bad, good):
    msg = error_of(datasets={"realestate10k": {"root": "/r", field: bad}})
    assert f"datasets.realestate10k.{field}" in msg
    assert f"did you mean {good}" in msg
    allowed = {
        "depth_source": ("'gt'", "'vda'", "'vda_metric'", "'megasam'", "'sparse'"),
        "track_source": ("'gt'", "'cotracker'", "'depth_static'", "'none'"),
    }[field]
    assert all(a in msg for a in allowed), msg


def test_misspelt_loss_weight_term_names_the_key():
    msg = error_of(datasets={"tartanair": {"root": "/t", "loss_weights": {"deph": 0.5}}})
    assert "datasets.tartanair.loss_weights.deph" in msg and "did you mean 'depth'" in msg
    assert "'motion'" in msg and "'photo'" in msg


def test_misspelt_top_level_and_stage_keys_list_the_allowed_fields():
    msg = error_of(shard_sise=4)
    assert "at shard_sise" in msg and "did you mean 'shard_size'" in msg and "jpeg_quality" in msg
    msg = error_of(stages={"depth": {"encoder": "vitL"}})
    assert "stages.depth.encoder" in msg and "'vitl'" in msg and "'vits'" in msg


def test_every_string_field_is_free_text_or_typed():
    """A new config field holding one of a few values must be a Literal: plain ``str`` is only for
    paths, URLs, addresses and command templates."""
    from pipeline import config_doc

    free_text = {
        "root",
        "output",
        "checkpoint",
        "megasam_command",
        "cache_dir",
        "marker_dir",
        "trace_dir",
        "address",
        "megasam_version",
    }  # megasam_version: the user's label of their MegaSaM install
    for model in config_doc.MODELS:
        for name, f in model.model_fields.items():
            ann = f.annotation
            union = typing.get_origin(ann) in (typing.Union, types.UnionType)
            if set(typing.get_args(ann) if union else (ann,)) - {type(None)} == {str}:
                assert name in free_text, f"{model.__name__}.{name} is a plain str: type its allowed values"


# ------------------------------------------------------------------------------------------
# routing that cannot work for the dataset


@pytest.mark.parametrize(
    "dataset, field, value, why",
    [
        ("realestate10k", "depth_source", "gt", "no ground-truth depth"),
        ("tartanair", "track_source", "gt", "no ground-truth tracks"),
        ("tartanair", "depth_source", "sparse", "no metric 3D tracks"),
        ("pointodyssey", "track_source", "depth_static", "dynamic"),
    ],
)
def test_routing_the_dataset_cannot_serve_fails_at_load(dataset, field, value, why):
    msg = error_of(datasets={dataset: {"root": "/d", field: value}})
    assert f"datasets.{dataset}.{field}" in msg and why in msg, msg


# ------------------------------------------------------------------------------------------
# alignment thresholds


def test_align_thresholds_are_typed_and_reach_the_align_stage():
    from stages.align.pipeline_stage import options_for
    from stages.align.qc import AlignQCThresholds

    cfg = load(stages={"align": {"thresholds": {"min_inlier_ratio": 0.8}}})
    assert isinstance(cfg.stages.align.thresholds, AlignQCThresholds)
    th = options_for(cfg, "disparity").thresholds
    assert th.min_inlier_ratio == 0.8 and th.max_abs_rel == AlignQCThresholds().max_abs_rel
    msg = error_of(stages={"align": {"thresholds": {"min_inlier_ration": 0.8}}})
    assert "stages.align.thresholds.min_inlier_ration" in msg and "did you mean 'min_inlier_ratio'" in msg
    assert "max_abs_rel" in msg  # the allowed names
    msg = error_of(stages={"align": {"thresholds": {"min_inlier_ratio": 1.5}}})
    assert "stages.align.thresholds.min_inlier_ratio" in msg and "1" in msg


# ------------------------------------------------------------------------------------------
# per-adapter options


def test_adapter_option_typo_names_the_path_and_the_adapters_options():
    msg = error_of(datasets={"vkitti2": {"root": "/v", "options": {"camera": [0, 1]}}})
    assert "datasets.vkitti2.options.camera" in msg and "did you mean 'cameras'" in msg
    assert "variations" in msg


def test_adapter_option_values_are_typed():
    msg = error_of(datasets={"spring": {"root": "/s", "options": {"disparity_downsample": "nearest"}}})
    assert "datasets.spring.options.disparity_downsample" in msg and "'block_mean'" in msg and "'subsample'" in msg
    msg = error_of(datasets={"vkitti2": {"root": "/v", "options": {"cameras": [0, 2]}}})
    assert "datasets.vkitti2.options.cameras.1" in msg and "allowed: 0, 1" in msg
    # an adapter without options takes none
    msg = error_of(datasets={"tartanair": {"root": "/t", "options": {"anything": 1}}})
    assert "datasets.tartanair.options.anything" in msg


def test_adapter_receives_its_typed_options_and_the_depth_range(tmp_path):
    from stages.ingest import adapter_for_dataset

    cfg = load(datasets={"vkitti2": {"root": str(tmp_path), "options": {"cameras": [1, 0]}, "max_depth_m": 80.0}})
    rc = cfg.resolved()
    assert rc.datasets["vkitti2"].options == {"cameras": [1, 0], "variations": None}  # defaults recorded
    adapter = adapter_for_dataset("vkitti2", rc.datasets["vkitti2"])
    assert adapter.opts.cameras == [1, 0] and adapter.opts.variations is None
    assert adapter.depth_range == (0.05, 80.0)


def test_adapter_options_are_documented_in_config_md():
    from pipeline.config_doc import render

    text = render()
    for name in ("vkitti2", "spring", "dynamic_replica", "pointodyssey", "stereo4d"):
        assert f"## datasets.{name}.options" in text, name
    assert "`disparity_downsample`" in text and "'block_mean' or 'subsample'" in text


# ------------------------------------------------------------------------------------------
# what decides the bytes: content_fields / content_hash


def _cfg(**over) -> BuildConfig:
    raw = {
        "output": "/out/a",
        "datasets": {"tartanair": {"root": "/data/a/tartanair"}, "realestate10k": {"root": "s3://bucket/re10k"}},
    }
    for k, v in over.items():
        raw[k] = v
    return BuildConfig.model_validate(raw).resolved()


def test_content_hash_ignores_where_inputs_and_output_live():
    base = _cfg()
    moved = _cfg(
        output="s3://other/bucket",
        datasets={"tartanair": {"root": "/mnt/elsewhere/t"}, "realestate10k": {"root": "/local/re10k"}},
        stages={"align": {"cache_dir": "/scratch/megasam"}, "depth": {"resources": {"actors": 8}}},
        ray={"address": "ray://head:10001"},
        max_inflight_shards=32,
        fault={"ingest_delay_s": 1.0},
    )
    assert moved.content_hash() == base.content_hash()
    assert moved.content_fields() == base.content_fields()
    assert moved.planning_hash() == base.planning_hash()
    assert "/data/a" not in str(base.content_fields()) and "/out/a" not in str(base.content_fields())


@pytest.mark.parametrize(
    "over",
    [
        {"jpeg_quality": 90},
        {"shard_size": 4},
        {
            "datasets": {
                "tartanair": {"root": "/data/a/tartanair", "clip_length": 8},
                "realestate10k": {"root": "s3://bucket/re10k"},
            }
        },
        {
            "datasets": {
                "tartanair": {"root": "/data/a/tartanair"},
                "realestate10k": {"root": "s3://bucket/re10k", "depth_source": "vda_metric"},
            }
        },
        {"stages": {"align": {"thresholds": {"max_abs_rel": 0.1}}}},
        {"stages": {"tracks": {"grid_size": 8}}},
    ],
)
def test_content_hash_follows_what_decides_the_bytes(over):
    assert _cfg(**over).content_hash() != _cfg().content_hash()


def test_a_datasets_hash_depends_on_its_own_entry_only():
    base = _cfg()
    other = _cfg(
        datasets={
            "tartanair": {"root": "/x"},
            "realestate10k": {"root": "/y", "clip_length": 4},
            "vkitti2": {"root": "/z"},
        }
    )
    assert other.content_hash("tartanair") == base.content_hash("tartanair")
    assert other.content_hash("realestate10k") != base.content_hash("realestate10k")


def test_shard_deadline_cannot_be_switched_off():
    """Every wait has a deadline: ``shard_deadline_s: null`` (a hung stage then held its shard, and
    the build, for ever) is refused at load naming the field; a long one is a number."""
    msg = error_of(shard_deadline_s=None)
    assert "shard_deadline_s" in msg and "seconds" in msg
    assert load(shard_deadline_s=172800).shard_deadline_s == 172800
