"""Benchmark Video Depth Anything in d4s: official-style procedure vs the batched path.

Measures video frames/s (output frames of a whole-video call / wall time) and peak memory for
the official-style baseline (one 32-frame window per forward, CPU frame-by-frame preprocessing,
NumPy stitching; fp32 and the official fp16-autocast default) and for the optimised path
(device preprocessing, windows batched, per-frame stage deduplicated across overlapping windows,
on-device stitching) at several windows-per-batch and dtypes; the bf16/fp16-vs-fp32 AbsRel of the
whole-video output; and a breakdown of where the time goes. Random weights (scale-aware init).

GPU:  python bench/bench_vda.py --device cuda --encoders vits,vitl --out results.json
CPU:  python bench/bench_vda.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from stages.depth.vda.infer import (  # noqa: E402
    forward_windows,
    infer_video_depth,
    infer_video_depth_official_style,
    network_size,
    num_windows,
    preprocess_frame_cpu,
)
from stages.depth.vda.model import build_vda_empty, randomize_  # noqa: E402


def synthetic_video(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth moving colour patterns (T, H, W, 3) uint8."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, max(4, h // 32), max(4, w // 32), generator=g)
    base = torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)[0]
    yy = torch.linspace(0, 1, h)[:, None]
    xx = torch.linspace(0, 1, w)[None, :]
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        ph = 2 * np.pi * i / 48.0
        wave = 0.25 * torch.sin(6 * xx + 4 * yy + ph) + 0.15 * torch.cos(9 * yy - ph)
        img = (base + wave).clamp(0, 1).mul(255).byte().permute(1, 2, 0)
        out[i] = img.numpy()
    return out


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_reset(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process max RSS (GiB)


def timed(fn, dev, repeats=1):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best, out


def absrel(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(AbsRel over pixels with ref > 1e-3 * max, fraction of such pixels)."""
    valid = ref > 1e-3 * float(ref.max())
    rel = np.abs(pred[valid].astype(np.float64) - ref[valid]) / ref[valid]
    return float(rel.mean()), float(valid.mean())


def rel_l1(pred: np.ndarray, ref: np.ndarray) -> float:
    """mean |pred - ref| / mean |ref| (no near-zero blow-up)."""
    return float(np.abs(pred.astype(np.float64) - ref).mean() / np.abs(ref).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--encoders", default="vits,vitl")
    ap.add_argument("--input-size", type=int, default=518)
    ap.add_argument("--hw", default=None, help="video frame size HxW (default: input-size square)")
    ap.add_argument("--windows", type=int, default=16, help="video length in windows (T = 22*windows)")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--fp32-batches", default=None, help="windows/batch for optimised fp32 (default: largest only)")
    ap.add_argument("--extra-hw", default=None, help="also time the best low-precision config at this HxW")
    ap.add_argument("--baseline-dtypes", default="fp32,fp16", help="official-style: fp32 and/or fp16 (autocast)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (largest batch)")
    ap.add_argument("--compile-dtype", default=None, help="dtype for the compiled run (default: first low precision)")
    ap.add_argument("--profile", action="store_true", help="print a CUDA kernel-time table (bf16)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU-sized settings")
    ap.add_argument("--out", default=None, help="write results JSON here")
    args = ap.parse_args(argv)

    if args.quick:
        args.encoders, args.input_size, args.windows, args.batches = "vits", 42, 3, "1,3"
        args.baseline_dtypes, args.dtypes = "fp32", "fp32"
        args.hw = args.hw or "42x56"
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    h, w = (int(v) for v in (args.hw or f"{args.input_size}x{args.input_size}").split("x"))
    t = 22 * args.windows
    frames = synthetic_video(t, h, w)
    nh, nw = network_size(h, w, args.input_size)
    n_win = num_windows(t)
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    info = {
        "machine": machine,
        "torch": torch.__version__,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "video": [t, h, w],
        "network_input": [nh, nw],
        "windows": n_win,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(info))
    from stages.depth.vda.infer import preprocess

    x_dev = preprocess(torch.from_numpy(frames[:4]).to(dev), (nh, nw)).cpu().numpy()
    x_cpu = np.stack([preprocess_frame_cpu(f, (nh, nw)) for f in frames[:4]])
    try:
        import cv2  # noqa: F401

        info["preprocess_device_vs_cv2_maxabs"] = float(np.abs(x_dev - x_cpu).max())
    except ImportError:
        info["preprocess_device_vs_cpu_torch_maxabs"] = float(np.abs(x_dev - x_cpu).max())
    print(json.dumps(info))
    rows, extra = [], {}

    def record(enc, path, dtype, bsz, secs, peak, **kw):
        row = dict(
            encoder=enc,
            path=path,
            dtype=dtype,
            windows_per_batch=bsz,
            seconds=round(secs, 4),
            fps=round(t / secs, 2),
            net_fps=round(32 * n_win / secs, 2),
            peak_gib=round(peak, 3),
            **kw,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)

    for enc in args.encoders.split(","):
        model = randomize_(build_vda_empty(enc, device=dev), seed=0)  # as the build's VDARunner does
        if dev.type == "cuda":
            model.head_chunk = 64
        outs = {}
        # ---- official-style baseline
        for bd in args.baseline_dtypes.split(","):
            fp32 = bd == "fp32"
            infer_video_depth_official_style(model, frames[:40], args.input_size, fp32=fp32)  # warm-up
            peak_reset(dev)
            secs, out = timed(lambda: infer_video_depth_official_style(model, frames, args.input_size, fp32=fp32), dev)
            outs[("official", bd)] = out
            record(enc, "official-style", bd, 1, secs, peak_gib(dev))
        # CPU preprocessing share of the baseline
        t0 = time.perf_counter()
        for i in range(32):
            preprocess_frame_cpu(frames[i], (nh, nw))
        extra[f"{enc}_official_cpu_preprocess_s_per_frame"] = (time.perf_counter() - t0) / 32
        # ---- optimised path
        bmax = max(batches)
        fp32_batches = [int(b) for b in args.fp32_batches.split(",")] if args.fp32_batches else [bmax]
        for dt in dtypes:
            for cl in [False, True] if dev.type == "cuda" and dt != "fp32" else [False]:
                model.channels_last = cl
                for bsz in fp32_batches if dt == "fp32" else batches:
                    infer_video_depth(
                        model, frames[: 22 * min(bsz, n_win)], args.input_size, dtype=dt, windows_per_batch=bsz
                    )  # warm-up (cudnn autotune for this shape)
                    peak_reset(dev)
                    secs, out = timed(
                        lambda: infer_video_depth(model, frames, args.input_size, dtype=dt, windows_per_batch=bsz), dev
                    )
                    outs[("opt", dt, bsz, cl)] = out
                    record(enc, "optimised", dt, bsz, secs, peak_gib(dev), channels_last=cl)
            model.channels_last = False
        # no-dedup ablation (full windows through the encoder)
        for dt in dtypes[-1:]:
            peak_reset(dev)
            secs, _ = timed(
                lambda: infer_video_depth(
                    model, frames, args.input_size, dtype=dt, windows_per_batch=bmax, dedup=False
                ),
                dev,
            )
            record(enc, "optimised-no-dedup", dt, bmax, secs, peak_gib(dev))
        # accuracy: low precision vs fp32 (whole video, same path), optimised vs official-style fp32
        ref = outs.get(("opt", "fp32", fp32_batches[-1], False))
        if ref is not None:
            for key, out in outs.items():
                if key[0] == "opt" and key[1] != "fp32" and key[2] == bmax:
                    ar, frac = absrel(out, ref)
                    tag = f"{enc}_video_{key[1]}{'_nhwc' if key[3] else ''}_vs_fp32"
                    extra[tag + "_absrel"] = ar
                    extra[tag + "_rel_l1"] = rel_l1(out, ref)
                    extra[f"{enc}_absrel_valid_fraction"] = frac
            for bd in ("fp32", "fp16"):
                if ("official", bd) in outs:
                    extra[f"{enc}_video_official_{bd}_vs_opt_fp32_absrel"] = absrel(outs[("official", bd)], ref)[0]
                    extra[f"{enc}_video_official_{bd}_vs_opt_fp32_maxabs"] = float(
                        np.abs(outs[("official", bd)] - ref).max()
                    )
        # network-only accuracy (one batch of windows, no stitching): which part loses precision
        g = torch.Generator().manual_seed(1)
        xw = torch.randn(min(bmax, 2), 32, 3, nh, nw, generator=g).to(dev)
        y32 = forward_windows(model, xw, None, "fp32").cpu().numpy()
        for dt, head_ac in [(d, True) for d in dtypes if d != "fp32"] + [(d, False) for d in dtypes if d != "fp32"]:
            model.head_autocast = head_ac
            y = forward_windows(model, xw, None, dt).cpu().numpy()
            tag = f"{enc}_net_{dt}{'' if head_ac else '_fp32head'}_vs_fp32"
            extra[tag + "_absrel"] = absrel(y, y32)[0]
            extra[tag + "_rel_l1"] = rel_l1(y, y32)
        model.head_autocast = True
        # ---- where the time goes (bf16, one batch of bmax windows, network only)
        low = [d for d in dtypes if d != "fp32"][:1] or ["fp32"]
        x = torch.randn(bmax * 22 + 10, 3, nh, nw, device=dev)
        idx = torch.stack([torch.arange(32, device=dev) + 22 * k for k in range(bmax)])
        from stages.depth.vda.infer import _autocast

        with torch.inference_mode(), _autocast(dev, low[0]):

            def enc_only():
                return model.pretrained.intermediate(x)

            def frame_stage():
                return model.frame_features(x)

            feats = model.frame_features(x)
            g = [f.index_select(0, idx.reshape(-1)) for f in feats]

            def window_stage():
                return model.window_depth(g, 32, (nh, nw))

            def whole():
                return model(x, idx)

            for name, fn in [
                ("encoder", enc_only),
                ("frame_stage", frame_stage),
                ("window_stage", window_stage),
                ("network_total", whole),
            ]:
                fn()
                secs, _ = timed(fn, dev, repeats=3)
                extra[f"{enc}_{low[0]}_b{bmax}_{name}_s"] = secs
        print(json.dumps({k: v for k, v in extra.items() if k.startswith(enc)}), flush=True)
        if args.profile and dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), _autocast(dev, low[0]), profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(x, idx)
                sync(dev)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
        if args.extra_hw and low[0] != "fp32":
            eh, ew = (int(v) for v in args.extra_hw.split("x"))
            frames2 = synthetic_video(t, eh, ew, seed=3)
            model.channels_last = dev.type == "cuda"
            infer_video_depth(
                model, frames2[: 22 * min(bmax, n_win)], args.input_size, dtype=low[0], windows_per_batch=bmax
            )
            peak_reset(dev)
            secs, _ = timed(
                lambda: infer_video_depth(model, frames2, args.input_size, dtype=low[0], windows_per_batch=bmax), dev
            )
            record(
                enc,
                f"optimised {eh}x{ew}->{'x'.join(map(str, network_size(eh, ew, args.input_size)))}",
                low[0],
                bmax,
                secs,
                peak_gib(dev),
                channels_last=model.channels_last,
            )
            del frames2
        if args.compile:
            low = [args.compile_dtype or low[0]]
            model.channels_last = dev.type == "cuda"
            cm = torch.compile(model, dynamic=False)
            t0 = time.perf_counter()
            infer_video_depth(cm, frames, args.input_size, dtype=low[0], windows_per_batch=bmax)
            sync(dev)
            extra[f"{enc}_compile_warmup_s"] = time.perf_counter() - t0
            print(json.dumps({"compile_warmup_s": extra[f"{enc}_compile_warmup_s"]}), flush=True)
            peak_reset(dev)
            secs, out = timed(
                lambda: infer_video_depth(cm, frames, args.input_size, dtype=low[0], windows_per_batch=bmax), dev
            )
            record(enc, "optimised+compile", low[0], bmax, secs, peak_gib(dev), channels_last=model.channels_last)
            if ref is not None:
                extra[f"{enc}_video_compiled_{low[0]}_vs_fp32_absrel"] = absrel(out, ref)[0]
                extra[f"{enc}_video_compiled_{low[0]}_vs_fp32_rel_l1"] = rel_l1(out, ref)
            model.channels_last = False
        model = outs = None  # free the GPU memory before the next encoder
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # summary table
    print("\n| encoder | path | dtype | windows/batch | frames/s | net frames/s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tag = r["path"] + (" (NHWC)" if r.get("channels_last") else "")
        print(
            f"| {r['encoder']} | {tag} | {r['dtype']} | {r['windows_per_batch']} | {r['fps']} | {r['net_fps']} | {r['peak_gib']} |"
        )
    print(json.dumps(extra, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "rows": rows, "extra": extra}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
