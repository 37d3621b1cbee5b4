"""Training benchmark: samples/s per GPU and peak memory (mid config, 256² and 512², 1 vs 2 GPUs via Ray
Train), and gsplat vs the reference rasteriser (agreement and speed).

    python bench/bench_train.py --out DIR [--shards OUT] [--steps 20] [--gpus 1,2]
    python bench/bench_train.py --quick --out DIR      # CPU smoke: tiny config, 1 worker, no gsplat

Writes DIR/bench_train.json and DIR/bench_train.md. Needs torch, ray, webdataset, diffusers, pydantic,
pyarrow, fsspec (and gsplat for the rasteriser comparison; skipped with a note when missing).
Without ``--shards`` it writes synthetic shards (training/synthetic.py) into DIR/shards_synth.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _run_case(preset: str, res: int, frames: int, workers: int, steps: int, shards: str, workdir: str,
              use_gpu: bool, renderer: str) -> dict:
    """Train ``steps`` steps at one resolution; samples/s from metrics.jsonl timing (excluding 2 warm-up steps)."""
    from training.config import make_config
    from training.trainer import train

    stage = dict(name=f"bench{res}", steps=steps, resolution=res, num_frames=frames, scenes="any",
                 frozen=[], losses=["fm", "photo", "geo", "motion"], max_frame_stride=1)
    cfg = make_config(preset, data={"root": shards}, workdir=workdir, stages=[stage],
                      runtime={"launcher": "ray" if workers > 1 or use_gpu else "local", "num_workers": workers,
                               "use_gpu": use_gpu, "renderer": renderer, "ckpt_every": 10 ** 9, "log_every": 1,
                               "tensorboard": False, "keep_ckpts": 1})
    os.environ["D4S_BENCH_TIMING"] = "1"
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    ts = [r["time"] for r in rows if "time" in r]
    warm = min(2, len(ts) - 1)
    dt = (ts[-1] - ts[warm]) / max(len(ts) - 1 - warm, 1) if len(ts) > 1 else float("nan")
    mem = max((r.get("peak_mem_gb", 0.0) for r in rows), default=0.0)
    samples = cfg.runtime.batch_size * workers
    return {"preset": preset, "resolution": res, "frames": frames, "workers": workers, "steps": steps,
            "s_per_step": dt, "samples_per_s": samples / dt, "samples_per_s_per_gpu": samples / dt / workers,
            "peak_mem_gb_rank0": mem, "wall_s": wall, "final_loss": rows[-1]["loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (tiny config)")
    ap.add_argument("--shards", help="a build's OUT (index.parquet + shards/); default: synthetic shards")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--resolutions", default="256,512")
    ap.add_argument("--frames", type=int, default=9)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    from training.synthetic import write_shards

    res: dict = {"host": platform.node(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "cases": []}
    if a.quick:
        shards = a.shards or os.path.join(a.out, "shards_synth")
        if not a.shards and not os.path.exists(os.path.join(shards, "index.parquet")):
            write_shards(shards, n_clips=2, per_shard=1, t=5, size=32)
        res["cases"].append(_run_case("tiny", 24, 5, 1, min(a.steps, 4), shards, os.path.join(a.out, "w_quick"),
                                      False, "torch"))
        from training.render_gsplat import compare, gsplat_available

        if gsplat_available():
            res["rasterizer"] = compare(device="cuda")
        else:
            res["rasterizer"] = {"skipped": "gsplat or CUDA not available"}
    else:
        shards = a.shards or os.path.join(a.out, "shards_synth")
        if not a.shards and not os.path.exists(os.path.join(shards, "index.parquet")):
            write_shards(shards, n_clips=16, per_shard=2, t=a.frames, size=max(int(r) for r in a.resolutions.split(",")))
        for r in (int(x) for x in a.resolutions.split(",")):
            for g in (int(x) for x in a.gpus.split(",")):
                if g > torch.cuda.device_count():
                    res["cases"].append({"resolution": r, "workers": g, "skipped": "not enough GPUs"})
                    continue
                try:
                    res["cases"].append(_run_case("mid", r, a.frames, g, a.steps, shards,
                                                  os.path.join(a.out, f"w_{r}_{g}gpu"), True, "auto"))
                except Exception as e:  # keep going: report the failure (e.g. OOM) in the table
                    res["cases"].append({"resolution": r, "workers": g, "error": f"{type(e).__name__}: {e}"[:300]})
        from training.render_gsplat import compare, gsplat_available

        if gsplat_available():
            res["rasterizer"] = [compare(n=n, size=s, device="cuda") for n, s in ((2000, 64), (20000, 128))]
        else:
            res["rasterizer"] = {"skipped": "gsplat or CUDA not available"}
    with open(os.path.join(a.out, "bench_train.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(a.out, "bench_train.md"), "w") as f:
        f.write(render_md(res))
    print(render_md(res))
    return 0


def render_md(res: dict) -> str:
    lines = [f"# bench_train ({res['device']}, torch {res['torch']})", "",
             "| preset | res | workers | s/step | samples/s | samples/s/GPU | peak mem rank0 (GB) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for c in res["cases"]:
        if "samples_per_s" in c:
            lines.append(f"| {c['preset']} | {c['resolution']} | {c['workers']} | {c['s_per_step']:.3f} | "
                         f"{c['samples_per_s']:.2f} | {c['samples_per_s_per_gpu']:.2f} | {c['peak_mem_gb_rank0']:.2f} | |")
        else:
            lines.append(f"| mid | {c.get('resolution')} | {c.get('workers')} | | | | | "
                         f"{c.get('skipped') or c.get('error')} |")
    lines += ["", "## gsplat vs reference rasteriser", ""]
    ras = res.get("rasterizer")
    if isinstance(ras, dict) and "skipped" in ras:
        lines.append(f"skipped: {ras['skipped']}")
    else:
        lines += ["| gaussians | size | ref ms | gsplat ms | rgb max abs | rgb mean abs | alpha max abs | depth mean abs |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ras if isinstance(ras, list) else [ras]:
            lines.append(f"| {r['gaussians']} | {r['size']} | {r['reference_ms']:.2f} | {r['gsplat_ms']:.2f} | "
                         f"{r['rgb_max_abs']:.2e} | {r['rgb_mean_abs']:.2e} | {r['alpha_max_abs']:.2e} | "
                         f"{r['depth_mean_abs']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
