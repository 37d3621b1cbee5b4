"""CoTracker3 throughput benchmark: tracked points x frames per second.

Default (full) mode is meant for one GPU: offline and online CoTracker3 at the official model
resolution (384 x 512), 60-frame clips of 480 x 640, a 20 x 20 query grid, 6 iterations, and
the configurations

  baseline   one clip per call, fp32, explicit (math) attention (TF32 matmuls off unless --tf32)
  sdpa       one clip per call, fp32, scaled_dot_product_attention
  batch      --batch clips per call, fp32, SDPA
  bf16       one clip per call, bf16 autocast, SDPA
  bf16+batch --batch clips per call, bf16 autocast, SDPA

It reports throughput, speed-up over the baseline, peak memory and the agreement of bf16
with fp32 (pixels, on the same clips). Writes ``bench_cotracker.md`` and
``bench_cotracker.json`` into ``--out``. Without ``--checkpoint`` the weights are random
(seeded): speed is unaffected, the agreement numbers then describe an untrained network.

  python bench/bench_cotracker.py --out DIR                   # GPU, ~1-3 minutes on an H100
  python bench/bench_cotracker.py --quick --out DIR           # CPU smoke run, tiny settings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

from stages.tracks.cotracker.runner import CoTrackerRunner  # noqa: E402


def synthetic_clips(n: int, t: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random textures translating and zooming slowly: trackable, deterministic."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        base = rng.random((h // 8 + 8, w // 8 + 8, 3)).astype(np.float32)
        big = np.kron(base, np.ones((8, 8, 1), dtype=np.float32))
        ys = np.arange(h)[:, None]
        xs = np.arange(w)[None, :]
        frames = []
        for k in range(t):
            dy, dx = int(round(k * 0.7 * (1 + i % 3))), int(round(k * 1.1))
            f = big[(ys + dy) % big.shape[0], (xs + dx) % big.shape[1]]
            frames.append((f * 255).astype(np.uint8))
        clips.append(np.stack(frames))
    return clips


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_config(name, variant, clips, args, dtype, batch, attn, checkpoint):
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # off by default: fp32 means fp32
    runner = CoTrackerRunner(
        variant,
        checkpoint,
        device,
        dtype,
        grid_size=args.grid,
        query_frames=1,
        allow_random_weights=checkpoint is None,
        max_batch=batch,
        iters=args.iters,
        model_resolution=tuple(args.resolution),
        attn_impl=attn,
    )
    runner.track(clips[:batch])  # warm-up (kernels, cudnn autotune, allocator)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    out = None
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = runner.track(clips)
        _sync(device)
        times.append(time.perf_counter() - t0)
    n_pts = sum(tr.shape[0] * tr.shape[1] for tr, _ in out)
    best = min(times)
    row = {
        "config": name,
        "variant": variant,
        "dtype": dtype,
        "batch": batch,
        "attention": attn,
        "clips": len(clips),
        "frames": clips[0].shape[0],
        "points": out[0][0].shape[1],
        "seconds_best": best,
        "seconds_all": times,
        "point_frames_per_s": n_pts / best,
        "clips_per_s": len(clips) / best,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    del runner
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row, out


def agreement(a, b) -> dict:
    """Track distance (pixels) over every frame and track - not only where both call the point
    visible (an untrained network rarely does) - plus the share of equal visibility flags."""
    d = np.concatenate([np.linalg.norm(x[0] - y[0], axis=-1).ravel() for x, y in zip(a, b)])
    both = np.concatenate([(x[1] & y[1]).ravel() for x, y in zip(a, b)])
    vis = np.mean(np.concatenate([(x[1] == y[1]).ravel() for x, y in zip(a, b)]))
    dv = d[both]
    return {
        "median_px": float(np.median(d)),
        "p95_px": float(np.percentile(d, 95)),
        "max_px": float(d.max()),
        "median_px_visible": float(np.median(dv)) if dv.size else float("nan"),
        "visibility_agree": float(vis),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for bench_cotracker.md / .json")
    p.add_argument("--quick", action="store_true", help="CPU smoke run with tiny settings")
    p.add_argument("--device", default=None)
    p.add_argument("--checkpoint-offline", default=None)
    p.add_argument("--checkpoint-online", default=None)
    p.add_argument("--variants", default="offline,online")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--grid", type=int, default=20)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--resolution", type=int, nargs=2, default=[384, 512])
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in the fp32 runs")
    args = p.parse_args(argv)
    if args.quick:
        args.device = args.device or "cpu"
        args.clips, args.batch, args.frames = 2, 2, 10
        args.height, args.width, args.grid, args.iters, args.repeats = 48, 64, 3, 1, 1
        args.resolution = [64, 96]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    clips = synthetic_clips(args.clips, args.frames, args.height, args.width)
    configs = [
        ("baseline", "fp32", 1, "math"),
        ("sdpa", "fp32", 1, "sdpa"),
        ("batch", "fp32", args.batch, "sdpa"),
        ("bf16", "bf16", 1, "sdpa"),
        ("bf16+batch", "bf16", args.batch, "sdpa"),
    ]
    rows, agree = [], {}
    t_start = time.perf_counter()
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        ckpt = args.checkpoint_offline if variant == "offline" else args.checkpoint_online
        outs = {}
        for name, dtype, batch, attn in configs:
            row, out = run_config(name, variant, clips, args, dtype, batch, attn, ckpt)
            rows.append(row)
            outs[name] = out
            print(
                f"{variant:8s} {name:11s} {row['point_frames_per_s']:12.0f} point-frames/s  "
                f"({row['seconds_best']:.3f} s for {len(clips)} clips)",
                flush=True,
            )
        base = next(r for r in rows if r["variant"] == variant and r["config"] == "baseline")
        for r in rows:
            if r["variant"] == variant:
                r["speedup_vs_baseline"] = r["point_frames_per_s"] / base["point_frames_per_s"]
        agree[variant] = {
            "bf16_vs_fp32": agreement(outs["bf16+batch"], outs["batch"]),
            "sdpa_vs_math": agreement(outs["sdpa"], outs["baseline"]),
            "batched_vs_single": agreement(outs["batch"], outs["sdpa"]),
        }
    meta = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "random_weights": {"offline": args.checkpoint_offline is None, "online": args.checkpoint_online is None},
        "model_resolution": args.resolution,
        "input": [args.frames, args.height, args.width],
        "grid": args.grid,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "total_seconds": time.perf_counter() - t_start,
        "host": platform.node(),
        "pid": os.getpid(),
    }
    (out_dir / "bench_cotracker.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "agreement": agree}, indent=1)
    )
    lines = [
        f"# CoTracker3 throughput ({meta['device']}, torch {meta['torch']})",
        "",
        f"Clips {args.clips} x {args.frames} frames of {args.height}x{args.width}, model input "
        f"{args.resolution[0]}x{args.resolution[1]}, grid {args.grid}x{args.grid} at frame 0, {args.iters} iterations"
        + (", random weights" if args.checkpoint_offline is None else "")
        + ".",
        "",
        "| variant | config | dtype | batch | attention | point-frames/s | clips/s | speed-up | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['config']} | {r['dtype']} | {r['batch']} | {r['attention']} | "
            f"{r['point_frames_per_s']:,.0f} | {r['clips_per_s']:.2f} | {r['speedup_vs_baseline']:.2f}x | {mem} |"
        )
    lines += [
        "",
        "| variant | comparison | median px | p95 px | max px | median px (both visible) | visibility agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, comps in agree.items():
        for k, a in comps.items():
            lines.append(
                f"| {v} | {k} | {a['median_px']:.3g} | {a['p95_px']:.3g} | {a['max_px']:.3g} | "
                f"{a['median_px_visible']:.3g} | {a['visibility_agree']:.4f} |"
            )
    lines += ["", f"Total benchmark time {meta['total_seconds']:.0f} s."]
    (out_dir / "bench_cotracker.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
