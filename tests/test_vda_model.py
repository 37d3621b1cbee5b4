"""Unit tests of the VDA port: key mapping, checkpoint loading, configs, batched inference."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.depth.vda import (
    CheckpointMismatchError,
    build_vda,
    build_vda_empty,
    infer_video_depth_official_style,
    infer_videos,
    load_checkpoint,
    load_official_state_dict,
    network_size,
    randomize_,
)
from stages.depth.vda.dpt_temporal import sinusoid_table
from stages.depth.vda.infer import num_windows, window_frame_indices
from stages.depth.vda.runner import VDARunner

SPEC = Path(__file__).resolve().parents[2] / "shared" / "parity" / "vda" / "state_dict.vits.json"


def _meta_model(encoder: str):
    with torch.device("meta"):
        return build_vda(encoder)


@pytest.fixture(scope="module")
def tiny_model():
    return randomize_(build_vda("vits"), seed=1)


def test_vits_keys_match_official_spec():
    if not SPEC.is_file():
        pytest.skip(f"no spec at {SPEC}")
    spec = json.loads(SPEC.read_text())
    sd = _meta_model("vits").state_dict()
    assert set(sd) == set(spec)
    for k, v in spec.items():
        assert list(sd[k].shape) == v["shape"], k


@pytest.mark.parametrize(
    "encoder,dim,depth,features,oc",
    [("vitb", 768, 12, 128, (96, 192, 384, 768)), ("vitl", 1024, 24, 256, (256, 512, 1024, 1024))],
)
def test_larger_configs_param_names_and_shapes(encoder, dim, depth, features, oc):
    sd = _meta_model(encoder).state_dict()
    # same name set as vits, with `depth` encoder blocks
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"pretrained\.blocks\.(\d+)\.", k))}
    assert blocks == set(range(depth))
    per_block = {k.split(".", 3)[3] for k in sd if k.startswith("pretrained.blocks.0.")}
    assert len(sd) == 351 - 12 * 14 + depth * len(per_block)  # vits has 351 entries, 14 per block
    expect = {
        "pretrained.pos_embed": (1, 1370, dim),
        "pretrained.patch_embed.proj.weight": (dim, 3, 14, 14),
        "pretrained.blocks.0.attn.qkv.weight": (3 * dim, dim),
        "pretrained.blocks.0.mlp.fc1.weight": (4 * dim, dim),
        "head.projects.0.weight": (oc[0], dim, 1, 1),
        "head.resize_layers.0.weight": (oc[0], oc[0], 4, 4),
        "head.resize_layers.1.weight": (oc[1], oc[1], 2, 2),
        "head.resize_layers.3.weight": (oc[3], oc[3], 3, 3),
        "head.scratch.layer1_rn.weight": (features, oc[0], 3, 3),
        "head.scratch.layer4_rn.weight": (features, oc[3], 3, 3),
        "head.scratch.output_conv1.weight": (features // 2, features, 3, 3),
        "head.scratch.output_conv2.0.weight": (32, features // 2, 3, 3),
        "head.motion_modules.0.temporal_transformer.proj_in.weight": (oc[2], oc[2]),
        "head.motion_modules.1.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight": (8 * oc[3], oc[3]),
        "head.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe": (
            1,
            32,
            features,
        ),
        "head.motion_modules.3.temporal_transformer.transformer_blocks.0.ff.net.2.weight": (features, 4 * features),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k


def test_missing_and_unexpected_keys_are_listed(tiny_model):
    sd = dict(tiny_model.state_dict())
    sd.pop("head.scratch.output_conv1.weight")
    sd["head.extra.weight"] = torch.zeros(1)
    sd["pretrained.norm.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_state_dict(build_vda("vits"), sd)
    msg = str(err.value)
    assert "head.scratch.output_conv1.weight" in msg and "missing" in msg
    assert "head.extra.weight" in msg and "unexpected" in msg
    assert "pretrained.norm.weight" in msg and "shape" in msg
    assert isinstance(err.value, ValueError)


def test_wrong_encoder_checkpoint_is_refused(tiny_model):
    with pytest.raises(CheckpointMismatchError, match="shape mismatches.*encoder 'vits'"):
        load_official_state_dict(build_vda("vitb"), tiny_model.state_dict())


def test_weights_only_checkpoint_roundtrip(tmp_path, tiny_model):
    path = tmp_path / "metric_video_depth_anything_vits.pth"
    torch.save(tiny_model.state_dict(), path)
    m = load_checkpoint(path)
    assert m.encoder == "vits" and m.metric  # from the official file naming
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    m2 = load_checkpoint(f"file://{path}", metric=False)
    assert not m2.metric
    # any fsspec URL
    import fsspec

    with fsspec.open("memory://vda-test/video_depth_anything_vits.pth", "wb") as f:
        f.write(path.read_bytes())
    m3 = load_checkpoint("memory://vda-test/video_depth_anything_vits.pth")
    assert not m3.metric and torch.equal(
        m3.state_dict()["pretrained.pos_embed"], tiny_model.state_dict()["pretrained.pos_embed"]
    )
    # weights_only refuses pickled code
    bad = tmp_path / "bad.pth"
    torch.save({"x": _Evil()}, bad)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(bad)


class _Evil:
    pass


def test_network_size_rule():
    assert network_size(518, 518) == (518, 518)
    assert network_size(720, 1280) == (518, 924)
    assert network_size(480, 640) == (518, 686)
    assert network_size(120, 216, 112) == (112, 196)  # ratio 1.8 > 1.78: reduced input size
    h, w = network_size(300, 1200)
    assert h % 14 == 0 and w % 14 == 0


def test_window_indices_reuse_previous_inputs():
    idx = window_frame_indices(60)
    assert idx.shape == (num_windows(60), 32) == (3, 32)
    assert list(idx[0]) == list(range(32))
    keys = [0, 12, 24, 25, 26, 27, 28, 29, 30, 31]
    for k in range(1, 3):
        assert list(idx[k, :10]) == list(idx[k - 1, keys])
        assert list(idx[k, 10:]) == [min(22 * k + i, 59) for i in range(10, 32)]


def _video(t, h=30, w=40, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, h, w, 3))
    drift = np.arange(t)[:, None, None, None] * 3
    return ((base + drift + rng.integers(0, 20, (t, h, w, 3))) % 256).astype(np.uint8)


@pytest.mark.parametrize("metric", [False, True])
def test_batched_windows_equal_sequential_windows(tiny_model, metric):
    videos = [_video(50, seed=0), _video(23, seed=1), _video(30, h=28, w=56, seed=2)]
    seq = infer_videos(tiny_model, videos, 28, windows_per_batch=1, metric=metric, dedup=False)
    bat = infer_videos(tiny_model, videos, 28, windows_per_batch=8, metric=metric)
    for a, b, v in zip(seq, bat, videos):
        assert a.shape == v.shape[:3] and a.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * max(1.0, float(np.abs(a).max())))
    # and both equal the official control flow (one window per forward, CPU preprocessing)
    ref = infer_video_depth_official_style(tiny_model, videos[0], 28, metric=metric)
    np.testing.assert_allclose(bat[0], ref, rtol=0, atol=2e-5 * max(1.0, float(np.abs(ref).max())))


def test_runner_requires_checkpoint_or_opt_in():
    with pytest.raises(ValueError, match="checkpoint"):
        VDARunner("vits", None, False, "cpu", "fp32", 518, False, False)


def test_runner_predicts_several_clips(tmp_path, tiny_model):
    r = VDARunner("vits", None, False, "cpu", "fp32", 28, False, True)
    assert r.untrained and r.output_kind == "relative_disparity"
    clips = [_video(25), _video(9, h=20, w=30)]
    out = r.predict(clips)
    assert [o.shape for o in out] == [c.shape[:3] for c in clips]
    assert all(o.dtype == np.float32 and np.isfinite(o).all() and (o >= 0).all() for o in out)
    path = tmp_path / "video_depth_anything_vits.pth"
    torch.save(tiny_model.state_dict(), path)
    r2 = VDARunner("vits", str(path), True, "cpu", "fp32", 28, False, False)
    assert not r2.untrained and r2.metric and r2.output_kind == "metric_depth_m"


def test_a_model_built_without_default_init_then_filled_is_the_same_model(tmp_path, tiny_model):
    # the runner builds the network without its default initialisation (seconds of CPU per actor
    # start for vitl) because every weight is overwritten anyway: by the checkpoint or randomize_.
    # Nothing may stay unfilled: the state and the forward must equal the default-built model's.
    empty = randomize_(build_vda_empty("vits"), seed=1)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(empty.state_dict()[k], v), k
    path = tmp_path / "video_depth_anything_vits.pth"
    torch.save(tiny_model.state_dict(), path)
    loaded = load_checkpoint(path)
    x = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        want = tiny_model(x)
        assert torch.equal(empty(x), want)
        assert torch.equal(loaded(x), want)


def test_the_position_table_is_computed_on_the_cpu_even_under_the_meta_device():
    # build_vda_empty builds under torch.device("meta"); a first meta operation costs seconds of
    # one-off set-up in a fresh process (every model actor's start), for a table then discarded
    want = sinusoid_table(32, 16)
    with torch.device("meta"):
        got = sinusoid_table(32, 16)
    assert got.device.type == "cpu" and torch.equal(got, want)
    empty = build_vda_empty("vits")
    assert {p.device.type for p in empty.state_dict().values()} == {"cpu"}


def test_the_empty_model_is_allocated_on_the_device_asked_for():
    # the build's runner allocates it on its GPU and draws random weights there (randomize_ takes
    # the model's device): no CPU fill of 380M numbers per actor start
    meta = build_vda_empty("vits", device="meta")
    assert {p.device.type for p in meta.state_dict().values()} == {"meta"}


@pytest.mark.parametrize("hw", [(1, 200), (3, 400), (540, 4)])
def test_frames_too_thin_for_the_depth_model_are_said_so(hw):
    """At extreme aspect ratios the official rule reduces the input size to 0 pixels; the clip
    failed with torch's 'Input and output sizes should be greater than 0'."""
    from stages.depth.vda.infer import network_size

    with pytest.raises(ValueError, match="too thin for the depth model"):
        network_size(*hw)
