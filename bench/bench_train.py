"""Training benchmark: samples/s per GPU and peak memory (mid config, 256² and 512², 1 vs 2 GPUs via Ray
Train), and gsplat vs the reference rasteriser (agreement and speed).

    python bench/bench_train.py --out DIR [--shards OUT] [--steps 20] [--gpus 1,2]
    python bench/bench_train.py --out DIR --cases full:256:fsdp+gc:1,mid:256:ddp:2/share \
        [--resume-check mid:256:fsdp:1]            # any preset/strategy/ranks; crash-and-resume check
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

PRESET_FRAMES = {"tiny": 5, "mid": 9, "full": 13}


def parse_case(spec: str) -> dict:
    """``preset:res:strategy[+gc]:ranks[/share]``, e.g. ``full:256:fsdp+gc:1`` or ``mid:256:ddp:2/share``.

    ``/share`` packs the ranks onto one GPU (gloo backend): a code-path check, not a scaling figure.
    """
    preset, res, strat, ranks = spec.split(":")
    share = ranks.endswith("/share")
    return {
        "preset": preset,
        "resolution": int(res),
        "strategy": strat.split("+")[0],
        "grad_ckpt": "+gc" in strat,
        "workers": int(ranks.split("/")[0]),
        "shared_gpu": share,
    }


def _run_case(
    preset: str,
    res: int,
    frames: int,
    workers: int,
    steps: int,
    shards: str,
    workdir: str,
    use_gpu: bool,
    renderer: str,
    strategy: str = "ddp",
    grad_ckpt: bool = False,
    shared_gpu: bool = False,
    crash_at_step: int | None = None,
    ckpt_every: int = 10**9,
    final_ckpt: bool = True,
    overrides: dict | None = None,
) -> dict:
    """Train ``steps`` steps at one resolution; samples/s from metrics.jsonl timing (excluding 2 warm-up steps)."""
    from training.config import make_config
    from training.trainer import train

    stage = dict(
        name=f"bench{res}",
        steps=steps,
        resolution=res,
        num_frames=frames,
        scenes="any",
        frozen=[],
        losses=["fm", "photo", "geo", "motion"],
        max_frame_stride=1,
    )
    runtime = {
        "launcher": "ray" if workers > 1 or use_gpu else "local",
        "num_workers": workers,
        "use_gpu": use_gpu,
        "renderer": renderer,
        "ckpt_every": ckpt_every,
        "log_every": 1,
        "tensorboard": False,
        "keep_ckpts": 1,
        "strategy": strategy,
        "grad_checkpointing": grad_ckpt,
        "crash_at_step": crash_at_step,
        "checkpoint_at_end": final_ckpt,
    }
    if shared_gpu:
        runtime.update(gpus_per_worker=1.0 / workers, backend="gloo")
    kw = dict(
        data={"root": shards},
        workdir=workdir,
        stages=[stage],
        runtime=runtime,
        loss={"lpips_enabled": False},
        optim={"warmup_steps": 0},
    )
    for k, v in (overrides or {}).items():  # e.g. {"ldrm": {"clean_first_latent": False}}
        kw[k] = {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
    cfg = make_config(preset, **kw)
    os.environ["D4S_BENCH_TIMING"] = "1"
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    ts = [r["time"] for r in rows if "time" in r]
    warm = 2 if len(ts) > 3 else 0  # the first steps include compilation and allocator warm-up
    dt = (ts[-1] - ts[warm]) / (len(ts) - 1 - warm) if len(ts) > 1 else float("nan")
    mem = max((r.get("peak_mem_gb", 0.0) for r in rows), default=0.0)
    samples = cfg.runtime.batch_size * workers
    return {
        "preset": preset,
        "resolution": res,
        "frames": frames,
        "workers": workers,
        "steps": steps,
        "strategy": strategy,
        "grad_ckpt": grad_ckpt,
        "shared_gpu": shared_gpu,
        "s_per_step": dt,
        "samples_per_s": samples / dt,
        "samples_per_s_per_gpu": samples / dt / workers,
        "peak_mem_gb_rank0": mem,
        "wall_s": wall,
        "final_loss": rows[-1]["loss"],
        "losses": [r["loss"] for r in rows],
        "photo": [r.get("photo") for r in rows],
        "psnr": [r.get("psnr") for r in rows],
        "rows": rows,
    }


def resume_check(
    case: dict, frames: int, shards: str, out: str, steps: int = 8, crash: int = 6, every: int = 4, use_gpu: bool = True
) -> dict:
    """Uninterrupted run vs. a run that crashes after step ``crash`` and resumes from the step-``every``
    checkpoint: the losses of the steps after the checkpoint, from both runs, side by side."""
    kw = dict(
        preset=case["preset"],
        res=case["resolution"],
        frames=frames,
        workers=case["workers"],
        steps=steps,
        shards=shards,
        use_gpu=use_gpu,
        renderer="auto",
        strategy=case["strategy"],
        grad_ckpt=case["grad_ckpt"],
        shared_gpu=case["shared_gpu"],
        ckpt_every=every,
    )
    ref = _run_case(workdir=os.path.join(out, "w_resume_ref"), **kw)
    wd = os.path.join(out, "w_resume_crash")
    crash_error = None
    try:
        _run_case(workdir=wd, crash_at_step=crash, **kw)
    except Exception as e:  # the injected crash surfaces as Ray Train's TrainingFailedError
        crash_error = f"{type(e).__name__}: {e}"[-300:]
    if crash_error is None:
        raise RuntimeError("resume check: the run with crash_at_step did not fail")
    resumed = _run_case(workdir=wd, **kw)
    rows = {}
    for line in open(os.path.join(wd, "metrics.jsonl")):  # the resumed run appends: the last row per step wins
        r = json.loads(line)
        rows[r["step"]] = r["loss"]
    after = list(range(every + 1, steps + 1))
    a = [ref["losses"][s - 1] for s in after]
    b = [rows[s] for s in after]
    return {
        "case": case,
        "crash_error": crash_error,
        "steps_compared": after,
        "uninterrupted": a,
        "resumed": b,
        "max_rel_diff": max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)),
        "resume_wall_s": resumed["wall_s"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (tiny config)")
    ap.add_argument("--shards", help="a build's OUT (index.parquet + shards/); default: synthetic shards")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--resolutions", default="256,512")
    ap.add_argument("--frames", type=int, help="frames per sample (default per preset: mid 9, full 13)")
    ap.add_argument(
        "--cases",
        help="comma list of preset:res:strategy[+gc]:ranks[/share] (replaces the "
        "mid x resolutions x gpus grid), e.g. full:256:fsdp+gc:1,mid:256:ddp:2/share",
    )
    ap.add_argument("--resume-check", metavar="CASE", help="crash-and-resume check of one case spec")
    ap.add_argument("--no-rasterizer", action="store_true", help="skip gsplat vs reference")
    ap.add_argument(
        "--no-final-ckpt",
        action="store_true",
        help="cases end without a checkpoint (a 2B model's is ~25 GB); the resume check still writes its own",
    )
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    from training.synthetic import write_shards

    res: dict = {
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cases": [],
    }
    json_path = os.path.join(a.out, "bench_train.json")

    def save() -> None:  # after every case: a later case that kills the process loses nothing
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2)

    if a.quick:
        shards = a.shards or os.path.join(a.out, "shards_synth")
        if not a.shards and not os.path.exists(os.path.join(shards, "index.parquet")):
            write_shards(shards, n_clips=2, per_shard=1, t=5, size=32)
        res["cases"].append(
            _run_case("tiny", 24, 5, 1, min(a.steps, 4), shards, os.path.join(a.out, "w_quick"), False, "torch")
        )
        from training.render_gsplat import compare, gsplat_available

        if gsplat_available():
            res["rasterizer"] = compare(device="cuda")
        else:
            res["rasterizer"] = {"skipped": "gsplat or CUDA not available"}
    else:
        if a.cases == "none":  # e.g. only --resume-check
            cases = []
        elif a.cases:
            cases = [parse_case(c) for c in a.cases.split(",")]
        else:
            cases = [parse_case(f"mid:{r}:ddp:{g}") for r in a.resolutions.split(",") for g in a.gpus.split(",")]
        if a.resume_check:
            cases_for_shards = cases + [parse_case(a.resume_check)]
        else:
            cases_for_shards = cases
        frames_of = {c["preset"]: a.frames or PRESET_FRAMES[c["preset"]] for c in cases_for_shards}
        if not cases_for_shards:
            raise SystemExit("nothing to run: --cases none and no --resume-check")
        shards = a.shards or os.path.join(a.out, "shards_synth")
        if not a.shards and not os.path.exists(os.path.join(shards, "index.parquet")):
            write_shards(
                shards,
                n_clips=16,
                per_shard=2,
                t=max(frames_of.values()),
                size=max(c["resolution"] for c in cases_for_shards),
            )
        use_gpu = torch.cuda.is_available()  # without CUDA the same cases run on CPU (gloo): a smoke check
        for c in cases:
            gpus_needed = 1 if c["shared_gpu"] else c["workers"]
            if use_gpu and gpus_needed > torch.cuda.device_count():
                res["cases"].append({**c, "skipped": "not enough GPUs"})
                save()
                continue
            tag = (
                f"{c['preset']}_{c['resolution']}_{c['strategy']}{'_gc' if c['grad_ckpt'] else ''}_{c['workers']}"
                f"{'share' if c['shared_gpu'] else 'gpu'}"
            )
            try:
                res["cases"].append(
                    _run_case(
                        c["preset"],
                        c["resolution"],
                        frames_of[c["preset"]],
                        c["workers"],
                        a.steps,
                        shards,
                        os.path.join(a.out, f"w_{tag}"),
                        use_gpu,
                        "auto",
                        c["strategy"],
                        c["grad_ckpt"],
                        c["shared_gpu"],
                        final_ckpt=not a.no_final_ckpt,
                    )
                )
            except Exception as e:  # keep going: report the failure (e.g. OOM) in the table
                res["cases"].append({**c, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"[bench_train] {tag}: {res['cases'][-1]}", flush=True)
            save()
        if a.resume_check:
            c = parse_case(a.resume_check)
            try:
                res["resume"] = resume_check(c, frames_of[c["preset"]], shards, a.out, use_gpu=use_gpu)
            except Exception as e:
                res["resume"] = {"case": c, "error": f"{type(e).__name__}: {e}"[-400:]}
            print(f"[bench_train] resume: {res['resume']}", flush=True)
            save()
        from training.render_gsplat import compare, gsplat_available

        if a.no_rasterizer:
            res["rasterizer"] = {"skipped": "--no-rasterizer"}
        elif gsplat_available():
            res["rasterizer"] = [compare(n=n, size=s, device="cuda") for n, s in ((2000, 64), (20000, 128))]
        else:
            res["rasterizer"] = {"skipped": "gsplat or CUDA not available"}
    save()
    with open(os.path.join(a.out, "bench_train.md"), "w") as f:
        f.write(render_md(res))
    print(render_md(res))
    return 0


def render_md(res: dict) -> str:
    lines = [
        f"# bench_train ({res['device']}, torch {res['torch']})",
        "",
        "| preset | res | strategy | grad ckpt | ranks | s/step | samples/s | samples/s/GPU | "
        "peak mem rank0 (GB) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        head = (
            f"| {c.get('preset', 'mid')} | {c.get('resolution')} | {c.get('strategy', 'ddp')} | "
            f"{'yes' if c.get('grad_ckpt') else 'no'} | {c.get('workers')}{' on 1 GPU' if c.get('shared_gpu') else ''} |"
        )
        if "samples_per_s" in c:
            per_gpu = f"{c['samples_per_s_per_gpu']:.2f}" if not c.get("shared_gpu") else "n/a (shared)"
            lines.append(
                f"{head} {c['s_per_step']:.3f} | {c['samples_per_s']:.2f} | {per_gpu} | "
                f"{c['peak_mem_gb_rank0']:.2f} | |"
            )
        else:
            lines.append(f"{head} | | | | {c.get('skipped') or c.get('error')} |")
    if "resume" in res:
        r = res["resume"]
        lines += ["", "## crash and resume", ""]
        if "error" in r:
            lines.append(f"failed: {r['error']}")
        else:
            lines.append(
                f"case {r['case']}: steps {r['steps_compared']}; uninterrupted "
                f"{[round(x, 6) for x in r['uninterrupted']]}; resumed {[round(x, 6) for x in r['resumed']]}; "
                f"max relative difference {r['max_rel_diff']:.2e}"
            )
    lines += ["", "## gsplat vs reference rasteriser", ""]
    ras = res.get("rasterizer")
    if isinstance(ras, dict) and "skipped" in ras:
        lines.append(f"skipped: {ras['skipped']}")
    else:
        lines += [
            "| gaussians | size | ref ms | gsplat ms | rgb max abs | rgb mean abs | alpha max abs | depth mean abs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in ras if isinstance(ras, list) else [ras]:
            lines.append(
                f"| {r['gaussians']} | {r['size']} | {r['reference_ms']:.2f} | {r['gsplat_ms']:.2f} | "
                f"{r['rgb_max_abs']:.2e} | {r['rgb_mean_abs']:.2e} | {r['alpha_max_abs']:.2e} | "
                f"{r['depth_mean_abs']:.2e} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
