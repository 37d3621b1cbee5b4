"""Training speed switches (training/speed.py, docs/TRAINING.md "Speed") keep the losses: each is run with
and without on the tiny model on CPU; and the training step reads nothing back from the device."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from training import speed
from training.config import make_config
from training.model import Diff4Splat
from training.render_torch import rasterize

RES, T = 24, 5


def _batch(seed=0):
    from training.data import collate, process
    from training.synthetic import make_clip

    clip = make_clip(seed, t=T, size=RES, dynamic=True)
    return collate([process(clip, list(range(T)), RES, 16, np.random.default_rng(seed))])


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return Diff4Splat(cfg)


def _loss_and_grads(model, cfg, batch, seed=1, frames=(0, 2)):
    """One training forward/backward with fixed randomness -> (loss, metrics, {param: grad})."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss, met = model(batch, stage=cfg.stages[-1], rasterize=rasterize, render_frames=list(frames))
    loss.backward()
    return float(loss.detach()), met, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, rtol):
    la, ma, ga = a
    lb, mb, gb = b
    assert abs(la - lb) <= rtol * abs(la), (la, lb)
    assert ga.keys() == gb.keys()
    worst = max(float((ga[k] - gb[k]).norm() / (ga[k].norm() + 1e-12)) for k in ga if ga[k].norm() > 1e-8)
    assert worst <= rtol * 10, worst
    return worst


@pytest.fixture(scope="module")
def setup():
    cfg = make_config("tiny")
    return cfg, _batch()


def test_attention_backends_same_losses(setup):
    """The math (reference) and flash kernels both run on a CPU; cuDNN and memory-efficient are GPU-only
    (bench/bench_speed.py times them there)."""
    cfg, batch = setup
    model = _model(cfg)
    runs = {}
    for backend in ("math", "flash"):
        with speed.attention_context(backend):  # a backend that cannot run raises: no silent fallback
            runs[backend] = _loss_and_grads(model, cfg, batch)
    _close(runs["math"], runs["flash"], 1e-4)


def test_attention_backend_is_enforced():
    q = torch.randn(1, 2, 8, 4)
    with speed.attention_context("cudnn"), pytest.raises(RuntimeError):  # no cuDNN attention on a CPU
        torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_compiled_blocks_same_losses(setup):
    """The wiring (blocks' forwards compiled in place, parameter names unchanged) with the "aot_eager"
    backend, which traces like inductor but runs the traced ops as they are; inductor itself: slow test
    below and the GPU check (bench/bench_speed.py)."""
    cfg, batch = setup
    model = _model(cfg)
    names = list(model.state_dict())
    ref = _loss_and_grads(model, cfg, batch)
    assert speed.compile_blocks(model, backend="aot_eager") == cfg.backbone.transformer.num_layers + cfg.ldrm.num_blocks
    assert list(model.state_dict()) == names  # checkpoints unchanged
    _close(ref, _loss_and_grads(model, cfg, batch), 1e-5)


@pytest.mark.slow
def test_inductor_compiled_blocks_same_losses(setup):
    cfg, batch = setup
    model = _model(cfg)
    ref = _loss_and_grads(model, cfg, batch)
    speed.compile_blocks(model)
    _close(ref, _loss_and_grads(model, cfg, batch), 1e-4)


def test_compiled_vae_encoder_same_latents_and_losses(setup):
    """``runtime.compile_vae``: the frozen encoder's forward compiled in place (its GroupNorms, SiLUs,
    casts and residual adds fuse: 2.5x faster on an H200, bench/RESULTS.md §4e), same latents (same
    noise), same losses, parameter names unchanged; "aot_eager" traces like inductor on the CPU."""
    cfg, batch = setup
    video = batch["video"] * 2 - 1
    model = _model(cfg)
    names = list(model.state_dict())
    torch.manual_seed(3)
    ref_lat = model.backbone.encode(video)
    ref = _loss_and_grads(model, cfg, batch)
    speed.compile_vae_encoder(model.backbone, backend="aot_eager")
    assert list(model.state_dict()) == names
    assert "forward" in model.backbone.vae.encoder.__dict__  # compiled in place, module unchanged
    torch.manual_seed(3)
    torch.testing.assert_close(model.backbone.encode(video), ref_lat, rtol=1e-5, atol=1e-5)
    _close(ref, _loss_and_grads(model, cfg, batch), 1e-5)


def test_checkpoint_mask_spreads_the_chosen_blocks():
    assert speed.checkpoint_mask(30, 1.0) == [True] * 30
    assert speed.checkpoint_mask(30, 0.0) == [False] * 30
    half = speed.checkpoint_mask(30, 0.5)
    assert sum(half) == 15 and half[:4] == [False, True, False, True]
    third = speed.checkpoint_mask(16, 1 / 3)
    assert sum(third) == 5 and max(i for i, m in enumerate(third) if m) >= 12  # spread to the last blocks
    with pytest.raises(ValueError):
        speed.checkpoint_mask(4, 1.5)


def test_selective_checkpointing_recomputes_only_chosen_blocks_and_keeps_gradients(setup):
    cfg = make_config("tiny", backbone={"transformer": {"num_layers": 4}}, ldrm={"num_blocks": 4})
    batch = setup[1]
    model = _model(cfg)
    ref = _loss_and_grads(model, cfg, batch)
    model.set_gradient_checkpointing(True, fraction=0.5)
    calls = {}

    def counting(i, forward):  # the recomputation calls forward again (module hooks do not fire there)
        def run(*a, **k):
            calls[i] = calls.get(i, 0) + 1
            return forward(*a, **k)

        return run

    for i, b in enumerate(speed.transformer_blocks(model)):
        b.forward = counting(i, b.forward)
    other = _loss_and_grads(model, cfg, batch)
    # the two halves (backbone blocks 0-3, LDRM blocks 4-7): blocks 1 and 3 of each run again in backward
    assert [calls[i] for i in range(8)] == [1, 2, 1, 2, 1, 2, 1, 2]
    _close(ref, other, 1e-6)


def test_fused_adamw_same_updates(setup):
    """Three AdamW steps from the same gradients, fused kernel vs PyTorch's default: the same parameters
    to float rounding (the gradients of one real backward pass, reused so only the optimiser differs)."""
    cfg, batch = setup
    model = _model(cfg)
    _, _, grads = _loss_and_grads(model, cfg, batch)
    start = {n: p.detach() for n, p in model.named_parameters() if n in grads}
    params = {}
    for fused in (False, True):
        ps = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
        opt = speed.make_optimizer(ps.values(), cfg.optim.model_copy(update={"fused": fused}))
        assert bool(opt.defaults["fused"]) == fused
        for k in range(3):
            for n, p in ps.items():
                p.grad = grads[n] * (1 + k)
            opt.step()
        params[fused] = ps
    moved = max(float((params[True][n] - start[n]).abs().max()) for n in start)
    diff = max(float((params[True][n] - params[False][n]).abs().max()) for n in start)
    # a float32 ulp or two of the parameters (~1e-8 here); the updates themselves are 1e5 times larger
    assert moved > 1e-3 and diff < 1e-5 * moved, (moved, diff)


def test_vae_bf16_close_to_float32_with_the_same_noise(setup):
    cfg, batch = setup
    video = batch["video"] * 2 - 1
    model = _model(cfg)
    lat = {}
    for prec in ("float32", "bfloat16"):
        model.backbone.cfg = cfg.backbone.model_copy(update={"vae_precision": prec})
        torch.manual_seed(3)
        lat[prec] = model.backbone.encode(video)
    assert lat["bfloat16"].dtype == torch.float32
    rel = float((lat["bfloat16"] - lat["float32"]).norm() / lat["float32"].norm())
    assert 0 < rel < 2e-2, rel  # bf16 rounding, not different noise (that would be ~100 %)
    bf = cfg.model_copy(update={"backbone": cfg.backbone.model_copy(update={"vae_precision": "bfloat16"})})
    a = _loss_and_grads(_model(cfg), cfg, batch)
    b = _loss_and_grads(_model(bf), bf, batch)
    assert abs(a[0] - b[0]) <= 2e-2 * abs(a[0]), (a[0], b[0])


def test_vae_encodes_each_sample_once_per_step(setup):
    cfg, batch = setup
    model = _model(cfg)
    seen = []
    model.backbone.vae.encoder.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    _loss_and_grads(model, cfg, batch)
    # the encoder is called once per chunk of frames (diffusers: 8 at a time); T=5 frames: one call,
    # whole clip, and the first-frame latent is taken from it rather than encoded again
    assert [s[2] for s in seen] == [T] and seen[0][0] == 1


class _Syncs(TorchDispatchMode):
    """Records aten ops that make the host wait for the device: reading a value (``.item()``, ``bool()``,
    ``float()``: ``_local_scalar_dense``) and ops whose output size depends on values (``nonzero``,
    boolean-mask selection)."""

    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "nonzero_static"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            import traceback

            ours = [f for f in traceback.format_stack() if "/training/" in f or "/tests/" in f]
            self.seen.append((func.overloadpacket.__name__, ours[-3:]))
        return func(*args, **(kwargs or {}))


def test_training_step_reads_nothing_back_from_the_device(setup):
    """The whole step as the trainer runs it (forward, backward, gradient clipping, fused AdamW,
    metrics), under a mode that flags host reads of device values; only the rasteriser is exempt (gsplat
    sizes its tile lists on the host). On CPU every tensor is a host tensor, so this flags what would
    be a sync on a GPU."""
    from training.trainer import HOST_KEYS, _to_device, train_step

    cfg, batch = setup
    batch = {**batch, "caption": [""]}  # as the loader gives it
    assert set(HOST_KEYS) == {"has_depth", "has_tracks"}
    assert _to_device(batch, torch.device("cpu"))["has_depth"] is batch["has_depth"]
    model = _model(cfg)
    opt = speed.make_optimizer([p for n, p in model.named_parameters() if ".vae." not in f".{n}"], cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def render(*a, **k):
        with _disable_current_modes():
            return rasterize(*a, **k)

    stage = cfg.stages[-1]
    assert "motion" in stage.losses and "geo" in stage.losses  # every loss term runs
    mode = _Syncs()
    with mode:
        agg, norm = train_step(
            model, model, opt, sched, iter([batch]), stage, cfg, torch.device("cpu"), rasterize=render
        )
    assert not mode.seen, "".join(f"\n{op}:\n" + "".join(stack) for op, stack in mode.seen[:3])
    assert torch.is_tensor(norm) and all(torch.is_tensor(s) for s, _ in agg.values())
    assert agg["motion"][1] == 1 and float(agg["motion"][0]) > 0  # the motion term ran (synthetic tracks)


class _BigOutputs(TorchDispatchMode):
    """Records the aten ops that write a new tensor of exactly ``numel`` elements (views left out)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == self.numel and not func.is_view:
            self.ops.append(func.overloadpacket.__name__)
        return out


def test_backward_writes_the_deformation_gradient_a_few_times_not_per_rendered_frame(setup):
    """The per-pixel deformation (B,S,H,W,T,K) is the largest tensor of the step (~7 GB at 49 x 512²).
    Slicing it per rendered frame and per birth frame made the backward write a zero tensor of its full
    size for every slice and add them up: on an H200, 96 ms of fills and 261 ms of float adds per step
    at 49 x 512² (bench/RESULTS.md §4e). Taken apart once per sample (``unbind``), its gradient is
    written a few times whatever the number of rendered frames; the gradients are the same."""
    from training.render_torch import rasterize

    cfg, batch = setup
    model = _model(cfg)
    seen = {}
    model.ldrm.register_forward_hook(lambda m, i, o: seen.__setitem__("numel", o.deform.numel()))
    writes = {}
    for frames in ([0], list(range(T))):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        loss, _ = model(batch, stage=cfg.stages[-1], rasterize=rasterize, render_frames=frames)
        mode = _BigOutputs(seen["numel"])
        with mode:
            loss.backward()
        writes[len(frames)] = mode.ops
    # per sample: its slice of the batch, the unbind, the track term's sampling; none per rendered frame
    # (before: 38 writes for 5 rendered frames, 4 per frame on top of the rest)
    assert len(writes[T]) == len(writes[1]) <= 6, writes


def test_maps_sliced_once_give_the_same_gaussians_and_gradients(setup):
    from training.gaussians import gaussians_at, sample_maps

    cfg, batch = setup
    model = _model(cfg)
    seen = {}
    model.ldrm.register_forward_hook(lambda m, i, o: seen.__setitem__("maps", o))
    torch.manual_seed(1)
    model(batch, stage=cfg.stages[-1], rasterize=rasterize, render_frames=[0])
    maps = seen["maps"]
    assert maps.deform is not None
    leaves = [maps.deform, maps.depth, maps.quat, maps.scale]
    grads = []
    for shared in (False, True):
        sm = sample_maps(maps, 0) if shared else None
        total = 0
        for tau in range(T):
            g = gaussians_at(maps, 0, tau, 0.0, drop=False, sample=sm)
            total = total + (g.means * 1.3).sum() + (g.quats * 0.7).sum() + g.scales.sum()
        grads.append(torch.autograd.grad(total, leaves, retain_graph=True))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_loader_frames_travel_as_uint8_and_arrive_as_the_same_floats(tmp_path):
    """The training loader ships uint8 frames (a quarter of the bytes); the trainer's device copy makes them
    the floats that ``process`` gives, exactly."""
    from training.config import DataConfig
    from training.data import DECODE, iter_tar, make_loader, process
    from training.synthetic import write_shards
    from training.trainer import _to_device

    write_shards(str(tmp_path), n_clips=1, per_shard=1, t=T, size=RES, datasets=("synth_dynamic",))
    stage = make_config("tiny").stages[-1]
    batch = next(iter(make_loader(DataConfig(root=str(tmp_path), shuffle_buffer=1), stage, 0, 16, 1, 0, 1)))
    assert batch["video"].dtype == torch.uint8
    ref = process(
        DECODE(next(iter_tar(str(next(tmp_path.glob("shards/*.tar")))))),
        None,
        stage.resolution,
        16,
        np.random.default_rng(0),
    )["video"]
    got = _to_device(batch, torch.device("cpu"))["video"][0]  # all T frames of a T-frame clip (stride 1)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
