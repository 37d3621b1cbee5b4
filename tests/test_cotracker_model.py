"""CoTracker3 model, checkpoint loading, predictor schedule and runner (small, CPU)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.tracks.cotracker import StateDictMismatch, build_model, load_model, load_official_state_dict
from stages.tracks.cotracker.blocks import TrackTransformer, set_attention_impl
from stages.tracks.cotracker.load import export_official_state_dict, official_key, read_checkpoint
from stages.tracks.cotracker.model import CoTracker3, grid_points
from stages.tracks.cotracker.predictor import online_windows
from stages.tracks.cotracker.runner import CoTrackerRunner, resolve_query_frames

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "parity" / "cotracker3"


@pytest.fixture(scope="module")
def offline_sd():
    torch.manual_seed(1)
    return export_official_state_dict(build_model("offline"))


def test_key_names_match_official_spec():
    if not FIXTURE.is_dir():
        pytest.skip(f"parity fixture not found at {FIXTURE}")
    for variant in ("offline", "online"):
        spec = json.loads((FIXTURE / f"state_dict.{variant}.json").read_text())
        sd = build_model(variant).state_dict()
        names = {official_key(k): tuple(v.shape) for k, v in sd.items()}
        assert set(names) == set(spec)
        assert all(names[k] == tuple(spec[k]["shape"]) for k in spec)


def test_key_mapping_examples():
    assert official_key("encoder.stem.weight") == "fnet.conv1.weight"
    assert official_key("encoder.stages.1.first.proj.bias") == "fnet.layer2.0.downsample.0.bias"
    assert official_key("encoder.stages.3.second.conv2.weight") == "fnet.layer4.1.conv2.weight"
    assert official_key("transformer.virtual_tracks") == "updateformer.virual_tracks"
    assert (
        official_key("transformer.points_from_virtual.2.norm_ctx.weight")
        == "updateformer.space_point2virtual_blocks.2.norm_context.weight"
    )
    assert (
        official_key("transformer.virtual_from_points.0.attn.to_kv.bias")
        == "updateformer.space_virtual2point_blocks.0.cross_attn.to_kv.bias"
    )
    assert (
        official_key("transformer.virtual_self.1.mlp.fc1.weight")
        == "updateformer.space_virtual_blocks.1.mlp.fc1.weight"
    )


def test_load_errors_list_every_problem(offline_sd):
    model = build_model("offline")
    sd = dict(offline_sd)
    del sd["fnet.conv1.weight"], sd["updateformer.flow_head.bias"]
    sd["extra.thing"] = torch.zeros(1)
    sd["corr_mlp.fc1.weight"] = torch.zeros(3, 3)
    before = model.state_dict()["corr_mlp.fc1.bias"].clone()
    with pytest.raises(StateDictMismatch) as exc:
        load_official_state_dict(model, sd)
    msg = str(exc.value)
    for key in ("fnet.conv1.weight", "updateformer.flow_head.bias", "extra.thing", "corr_mlp.fc1.weight"):
        assert key in msg
    assert exc.value.missing == ["fnet.conv1.weight", "updateformer.flow_head.bias"]
    assert exc.value.unexpected == ["extra.thing"]
    assert torch.equal(model.state_dict()["corr_mlp.fc1.bias"], before), "model touched on failure"
    # the online checkpoint into the offline model: time_emb shape mismatch
    online = export_official_state_dict(build_model("online"))
    with pytest.raises(StateDictMismatch, match="time_emb"):
        load_official_state_dict(build_model("offline"), online)


def test_weights_only_roundtrip(tmp_path, offline_sd):
    path = tmp_path / "scaled_offline.pth"
    torch.save({"model": offline_sd}, path)  # the wrapped form the official loader accepts
    model = load_model(path)
    assert model.window_len == 60
    back = export_official_state_dict(model)
    assert set(back) == set(offline_sd)
    assert all(torch.equal(back[k], offline_sd[k]) for k in offline_sd)
    # fsspec URL
    import fsspec

    with fsspec.open("memory://ckpt/scaled_offline.pth", "wb") as f:
        torch.save(offline_sd, f)
    sd2 = read_checkpoint("memory://ckpt/scaled_offline.pth")
    assert all(torch.equal(sd2[k], offline_sd[k]) for k in offline_sd)
    with pytest.raises(ValueError, match="offline"):
        load_model(path, variant="online")


def test_weights_only_rejects_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": _Opaque()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_checkpoint(path)


class _Opaque:
    pass


def test_grid_points_match_official_layout():
    g = grid_points(4, (384, 512))
    assert g.shape == (16, 2)
    assert torch.allclose(g[0], torch.tensor([8.0, 8.0]))
    assert torch.allclose(g[3], torch.tensor([504.0, 8.0]))
    assert torch.allclose(g[-1], torch.tensor([504.0, 376.0]))


def _demo_schedule(num_frames: int, step: int = 8) -> list[tuple[int, int]]:
    """The official online demo's frame windows (processing calls only), simulated."""
    calls, first = [], True
    window: list[int] = []
    i = -1
    for i in range(num_frames):
        if i % step == 0 and i != 0:
            chunk = window[-2 * step :]
            if not first:
                calls.append((chunk[0], chunk[-1] + 1))
            first = False
        window.append(i)
    chunk = window[-(i % step) - step - 1 :]
    if not first:
        calls.append((chunk[0], chunk[-1] + 1))
    return calls


@pytest.mark.parametrize("t", list(range(9, 60)))
def test_online_windows_follow_demo_loop(t):
    assert online_windows(t, 16) == _demo_schedule(t)


def test_sdpa_matches_math_attention():
    torch.manual_seed(0)
    tr = TrackTransformer(in_dim=40, dim=64, heads=8, depth=2, num_virtual=4).eval()
    x = torch.randn(2, 5, 7, 40)
    with torch.no_grad():
        set_attention_impl(tr, "sdpa")
        a = tr(x)
        set_attention_impl(tr, "math")
        b = tr(x)
    assert torch.allclose(a, b, atol=1e-5)


def test_offline_and_online_forward_shapes_small_resolution():
    torch.manual_seed(0)
    model = CoTracker3(window_len=16, model_resolution=(64, 96)).eval()
    video = torch.rand(2, 10, 3, 64, 96) * 255
    q = torch.tensor([[0.0, 10.0, 20.0], [3.0, 50.0, 30.0]])[None].repeat(2, 1, 1)
    with torch.no_grad():
        coords, vis, conf = model(video, q, iters=2)
        assert coords.shape == (2, 10, 2, 2) and vis.shape == (2, 10, 2) and conf.shape == (2, 10, 2)
        assert torch.isfinite(coords).all()
        # batching is per-clip: clip 1 alone gives the same result
        c1, _, _ = model(video[1:], q[1:], iters=2)
        assert torch.allclose(c1, coords[1:], atol=1e-4)


def test_runner_requires_checkpoint_or_explicit_random():
    with pytest.raises(ValueError, match="checkpoint"):
        CoTrackerRunner("offline", None, "cpu", "fp32", 4, 1, allow_random_weights=False)
    with pytest.raises(ValueError):
        CoTrackerRunner("sideways", None, "cpu", "fp32", 4, 1, allow_random_weights=True)
    with pytest.raises(ValueError):
        CoTrackerRunner("offline", None, "cpu", "fp64", 4, 1, allow_random_weights=True)


def test_resolve_query_frames():
    assert resolve_query_frames(1, 24) == [0]
    assert resolve_query_frames(3, 24) == [0, 8, 16]
    assert resolve_query_frames([0, -1, 99, 0], 24) == [0, 23]
    with pytest.raises(ValueError):
        resolve_query_frames(0, 24)


@pytest.mark.parametrize("variant", ["offline", "online"])
def test_runner_tracks_batches_of_clips(variant):
    runner = CoTrackerRunner(
        variant,
        None,
        "cpu",
        "fp32",
        grid_size=3,
        query_frames=[0, 4],
        allow_random_weights=True,
        max_batch=2,
        iters=1,
        model_resolution=(64, 96),
    )
    assert runner.untrained
    rng = np.random.default_rng(0)
    clips = [
        rng.integers(0, 255, (10, 40, 50, 3), dtype=np.uint8),
        rng.integers(0, 255, (7, 30, 44, 3), dtype=np.uint8),
        rng.integers(0, 255, (10, 48, 64, 3), dtype=np.uint8),
    ]
    out = runner.track(clips)
    assert len(out) == 3
    for clip, (tr, vis), qf in zip(clips, out, runner.last_query_frames):
        t, h, w = clip.shape[:3]
        assert tr.shape == (t, 18, 2) and tr.dtype == np.float32
        assert vis.shape == (t, 18) and vis.dtype == bool
        assert np.all(np.isfinite(tr))
        # each track sits at its query point (d4s pixels) in its query frame, visible
        n = np.arange(18)
        assert np.all(vis[qf, n])
        q = tr[qf, n]
        assert q[:, 0].min() > 0 and q[:, 0].max() < w and q[:, 1].min() > 0 and q[:, 1].max() < h
        if variant == "online":
            assert not vis[:4, 9:].any()  # before their query frame online tracks are not visible


def test_runner_bf16_autocast_cpu():
    runner = CoTrackerRunner(
        "offline",
        None,
        "cpu",
        "bf16",
        grid_size=2,
        query_frames=1,
        allow_random_weights=True,
        iters=1,
        model_resolution=(64, 96),
    )
    ((tr, vis),) = runner.track([np.zeros((5, 32, 32, 3), dtype=np.uint8)])
    assert tr.shape == (5, 4, 2) and tr.dtype == np.float32


def test_a_read_only_video_from_the_object_store_becomes_a_tensor_without_a_warning():
    import warnings

    from stages.tracks.cotracker.runner import video_tensor

    video = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    video.flags.writeable = False  # as ray.get returns numpy arrays
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = video_tensor(video)
    assert torch.equal(t, torch.from_numpy(video.copy()))
    writable = video.copy()
    assert video_tensor(writable).data_ptr() == writable.ctypes.data  # no copy when it may be shared


def test_runner_refuses_frames_that_are_not_uint8():
    """Frames are uint8 0..255 (as VDA's runner requires): float frames were read on the 0..255
    scale whatever their range, and NaN gave non-finite tracks without an error."""
    runner = CoTrackerRunner(
        "offline", None, "cpu", "fp32", grid_size=2, allow_random_weights=True, iters=1, model_resolution=(32, 32)
    )
    frames = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        runner.track([frames])
    with pytest.raises(ValueError, match="uint8"):
        runner.track([torch.from_numpy(frames)])
