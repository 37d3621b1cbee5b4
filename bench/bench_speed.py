"""Training at speed on one GPU (issue #17): bf16 peak, FLOPs and MFU of the full preset at 49 frames,
switches off vs on, each switch's gain, a profile of where the time goes, and the loader's rate.

    python bench/bench_speed.py --out DIR [--budget 400]       # one GPU, ~7 minutes
    python bench/bench_speed.py --out DIR --cpu-smoke          # every code path, tiny sizes, on a CPU

What it runs, in order, each phase skipped (and said so) when the time budget cannot fit it:

1. in the background: gsplat's CUDA build (JIT, one architecture) and the loader's shards
   (bench/bench_loader.py: 8 clips of 49 frames at 512², photograph-like JPEG texture);
2. the bf16 (and TF32) matmul peak of this GPU; F.scaled_dot_product_attention forward + backward at the
   backbone's shape per kernel (flash, cuDNN, memory-efficient); the frozen VAE's encode of 49 x 512²
   in float32 and bfloat16; while gsplat still builds, the backbone and the LDRM alone (forward + backward);
3. case "512 off": the full preset, 49 frames at 512², the curriculum's dynamic stage (every loss,
   deformation trained), every speed switch off; case "512 on": the same with them on (bf16 VAE,
   compiled blocks, fused AdamW, the fastest attention kernel of step 2). The same initial weights,
   batches and random draws: the losses of their first steps side by side are the bf16-noise check.
   s/step, samples/s, achieved TFLOP/s and MFU (training/flops.py's formula over the measured peak), peak
   memory, host-device syncs in a step (CUDA's sync debug mode, with where they come from);
4. a torch.profiler profile of two "512 on" steps: GPU time by phase (VAE encode, backbone, LDRM,
   rendering, losses, backward, optimiser) and by kernel class (attention, GEMM, convolution, gsplat,
   optimiser, communication, other);
5. each switch's gain: from "512 on", one switch at a time turned off (and activation checkpointing of
   half and of all blocks: time and memory);
6. the loader (training.data.make_loader, batch 1, one rank) with 8 and 16 workers at 49 x 512² and 8 at
   49 x 256², against the model's consumption;
7. cases "256 off" / "256 on": 49 frames at 256², the static 256² stage.

Batches are two synthetic dynamic clips (training/synthetic.py, rendered on the GPU) at the stage's size,
through the loader's own processing; the step is ``training.trainer.train_step``, the trainer's. LPIPS off
(no VGG weights on the machine). Writes DIR/bench_speed.json and DIR/bench_speed.md (after every phase).
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch

T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[bench_speed {time.perf_counter() - T0:5.0f}s]", *a, flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.deadline = T0 + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, estimate: float) -> bool:
        return self.left() > estimate


# --- background work ------------------------------------------------------------------------------
def start_background(out_shards: str, frames: int, src: int, clips: int, smoke: bool):
    """-> (gsplat build process or None, loader shard writer process)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    gsplat = None
    if not smoke and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        genv = {**env, "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", "MAX_JOBS": str(max(4, (os.cpu_count() or 8) - 2))}
        gsplat = subprocess.Popen(
            [sys.executable, "-c", "from gsplat.cuda._backend import _C; assert _C is not None"],
            env=genv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    code = (
        f"from bench.bench_loader import write_shards; import json; "
        f"json.dump(write_shards({out_shards!r}, {clips}, {frames}, {src}), open({out_shards!r} + '/shards.json', 'w'))"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return gsplat, writer


# --- micro-benchmarks -----------------------------------------------------------------------------
def _timed(fn, device, iters: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def matmul_peak(device, n: int, iters: int) -> dict:
    """TFLOP/s of an n x n x n matmul in bf16, and in float32 with TF32 (what cuDNN's float32 convolutions use)."""
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            out[f"{name}_tflops"] = 2 * n**3 / _timed(lambda: a @ b, device, iters) / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    out["n"] = n
    return out


def sdpa_bench(device, heads: int, tokens: int, head_dim: int, iters: int) -> dict:
    """Forward + backward of F.scaled_dot_product_attention per kernel at one shape (bf16)."""
    from training.speed import attention_context

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (
        torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    flops = 3 * 4.0 * tokens * tokens * head_dim * heads  # forward 4 N^2 d, backward twice that
    out = {"shape": [1, heads, tokens, head_dim]}
    for backend in ("auto", "flash", "cudnn", "efficient") if device.type == "cuda" else ("auto", "flash", "math"):

        def run():
            with attention_context(backend):
                torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

        try:
            dt = _timed(run, device, iters)
            out[backend] = {"ms": dt * 1e3, "tflops": flops / dt / 1e12}
        except Exception as e:  # a kernel that cannot run this shape or dtype
            out[backend] = {"error": f"{type(e).__name__}: {e}"[:200]}
    return out


def vae_bench(cfg, frames: int, res: int, device, iters: int) -> dict:
    """The frozen VAE's encode of one clip in each precision (backbone.vae_precision)."""
    from training.backbone import VideoBackbone

    torch.manual_seed(0)
    with torch.device(device):
        bb = VideoBackbone(cfg.backbone).to(device)
    video = torch.rand(1, frames, 3, res, res, device=device) * 2 - 1
    out = {"frames": frames, "res": res}
    for prec in ("float32", "bfloat16"):
        bb.cfg = cfg.backbone.model_copy(update={"vae_precision": prec})
        out[prec] = {"ms": _timed(lambda: bb.encode(video), device, iters) * 1e3}
        torch.manual_seed(1)
        out[prec]["z"] = bb.encode(video)
    z32, z16 = out["float32"].pop("z"), out["bfloat16"].pop("z")
    out["rel_diff_bf16"] = float((z16 - z32).norm() / z32.norm())
    out["variants"] = vae_variants(bb.vae, video, device, iters)
    return out  # the 2B-parameter backbone goes with this frame (the caller empties the CUDA cache)


def vae_variants(vae, video, device, iters: int) -> dict:
    """Ways to run the same encode faster, timed alone, each with its posterior mean's relative
    difference to float32's: bf16 weights without autocast (autocast runs GroupNorm in float32:
    casts and twice the bytes for every norm and SiLU on the 49-frame activations), the same in
    channels_last_3d (cuDNN's preferred 3D layout), and the encoder compiled (norms and
    activations fused)."""
    import copy

    def mean_of(m, inp):
        with torch.no_grad():
            moments = m.encode(inp).latent_dist.parameters.float()
        return moments[:, : moments.shape[1] // 2]

    ref = mean_of(vae, video.transpose(1, 2).to(next(vae.parameters()).dtype))
    x = video.transpose(1, 2).to(torch.bfloat16)
    vae16 = copy.deepcopy(vae).to(torch.bfloat16)
    variants = [("bf16 weights, no autocast", None)]
    if device.type == "cuda":
        variants += [("bf16 weights, channels_last_3d", "cl"), ("bf16 weights, encoder compiled", "compile")]
    out = {}
    for name, how in variants:
        m, inp = vae16, x
        try:
            if how == "cl":  # Module.to(memory_format=...) refuses the non-5D parameters: convert the 5D ones
                m = copy.deepcopy(vae16)
                for p in m.parameters():
                    if p.dim() == 5:
                        p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
                inp = x.contiguous(memory_format=torch.channels_last_3d)
            elif how == "compile":
                m = copy.deepcopy(vae16)
                m.encoder = torch.compile(m.encoder, dynamic=False)
                t0 = time.perf_counter()
                mean_of(m, inp)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                out["compile_s"] = time.perf_counter() - t0
            ms = _timed(lambda m=m, inp=inp: mean_of(m, inp), device, iters) * 1e3
            d = mean_of(m, inp)
            out[name] = {"ms": ms, "rel_diff_vs_float32": float((d - ref).norm() / ref.norm())}
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        del m
    return out


def components_bench(cfg, stage, device, attention: str, iters: int) -> dict:
    """Forward + backward of the backbone alone and of the LDRM alone (bf16 autocast, eager, the given
    attention kernel) at the stage's size: their own TFLOP/s, apart from the VAE, maps and renderer."""
    from training import flops
    from training.model import Diff4Splat
    from training.speed import attention_context

    torch.manual_seed(0)
    with torch.device(device):
        model = Diff4Splat(cfg).to(device)
    model.apply_stage(stage)
    model.train()
    t, res = stage.num_frames, stage.resolution
    video = torch.rand(1, t, 3, res, res, device=device) * 2 - 1
    intr = torch.tensor([1.1 * res, 1.1 * res, res / 2, res / 2], device=device).expand(1, t, 4)
    c2w = torch.eye(4, device=device).expand(1, t, 4, 4).clone()
    c2w[0, :, 0, 3] = torch.linspace(0, 0.5, t, device=device)
    z0 = model.backbone.encode(video)
    pooled = model.backbone.pooled_plucker(intr, c2w, res, res)
    tt = torch.rand(1, device=device)
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def backbone():
        with attention_context(attention), ac:
            v = model.backbone.velocity(z0, tt, z0[:, :1], pooled)
        v.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def ldrm():
        z = z0.clone().requires_grad_(True)
        with attention_context(attention), ac:
            maps = model.ldrm(z, pooled, intr, c2w, t, with_deformation=True)
        (maps.depth.mean() + maps.colour.mean() + maps.deform.float().square().mean()).backward()
        model.zero_grad(set_to_none=True)

    f = flops.formula(cfg, stage)
    out = {"frames": t, "res": res, "attention": attention}
    for name, fn in (("backbone", backbone), ("ldrm", ldrm)):
        dt = _timed(fn, device, iters)
        out[name] = {"ms": dt * 1e3, "tflops": f[name] / dt / 1e12}
    return out


# --- training cases -------------------------------------------------------------------------------
SWITCHES_OFF = dict(
    vae="float32", attention="auto", compile=False, compile_vae=False, fused=False, cudnn=False, ckpt=None
)


def case_config(a, frames: int, res: int, stage_name: str, on: dict):
    from training.config import make_config

    base = make_config(a.preset)
    stage = next(s for s in base.stages if s.name == stage_name).model_copy(
        update={"num_frames": frames, "resolution": res}
    )
    return make_config(
        a.preset,
        stages=[stage.model_dump()],
        loss={"lpips_enabled": False},
        backbone={"vae_precision": on["vae"]},
        optim={"fused": on["fused"], "warmup_steps": 0},
        runtime={
            "compile": on["compile"],
            "compile_vae": on.get("compile_vae", False),
            "attention_backend": on["attention"],
            "use_gpu": a.device == "cuda",
            "cudnn_benchmark": on["cudnn"],
            "bf16": True,
            "grad_checkpointing": on["ckpt"] is not None,
            "checkpoint_fraction": on["ckpt"] if on["ckpt"] is not None else 1.0,
        },
    )


def make_batches(frames: int, src: int, res: int, device, n: int = 2) -> list[dict]:
    """``n`` synthetic dynamic clips through the loader's processing (uint8 video, host flags)."""
    import numpy as np

    from training.data import collate, process
    from training.synthetic import make_clip

    out = []
    for i in range(n):
        clip = make_clip(i, t=frames, size=src, dynamic=True, device=str(device))
        item = process(clip, list(range(frames)), res, 256, np.random.default_rng(i), video_uint8=True)
        item["caption"] = ""
        batch = collate([item])
        if device.type == "cuda":  # as the trainer's loader gives them (pin_memory)
            batch = {k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in batch.items()}
        out.append(batch)
    return out


class Case:
    """One model + optimiser at one size, stepped with the trainer's ``train_step``."""

    def __init__(self, a, frames, res, stage_name, on, batches, compile_backend="inductor"):
        from training.model import Diff4Splat
        from training.render_gsplat import get_rasterizer
        from training.speed import compile_blocks, compile_vae_encoder, make_optimizer, transformer_blocks

        self.a, self.on, self.batches = a, dict(on), batches
        self.cfg = case_config(a, frames, res, stage_name, on)
        self.stage = self.cfg.stages[0]
        self.device = torch.device(a.device)
        torch.manual_seed(0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.backends.cudnn.benchmark = on["cudnn"]
        with torch.device(self.device):
            self.model = Diff4Splat(self.cfg).to(self.device)
        rt = self.cfg.runtime
        self.model.set_gradient_checkpointing(rt.grad_checkpointing, rt.checkpoint_fraction)
        self.blocks = transformer_blocks(self.model)
        self.compiled = {}
        if rt.compile:
            compile_blocks(self.model, backend=compile_backend)
            self.compiled = {b: b.forward for b in self.blocks}
        self.encoder = self.model.backbone.vae.encoder
        if rt.compile_vae:
            compile_vae_encoder(self.model.backbone, backend=compile_backend)
        self.compiled_vae = self.encoder.__dict__.get("forward")
        self.model.apply_stage(self.stage)
        self.model.train()
        self.model.backbone.vae.eval()
        self.params = [p for n, p in self.model.named_parameters() if ".vae." not in f".{n}"]
        self.opt = make_optimizer(self.params, self.cfg.optim)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        self.rasterize = get_rasterizer("auto" if self.device.type == "cuda" else "torch")
        self.n = 0

    def _train_step(self, batch: dict, autocast: bool) -> dict:
        """One optimiser step of the model on ``batch`` (the trainer's own step); its aggregated losses."""
        from training.trainer import train_step

        agg, _ = train_step(
            self.model,
            self.model,
            self.opt,
            self.sched,
            iter([batch]),
            self.stage,
            self.cfg,
            self.device,
            rasterize=self.rasterize,
            autocast=autocast,
        )
        return agg

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def steps(self, k: int) -> tuple[float, list[float]]:
        """``k`` steps timed together (host and GPU overlap as in training) -> (s/step, their losses)."""
        self._sync()
        t = time.perf_counter()
        losses = []
        for _ in range(k):
            torch.manual_seed(1000 + self.n)  # the same draws (t, noise, frames) in every case at step n
            batch = copy.copy(self.batches[self.n % len(self.batches)])
            agg = self._train_step(batch, autocast=self.device.type == "cuda")
            losses.append(agg["loss"][0].detach())
            self.n += 1
        self._sync()
        return (time.perf_counter() - t) / k, [float(x) for x in losses]

    def set(self, **change) -> None:
        """Turn switches on this model without rebuilding it (for the one-at-a-time gains)."""
        from training.speed import make_optimizer

        self.on.update(change)
        if "vae" in change:
            self.model.backbone.cfg = self.model.backbone.cfg.model_copy(update={"vae_precision": change["vae"]})
        if "attention" in change:
            self.cfg = self.cfg.model_copy(
                update={"runtime": self.cfg.runtime.model_copy(update={"attention_backend": change["attention"]})}
            )
        if "compile" in change:
            for b in self.blocks:
                if change["compile"] and b in self.compiled:
                    b.forward = self.compiled[b]
                elif not change["compile"] and "forward" in b.__dict__:
                    del b.forward  # back to the class's eager forward
        if "compile_vae" in change:
            if change["compile_vae"] and self.compiled_vae is not None:
                self.encoder.forward = self.compiled_vae
            elif not change["compile_vae"] and "forward" in self.encoder.__dict__:
                del self.encoder.forward
        if "cudnn" in change:
            torch.backends.cudnn.benchmark = change["cudnn"]
        if "fused" in change:
            del self.opt, self.sched  # the scheduler holds the optimiser: both go before the new one exists
            gc.collect()
            self.opt = make_optimizer(self.params, self.cfg.optim.model_copy(update={"fused": change["fused"]}))
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        if "ckpt" in change:
            self.model.set_gradient_checkpointing(change["ckpt"] is not None, change["ckpt"] or 1.0)

    def syncs(self) -> dict:
        """Host-device syncs in one step, by CUDA's sync debug mode, with the lines that cause them."""
        if self.device.type != "cuda":
            return {"skipped": "no CUDA"}
        self._sync()
        batch = copy.copy(self.batches[self.n % len(self.batches)])
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self._train_step(batch, autocast=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.n += 1
        self._sync()
        sites = collections.Counter(
            f"{os.path.relpath(w.filename, REPO)}:{w.lineno}" for w in got if "synchroniz" in str(w.message)
        )
        return {"count": sum(sites.values()), "sites": dict(sites.most_common(12))}

    def free(self) -> None:
        del self.model, self.opt, self.sched, self.params, self.blocks, self.compiled
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def run_case(a, name, frames, res, stage_name, on, batches, peak, warm: int, timed: int, keep=False):
    from training import flops

    log(f"case {name}: building")
    t = time.perf_counter()
    c = Case(a, frames, res, stage_name, on, batches, compile_backend=a.compile_backend)
    build = time.perf_counter() - t
    warm_s, warm_losses = [], []
    oom = False
    try:
        for _ in range(warm):  # the first includes compilation and allocator warm-up
            dt, ls = c.steps(1)
            warm_s.append(dt)
            warm_losses += ls
        dt, losses = c.steps(timed)
    except torch.cuda.OutOfMemoryError:
        if on["ckpt"] is not None:
            raise
        oom = True  # retried below, once the exception (and the activations it holds) is gone
    if oom:
        c.free()
        log(f"case {name}: out of memory, again with every block checkpointed")
        return run_case(
            a,
            name + " (checkpointed: OOM without)",
            frames,
            res,
            stage_name,
            {**on, "ckpt": 1.0},
            batches,
            peak,
            warm,
            timed,
            keep,
        )
    f = flops.formula(c.cfg, c.stage)
    res_ = {
        "name": name,
        "frames": frames,
        "res": res,
        "stage": stage_name,
        "switches": dict(on),
        "build_s": build,
        "warmup_s": warm_s,
        "s_per_step": dt,
        "samples_per_s": 1 / dt,
        "flops_per_sample": f,
        "tflops": f["total"] / dt / 1e12,
        "mfu": f["total"] / dt / peak if peak else None,
        "peak_mem_gb": peak_gb(c.device),
        "losses": warm_losses + losses,
    }
    res_["syncs"] = c.syncs()
    log(
        f"case {name}: {dt:.3f} s/step, MFU {res_['mfu'] or 0:.3f}, peak {res_['peak_mem_gb']:.1f} GB, "
        f"syncs/step {res_['syncs'].get('count')}"
    )
    if keep:
        return res_, c
    c.free()
    return res_, None


# --- profile --------------------------------------------------------------------------------------
KERNEL_CLASSES = [  # first match wins
    ("attention", r"flash|fmha|sdpa|attention|attn"),
    ("communication", r"nccl"),
    # gsplat's kernels are in its namespace; not "tile": cuDNN's convolutions are named "...tilesize..."
    ("gsplat (projection, tiling, rasterisation)", r"gsplat|rasteriz|isect"),
    ("optimiser", r"adam|multi_tensor|foreach"),
    (
        "convolution (VAE, LDRM deconvolution, patch embedding; with cuDNN's layout changes)",
        r"conv|fprop|dgrad|wgrad|implicit|winograd|nchwtonhwc|nhwctonchw",
    ),
    (
        "GEMM (linear layers: QKV/out projections, MLPs)",
        r"gemm|matmul|xmma|cutlass|cublas|nvjet|sm90|sm80|ampere|hopper",
    ),
    ("memory copies", r"memcpy|memset"),
]


def classify(kernel: str) -> str:
    k = kernel.lower()
    for name, pat in KERNEL_CLASSES:
        if re.search(pat, k):
            return name
    return "other (element-wise, norms, reductions, softmax)"


def profile(case: Case, steps: int = 2) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device.type == "cuda" else [])
    case._sync()
    t = time.perf_counter()
    with tprofile(activities=acts) as prof:
        case.steps(steps)
    wall = (time.perf_counter() - t) / steps
    ka = prof.key_averages()
    dev = case.device.type == "cuda"
    phases = {}
    for e in ka:
        if e.key.startswith("d4s/") and getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU:
            phases[e.key[4:]] = {
                "cpu_ms": e.cpu_time_total / 1e3 / steps,
                "gpu_ms": (e.device_time_total / 1e3 / steps) if dev else None,
            }
    kernels: dict[str, float] = collections.defaultdict(float)
    top: dict[str, float] = collections.defaultdict(float)
    for e in ka:
        is_kernel = dev and getattr(e, "device_type", None) == DeviceType.CUDA
        if not is_kernel or e.key.startswith(("d4s/", "ProfilerStep")):
            continue
        ms = e.self_device_time_total / 1e3 / steps
        kernels[classify(e.key)] += ms
        top[e.key[:90]] += ms
    busy = sum(kernels.values())
    if dev:  # the backward runs on autograd's device thread, outside the forward phases' ranges
        fwd = sum((p["gpu_ms"] or 0) for k, p in phases.items() if k not in ("backward",))
        phases["backward (GPU time not in the ranges above)"] = {"cpu_ms": None, "gpu_ms": max(busy - fwd, 0.0)}
    return {
        "steps": steps,
        "wall_ms_per_step": wall * 1e3,
        "gpu_busy_ms_per_step": busy if dev else None,
        "phases": phases,
        "kernel_classes": dict(sorted(kernels.items(), key=lambda x: -x[1])),
        "top_kernels": dict(sorted(top.items(), key=lambda x: -x[1])[:15]),
    }


# --- loader ---------------------------------------------------------------------------------------
def loader_runs(root: str, frames: int, plan: list[tuple[int, int]], seconds: float, budget: Budget) -> list[dict]:
    from bench.bench_loader import measure

    out = []
    for res, workers in plan:
        if not budget.fits(seconds + 15):
            out.append({"res": res, "workers": workers, "skipped": "time budget"})
            continue
        r = measure(root, frames, res, workers, seconds)
        r["res"] = res
        out.append(r)
        log(f"loader {res}² x {workers} workers: {r['samples_per_s']:.2f} samples/s")
    return out


# --- report ---------------------------------------------------------------------------------------
def render_md(r: dict) -> str:
    L = [f"# bench_speed ({r['device']}, torch {r['torch']}, {r.get('cpus')} CPUs)", ""]
    p = r.get("peak", {})
    if p:
        L += [
            f"Matmul peak ({p['n']}³): bf16 **{p['bf16_tflops']:.0f} TFLOP/s**, TF32 {p['tf32_tflops']:.0f} TFLOP/s "
            "(MFU below is against the bf16 figure).",
            "",
        ]
    s = r.get("sdpa")
    if s:
        L += [
            f"Attention forward + backward, shape {s['shape']} (the backbone's at {r.get('size', '')}):",
            "",
            "| kernel | ms | TFLOP/s |",
            "|---|---|---|",
        ]
        for k, v in s.items():
            if isinstance(v, dict):
                L.append(f"| {k} | {v['ms']:.1f} | {v['tflops']:.0f} |" if "ms" in v else f"| {k} | {v['error']} | |")
        L.append("")
    v = r.get("vae")
    if v:
        L += [
            f"VAE encode of {v['frames']} x {v['res']}²: float32 {v['float32']['ms']:.0f} ms, bfloat16 "
            f"{v['bfloat16']['ms']:.0f} ms; latents differ by {v['rel_diff_bf16']:.2e} (relative norm).",
            "",
        ]
        if v.get("variants"):
            L += ["| VAE encode variant | ms | posterior mean vs float32 (relative) |", "|---|---|---|"]
            for k, x in v["variants"].items():
                if isinstance(x, dict):
                    L.append(
                        f"| {k} | {x['ms']:.0f} | {x['rel_diff_vs_float32']:.2e} |"
                        if "ms" in x
                        else f"| {k} | {x['error']} | |"
                    )
            if "compile_s" in v["variants"]:
                L.append(f"(compiling the encoder took {v['variants']['compile_s']:.0f} s)")
            L.append("")
    comp = r.get("components")
    if comp:
        L += [
            f"The transformers alone at {comp['frames']} x {comp['res']}² (forward + backward, bf16, eager, attention "
            f"{comp['attention']}): backbone {comp['backbone']['ms']:.0f} ms = {comp['backbone']['tflops']:.0f} "
            f"TFLOP/s, LDRM {comp['ldrm']['ms']:.0f} ms = {comp['ldrm']['tflops']:.0f} TFLOP/s.",
            "",
        ]
    cases = r.get("cases", [])
    if cases:
        L += [
            "| case | frames x res | stage | s/step | samples/s | TFLOP/s | MFU | peak mem (GB) | syncs/step | "
            "first steps (s) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cases:
            if "s_per_step" not in c:
                L.append(f"| {c['name']} | | | {c.get('skipped') or c.get('error')} | | | | | | |")
                continue
            mfu = f"{100 * c['mfu']:.1f} %" if c.get("mfu") else ""
            L.append(
                f"| {c['name']} | {c['frames']} x {c['res']}² | {c['stage']} | {c['s_per_step']:.3f} | "
                f"{c['samples_per_s']:.2f} | {c['tflops']:.0f} | {mfu} | {c['peak_mem_gb']:.1f} | "
                f"{c['syncs'].get('count', '')} | {', '.join(f'{x:.1f}' for x in c['warmup_s'])} |"
            )
        L += [""]
        for c in cases:
            if "flops_per_sample" in c:
                fl = c["flops_per_sample"]
                L.append(f"FLOPs per sample, {c['name']}: " + ", ".join(f"{k} {v / 1e12:.2f} T" for k, v in fl.items()))
        L.append("")
        by_size = collections.defaultdict(dict)
        for c in cases:
            if "losses" in c:
                by_size[c["res"]][c["name"]] = c["losses"]
        for res, d in by_size.items():
            if len(d) == 2:
                (na, la), (nb, lb) = d.items()
                rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb)]
                L += [
                    f"Losses at {res}², step by step ({na} / {nb}; max relative difference {max(rel):.2e}): "
                    + "; ".join(f"{x:.5f} / {y:.5f}" for x, y in zip(la, lb)),
                    "",
                ]
        for c in cases:
            if c.get("syncs", {}).get("sites"):
                L.append(f"Sync sites, {c['name']}: " + ", ".join(f"{k} x{v}" for k, v in c["syncs"]["sites"].items()))
        L.append("")
    g = r.get("gains")
    if g:
        L += [
            f"Each switch's gain, from the all-on case at {r.get('size', '')}:",
            "",
            "| variant | s/step | vs all on | peak mem (GB) |",
            "|---|---|---|---|",
        ]
        base = g[0].get("s_per_step")
        for v in g:
            if "s_per_step" in v:
                L.append(
                    f"| {v['variant']} | {v['s_per_step']:.3f} | {v['s_per_step'] / base:.2f}x | "
                    f"{v['peak_mem_gb']:.1f} |"
                )
            else:
                L.append(f"| {v['variant']} | {v.get('skipped') or v.get('error')} | | |")
        L.append("")
    pr = r.get("profile")
    if pr and "phases" in pr:
        L += [
            f"Profile of {pr['steps']} all-on steps at {r.get('size', '')}: {pr['wall_ms_per_step']:.0f} ms wall per step, GPU busy "
            f"{pr['gpu_busy_ms_per_step'] or 0:.0f} ms.",
            "",
            "| phase | GPU ms/step | host ms/step |",
            "|---|---|---|",
        ]
        for k, v in pr["phases"].items():
            gpu = "" if v["gpu_ms"] is None else f"{v['gpu_ms']:.1f}"
            cpu = "" if v["cpu_ms"] is None else f"{v['cpu_ms']:.1f}"
            L.append(f"| {k} | {gpu} | {cpu} |")
        L += ["", "| kernel class | GPU ms/step | share |", "|---|---|---|"]
        busy = sum(pr["kernel_classes"].values()) or 1.0
        for k, v in pr["kernel_classes"].items():
            L.append(f"| {k} | {v:.1f} | {100 * v / busy:.1f} % |")
        L += ["", "| top kernels | GPU ms/step | class |", "|---|---|---|"]
        for k, v in list(pr.get("top_kernels", {}).items())[:15]:
            L.append(f"| `{k}` | {v:.1f} | {classify(k).split(' (')[0]} |")
        L.append("")
    lo = r.get("loader")
    if lo:
        L += [
            f"Loader (one rank, batch 1, {lo.get('shards', {}).get('jpeg_kb_mean', 0):.0f} kB JPEG frames):",
            "",
            "| res | workers | samples/s | vs model consumption |",
            "|---|---|---|---|",
        ]
        cons = {c["res"]: c["samples_per_s"] for c in cases if "samples_per_s" in c and c["name"].endswith("on")}
        for x in lo.get("runs", []):
            if "samples_per_s" in x:
                ratio = f"{x['samples_per_s'] / cons[x['res']]:.1f}x" if x["res"] in cons else ""
                L.append(f"| {x['res']}² | {x['workers']} | {x['samples_per_s']:.2f} | {ratio} |")
            else:
                L.append(f"| {x['res']}² | {x['workers']} | {x.get('skipped') or x.get('error')} | |")
        L.append("")
    proj = projection(r)
    if proj:
        L += [
            f"Projection (docs/TRAINING.md): the paper's curriculum, {proj['steps_256']:,} steps at 256² and "
            f"{proj['steps_512']:,} at 512², global batch {proj['batch']} (one {proj['frames']}-frame clip per GPU), "
            f"at the all-on step times ({proj['s_256']:.3f} / {proj['s_512']:.3f} s per sample), perfect scaling: "
            f"**{proj['gpu_days']:.1f} H200-days** ({proj['days_on_32']:.1f} days on 32 H200s), against the paper's "
            f"32 A100 x 7 days = 224 A100-days.",
            "",
        ]
    if r.get("notes"):
        L += ["Notes: " + " ".join(r["notes"]), ""]
    return "\n".join(L) + "\n"


PAPER = {"steps_256": 40_000, "steps_512": 40_000 + 20_000, "batch": 32}


def projection(r: dict) -> dict | None:
    """GPU-days of the 40k + 40k + 20k curriculum from the measured all-on step times (batch 1 per GPU, so
    s/step = s per sample per GPU), with the global batch of :data:`PAPER` (an assumption: the paper trains
    on 32 GPUs; one clip per GPU is what a 2B-parameter model at 49 x 512² leaves room for)."""
    on = {c["res"]: c for c in r.get("cases", []) if c.get("name", "").endswith(" on") and "s_per_step" in c}
    if len(on) < 2:
        return None
    lo, hi = sorted(on)
    p = dict(PAPER, frames=on[hi]["frames"], s_256=on[lo]["s_per_step"], s_512=on[hi]["s_per_step"])
    seconds = p["batch"] * (p["steps_256"] * p["s_256"] + p["steps_512"] * p["s_512"])
    p["gpu_days"] = seconds / 86400
    p["days_on_32"] = p["gpu_days"] / 32
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for the whole run (phases are skipped to fit)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny preset at tiny sizes on the CPU: every code path")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--work", help="scratch directory (default: a temporary one)")
    ap.add_argument(
        "--phases",
        default="micro,hi,profile,gains,loader,lo",
        help="micro (attention kernels, VAE encode variants, the transformers alone), hi (49 x 512² off/on), "
        "profile, gains, loader, lo (49 x 256² off/on); the matmul peak always runs",
    )
    a = ap.parse_args(argv)
    smoke = a.cpu_smoke
    a.device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    a.preset = "tiny" if smoke else "full"
    a.compile_backend = "aot_eager" if smoke else "inductor"
    frames = 5 if smoke else a.frames
    hi, lo, src = (32, 24, 32) if smoke else (512, 256, 512)
    stages = ("dynamic", "static") if smoke else ("dynamic", "static256")
    warm, timed = (1, 2) if smoke else (2, 4)
    device = torch.device(a.device)
    budget = Budget(a.budget)
    if device.type == "cuda":  # gsplat's JIT build (background) and this process agree on the architecture
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    from torch import _dynamo

    # every case compiles the same block code at its own shapes (and checkpointing variants): room for all
    _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    os.makedirs(a.out, exist_ok=True)
    work = a.work or tempfile.mkdtemp(prefix="bench_speed_")
    shards = os.path.join(work, "loader_shards")
    os.makedirs(shards, exist_ok=True)
    gsplat_proc, shard_proc = start_background(shards, frames, src, 4 if smoke else 8, smoke)
    r = {
        "host": platform.node(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "budget_s": a.budget,
        "size": f"{frames} x {hi}²",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "cases": [],
        "notes": [],
    }

    def save():
        r["elapsed_s"] = time.perf_counter() - T0
        r["projection"] = projection(r)
        with open(os.path.join(a.out, "bench_speed.json"), "w") as f:
            json.dump(r, f, indent=1, default=str)
        with open(os.path.join(a.out, "bench_speed.md"), "w") as f:
            f.write(render_md(r))

    def phase(name, fn, estimate):
        if not budget.fits(estimate):
            r["notes"].append(f"{name}: skipped (time budget).")
            log(f"{name}: skipped (time budget)")
            return None
        try:
            return fn()
        except Exception as e:  # keep going: report the failure
            msg = f"{type(e).__name__}: {e}"[:400]
            r["notes"].append(f"{name} failed: {msg}.")
            log(f"{name} failed: {msg}")
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            return None
        finally:
            save()

    from training.config import make_config

    full = make_config(a.preset)
    tc = full.backbone.transformer
    r["peak"] = phase("peak", lambda: matmul_peak(device, 512 if smoke else 8192, 3 if smoke else 50), 20) or {}
    peak = r["peak"].get("bf16_tflops", 0) * 1e12 or None
    log(f"peak {r['peak']}")
    f_lat = 1 + (frames - 1) // 4
    tokens = f_lat * (hi // 16) ** 2 + tc.max_text_seq_length
    want = set(a.phases.split(","))
    r["sdpa"] = "micro" in want and phase(
        "sdpa",
        lambda: sdpa_bench(device, tc.num_attention_heads, tokens, tc.attention_head_dim, 2 if smoke else 10),
        30,
    )
    log(f"sdpa {r['sdpa']}")
    best = "auto"
    if r.get("sdpa"):
        ok = {
            k: v["ms"] for k, v in r["sdpa"].items() if isinstance(v, dict) and "ms" in v and k not in ("auto", "math")
        }
        best = min(ok, key=ok.get) if ok else "auto"
    r["vae"] = "micro" in want and phase("vae", lambda: vae_bench(full, frames, hi, device, 1 if smoke else 3), 40)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"vae {r['vae']}")
    if want & {"hi", "gains", "profile"}:  # made while gsplat builds
        batches_hi = phase("batches", lambda: make_batches(frames, src, hi, device), 30)
    # the GPU is free while gsplat builds
    if "micro" in want and (smoke or (gsplat_proc is not None and gsplat_proc.poll() is None)):
        cfg_hi = case_config(a, frames, hi, stages[0], {**SWITCHES_OFF, "vae": "bfloat16"})
        r["components"] = phase("components", lambda: components_bench(cfg_hi, cfg_hi.stages[0], device, best, 3), 40)
        log(f"components {r['components']}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if gsplat_proc is not None:  # gsplat must be built before a GPU case renders
        t = time.perf_counter()
        rc = gsplat_proc.wait()
        r["gsplat_build_wait_s"] = time.perf_counter() - t
        if rc != 0:
            r["notes"].append(f"gsplat build failed: {gsplat_proc.stderr.read().decode()[-400:]}")
        log(f"gsplat ready (waited {r['gsplat_build_wait_s']:.0f} s, rc {rc})")

    on = dict(vae="bfloat16", attention=best, compile=True, compile_vae=True, fused=True, cudnn=True, ckpt=None)
    r["switches_on"] = on

    def case(name, res, stage, sw, batches, keep=False):
        if batches is None:
            r["cases"].append({"name": name, "skipped": "no batches"})
            return None
        got = phase(
            f"case {name}",
            lambda: run_case(a, name, frames, res, stage, sw, batches, peak, warm, timed, keep=keep),
            60 if res == hi else 40,
        )
        if got is None and sw["compile"] and budget.fits(60):  # keep the profile and gains if compiling failed
            sw = {**sw, "compile": False}
            got = phase(
                f"case {name} (not compiled)",
                lambda: run_case(
                    a,
                    f"{name} (not compiled: compile failed)",
                    frames,
                    res,
                    stage,
                    sw,
                    batches,
                    peak,
                    warm,
                    timed,
                    keep=keep,
                ),
                60,
            )
        if got is None:
            r["cases"].append({"name": name, "skipped": "time budget or failure (notes)"})
            save()
            return None
        r["cases"].append(got[0])
        save()
        return got[1]

    if want & {"hi", "gains", "profile"}:
        if "hi" in want:  # the all-off case is a comparison of its own; gains and profile need only all-on
            case(f"{hi} off", hi, stages[0], SWITCHES_OFF, batches_hi)
        last = r["cases"][-1] if r["cases"] else {}
        if "checkpointed" in last.get("name", ""):
            on["ckpt"] = 1.0
            r["notes"].append(
                "the all-off case ran out of memory without checkpointing: the all-on case checkpoints too."
            )
        keep = case(f"{hi} on", hi, stages[0], on, batches_hi, keep=True)
        if keep is not None:
            if "profile" in want:
                r["profile"] = phase("profile", lambda: profile(keep), 30)
            if "gains" in want:
                variants = [
                    ("all on", {}),
                    ("VAE float32", {"vae": "float32"}),
                    ("attention auto", {"attention": "auto"}),
                    ("not compiled", {"compile": False}),
                    ("VAE encoder not compiled", {"compile_vae": False}),
                    ("AdamW not fused", {"fused": False}),
                    ("cuDNN not benchmarked", {"cudnn": False}),
                    ("checkpoint half the blocks", {"ckpt": 0.5}),
                    ("checkpoint every block", {"ckpt": 1.0}),
                ]
                r["gains"] = []
                for name, change in variants:
                    if change.get("ckpt", 0) == on["ckpt"] and "ckpt" in change:
                        continue

                    def one():
                        undo = {k: keep.on[k] for k in change}
                        keep.set(**change)
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        try:
                            keep.steps(1)
                            dt, _ = keep.steps(1)
                        finally:
                            keep.set(**undo)
                        return {"variant": name, "s_per_step": dt, "peak_mem_gb": peak_gb(device)}

                    got = phase(f"gain {name}", one, 20)
                    r["gains"].append(got or {"variant": name, "skipped": "time budget or failure (notes)"})
                    save()
            keep.free()
            del keep
    if shard_proc.wait() != 0:
        r["notes"].append(f"loader shards failed: {shard_proc.stderr.read().decode()[-400:]}")
    if "loader" in want:
        info = os.path.join(shards, "shards.json")
        r["loader"] = {"shards": json.load(open(info)) if os.path.exists(info) else {}}
        plan = [(hi, 1), (lo, 1)] if smoke else [(hi, 8), (hi, 16), (lo, 8)]
        r["loader"]["runs"] = (
            phase("loader", lambda: loader_runs(shards, frames, plan, 2 if smoke else 10, budget), 30) or []
        )
        save()
    if "lo" in want:
        batches_lo = phase("batches 256", lambda: make_batches(frames, src, lo, device), 20)
        case(f"{lo} off", lo, stages[1], SWITCHES_OFF, batches_lo)
        case(f"{lo} on", lo, stages[1], on, batches_lo)
    save()
    print(render_md(r))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
