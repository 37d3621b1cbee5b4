"""Where whole-video VDA loses speed around the model call: one fresh process per variant.

The scene build's depth actor runs ``VDARunner.predict`` ~13 % slower than a plain process on the
same frames (bench/RESULTS.md §7). This bench runs the same call on the same frame sequences under
the conditions that differ between the two, one at a time and together, each in its own process
(fresh CUDA context, fresh allocator, fresh kernel caches):

* ``warm``: ``VDARunner.warm_for`` on the frame size (every shape once, as the depth stage does
  before a call), one video per call, torch's default threads;
* ``cold``: warm-up on a blank 518x518 window only (the depth actor's start-up warm-up), so the
  calls meet the real network size and its shapes for the first time;
* ``threads1``: ``torch.set_num_threads(1)`` (what Ray's ``OMP_NUM_THREADS`` gives a 1-CPU actor);
* ``grouped``: the videos in calls of ``--per-call`` (a shard's scenes go to the model together);
* ``cpuload``: every other core busy in another process while the calls run (the build's CPU tasks);
* ``actor``: the calls inside a Ray actor holding 1 CPU and the GPU;
* ``build_like``: actor + grouped + cpuload together, warmed as the depth stage is;
* ``*_no_cudnn_sdp``: cuDNN's attention backend off (flash attention instead);

Every variant runs the whole set of videos twice: pass 1 includes first-use costs of new shapes,
pass 2 is the steady state. Frames are random (speed does not depend on content).

    python bench/bench_vda_host.py --out DIR [--variants warm,cold,...] [--lengths 73,73,85,85,97,97]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

VARIANTS = (
    "warm",
    "cold",
    "threads1",
    "grouped",
    "cpuload",
    "actor",
    "build_like",
    "warm_no_cudnn_sdp",
    "build_like_no_cudnn_sdp",
)


def _spin(stop) -> None:
    """Keep one core busy (the build's CPU tasks) until ``stop`` is set; plain Python, one thread."""
    while not stop.is_set():
        sum(i * i for i in range(20000))


def _videos(lengths: list[int], height: int, width: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (t, height, width, 3), dtype=np.uint8) for t in lengths]


def run_calls(a: dict, warm_real: bool, threads1: bool, per_call: int, no_cudnn_sdp: bool = False) -> dict:
    """Build the runner, warm it up, time two passes over the videos (per-call seconds); with
    ``a['profile']``, the first call of pass 1 runs under torch.profiler (top host ops saved)."""
    import contextlib

    import numpy as np
    import torch

    from stages.depth.vda.runner import VDARunner

    if threads1:
        torch.set_num_threads(1)
    if no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runner = VDARunner(
        encoder=a["encoder"],
        metric=True,
        device="cuda" if cuda else "cpu",
        dtype="fp16" if cuda else "fp32",
        input_size=a["input_size"],
        allow_random_weights=True,
    )
    videos = _videos(a["lengths"], a["height"], a["width"])
    t0 = time.perf_counter()
    if warm_real:
        runner.warm_for(videos)  # every shape of the frame size, as the depth stage does
    else:
        runner.predict([np.zeros((32, a["input_size"], a["input_size"], 3), np.uint8)])
    sync()
    warm_s = time.perf_counter() - t0
    passes, table = [], None
    for p in range(2):
        calls = []
        for i in range(0, len(videos), per_call):
            prof = None
            if a.get("profile") and p == 0 and i == 0:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            t0 = time.perf_counter()
            with prof if prof is not None else contextlib.nullcontext():
                runner.predict(videos[i : i + per_call])
                sync()
            calls.append(round(time.perf_counter() - t0, 3))
            if prof is not None:
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        passes.append(calls)
    n = sum(len(v) for v in videos)
    return {
        "frames": n,
        "warmup_s": round(warm_s, 2),
        "torch_threads": torch.get_num_threads(),
        "omp_env": os.environ.get("OMP_NUM_THREADS"),
        "pass1_s": round(sum(passes[0]), 3),
        "pass2_s": round(sum(passes[1]), 3),
        "pass1_fps": n / sum(passes[0]),
        "pass2_fps": n / sum(passes[1]),
        "calls": passes,
        "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
        "profile_first_call": table,
    }


def variant(name: str, a: dict) -> dict:
    cold = name.startswith("cold")
    threads1 = name == "threads1"
    per_call = a["per_call"] if name.startswith(("grouped", "build_like")) else 1
    load = name.startswith(("cpuload", "build_like"))
    in_actor = name.startswith(("actor", "build_like"))
    no_cudnn_sdp = name.endswith("_no_cudnn_sdp")
    stop = mp.Event()
    spinners = [
        mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(max(0, os.cpu_count() - 1) if load else 0)
    ]
    for p in spinners:
        p.start()
    try:
        if in_actor:
            import ray
            import torch

            gpus = 1 if torch.cuda.is_available() else 0
            ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=False)
            fn = ray.remote(num_cpus=1, num_gpus=gpus)(run_calls)
            res = ray.get(fn.remote(a, not cold, threads1, per_call, no_cudnn_sdp))
            ray.shutdown()
        else:
            res = run_calls(a, not cold, threads1, per_call, no_cudnn_sdp)
    finally:
        stop.set()
        for p in spinners:
            p.join(timeout=10)
    return {"variant": name, "busy_cores": len(spinners), **res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lengths", default="73,73,85,85,97,97", help="frames per video (the scene sequences)")
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--encoder", default="vitl")
    ap.add_argument("--input-size", type=int, default=518)
    ap.add_argument("--per-call", type=int, default=3, help="videos per call in the grouped variants")
    ap.add_argument("--profile", action="store_true", help="profile the first call of pass 1 (host ops)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    a = ap.parse_args(argv)
    cfg = {
        "lengths": [int(x) for x in a.lengths.split(",")],
        "height": a.height,
        "width": a.width,
        "encoder": a.encoder,
        "input_size": a.input_size,
        "per_call": a.per_call,
        "profile": a.profile,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    if a.one:
        res = variant(a.one, cfg)
        (a.out / f"vda_host_{a.one}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res), flush=True)
        return 0
    rows = []
    for name in [v for v in a.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; one of {VARIANTS}")
        t0 = time.time()
        cmd = [sys.executable, __file__, "--out", str(a.out), "--one", name, "--lengths", a.lengths]
        cmd += ["--height", str(a.height), "--width", str(a.width), "--encoder", a.encoder]
        cmd += ["--input-size", str(a.input_size), "--per-call", str(a.per_call)] + (["--profile"] if a.profile else [])
        rc = subprocess.run(cmd).returncode
        path = a.out / f"vda_host_{name}.json"
        if rc or not path.exists():
            print(f"variant {name} failed (rc {rc})", flush=True)
            continue
        rows.append(json.loads(path.read_text()) | {"wall_s": round(time.time() - t0, 1)})
    base = next((r for r in rows if r["variant"] == "warm"), None)
    lines = [
        f"frames {sum(cfg['lengths'])} in videos of {a.lengths} at {a.height}x{a.width}; VDA {a.encoder} "
        f"input {a.input_size} fp16 random weights",
        "",
        "| variant | busy cores | torch threads | cuDNN SDPA | warm-up s | pass 1 frames/s | pass 2 frames/s | pass 2 vs warm "
        "| calls, pass 1 (s) | calls, pass 2 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{r['pass2_fps'] / base['pass2_fps']:.1%}" if base else "-"
        lines.append(
            f"| {r['variant']} | {r['busy_cores']} | {r['torch_threads']} | {r['cudnn_sdp']} | {r['warmup_s']} | "
            f"{r['pass1_fps']:.1f} | "
            f"{r['pass2_fps']:.1f} | {rel} | {' '.join(str(c) for c in r['calls'][0])} | "
            f"{' '.join(str(c) for c in r['calls'][1])} |"
        )
    for r in rows:
        if r.get("profile_first_call"):
            lines += [
                "",
                f"first call of pass 1, {r['variant']}: top host ops",
                "",
                "```",
                r["profile_first_call"],
                "```",
            ]
    md = "\n".join(lines)
    (a.out / "bench_vda_host.md").write_text(md + "\n")
    (a.out / "bench_vda_host.json").write_text(json.dumps(rows, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
