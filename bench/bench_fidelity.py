"""Training-fidelity runs of issue #19 on one GPU: bench/RESULTS.md §4b's 300-step mid-preset run again
after the fixes (old figures beside the new), and the first-latent ablation (``ldrm.clean_first_latent``
off: the LDRM decodes the x0-prediction of latent frame 0 instead of its known latent).

    python bench/bench_fidelity.py --out DIR [--steps 300] [--shards OUT] [--cases new,first_latent_off]
    python bench/bench_fidelity.py --out DIR --shards SMALL --resolution 64 --steps 3   # CPU smoke

Same setup as §4b: synthetic shards (training/synthetic.py, 16 clips of 13 frames at 256², rendered on
the GPU when there is one), mid preset, 256², 9 frames, DDP on 1 rank, every loss (fm, photo, geo,
motion), lr 1e-4, no warm-up, LPIPS off, bf16 autocast, gsplat. Writes DIR/bench_fidelity.json and
DIR/bench_fidelity.md. Start / end = the mean over the first / last 20 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.bench_train import _run_case

# bench/RESULTS.md §4b, "Longer runs", 256² DDP, 300 steps, before the #19 fixes (H100): start / end as
# means of the first / last 20 steps for loss and PSNR; the per-term figures are steps 1 / 300.
OLD = {
    "loss": (5.18, 3.33),
    "psnr": (12.77, 12.91),
    "photo": (0.053, 0.051),
    "fm@1/300": (3.22, 1.53),
    "motion@1/300": (0.85, 0.45),
    "geo@1/300": (1.01, 0.77),
    "s_per_step": 0.247,
    "peak_mem_gb": 2.04,
}
CASES = {"new": {}, "first_latent_off": {"ldrm": {"clean_first_latent": False}}}
KEYS = ("loss", "fm", "photo", "geo", "motion", "psnr", "psnr_first")


def summarise(case: dict, window: int = 20) -> dict:
    rows = case["rows"]
    out = {"s_per_step": case["s_per_step"], "peak_mem_gb": case["peak_mem_gb_rank0"], "steps": len(rows)}
    for k in KEYS:
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k] = (sum(vals[:window]) / len(vals[:window]), sum(vals[-window:]) / len(vals[-window:]))
            out[f"{k}@1/{len(rows)}"] = (rows[0].get(k), rows[-1].get(k))
    return out


def render_md(res: dict) -> str:
    lines = [
        f"# bench_fidelity ({res['device']}, torch {res['torch']}, {res['steps']} steps)",
        "",
        "| figure | old (§4b, before #19) | " + " | ".join(res["summary"]) + " |",
        "|---|---|" + "---|" * len(res["summary"]),
    ]

    def fmt(v):
        return "" if v is None else (f"{v[0]:.3f} / {v[1]:.3f}" if isinstance(v, (list, tuple)) else f"{v:.3f}")

    names = (
        ["loss", "psnr", "psnr_first", "fm", "photo", "geo", "motion"]
        + [f"{k}@1/{res['steps']}" for k in ("fm", "geo", "motion")]
        + ["s_per_step", "peak_mem_gb"]
    )
    for k in names:
        old = OLD.get(k.replace(f"@1/{res['steps']}", "@1/300"))
        lines.append(f"| {k} | {fmt(old)} | " + " | ".join(fmt(s.get(k)) for s in res["summary"].values()) + " |")
    lines += ["", "start / end: means of the first / last 20 steps; `@1/N`: the values at step 1 and step N."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--shards", help="a build's OUT; default: synthetic shards written into WORK/shards_synth")
    ap.add_argument(
        "--work",
        help="shards and run workdirs (default: a temporary directory); --out gets only bench_fidelity.json and .md",
    )
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--resolution", type=int, default=256)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    cuda = torch.cuda.is_available()
    work = a.work or tempfile.mkdtemp(prefix="bench_fidelity_")
    shards = a.shards or os.path.join(work, "shards_synth")
    t0 = time.perf_counter()
    if not a.shards and not os.path.exists(os.path.join(shards, "index.parquet")):
        from training.synthetic import write_shards

        write_shards(shards, n_clips=16, per_shard=2, t=13, size=256, device="cuda" if cuda else "cpu")
    res = {
        "host": platform.node(),
        "torch": torch.__version__,
        "steps": a.steps,
        "shards_s": time.perf_counter() - t0,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "old": OLD,
        "summary": {},
        "cases": {},
    }
    for name in a.cases.split(","):
        wd = os.path.join(work, f"w_{name}")
        shutil.rmtree(wd, ignore_errors=True)  # a fresh run, never a resume of an earlier one
        case = _run_case(
            "mid",
            a.resolution,
            a.frames,
            1,
            a.steps,
            shards,
            wd,
            cuda,
            "auto" if cuda else "torch",
            final_ckpt=False,
            overrides=CASES[name],
        )
        res["cases"][name] = case
        res["summary"][name] = summarise(case)
        print(f"[bench_fidelity] {name}: {res['summary'][name]}", flush=True)
        with open(os.path.join(a.out, "bench_fidelity.json"), "w") as f:
            json.dump(res, f, indent=1)
    md = render_md(res)
    with open(os.path.join(a.out, "bench_fidelity.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
