"""Benchmark: clips/s of the demo build at 1 and 2 Ray CPUs, and bytes per clip.

Usage: python bench/bench_build.py [--work DIR] [--datasets tartanair,...] [--scenes N]
Demo data is generated once (not timed); each build runs in a fresh process with its own
local Ray (started inside the timing, as a user's `d4s build` would pay it; Ray start-up time
is reported separately).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = r"""
import json, sys, time
t0 = time.time()
import ray
from pipeline.config import BuildConfig
from pipeline.runner import build
cfg = BuildConfig.model_validate(json.loads(sys.argv[1]))
ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False)
t1 = time.time()
s = build(cfg, show_progress=False)
t2 = time.time()
print(json.dumps({"ray_start_s": t1 - t0, "build_s": t2 - t1, "clips": s.clips_written, "failed": s.clips_failed}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    ap.add_argument("--datasets", default="")
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--cpus", default="1,2")
    args = ap.parse_args()
    from pipeline.demo.build_demo import available_demo_datasets, demo_config

    work = Path(args.work or tempfile.mkdtemp(prefix="d4s-bench-"))
    datasets = [d for d in args.datasets.split(",") if d] or available_demo_datasets()
    base = demo_config(str(work / "data"), datasets=datasets, scenes=args.scenes)  # renders once
    rows = []
    for n in [int(c) for c in args.cpus.split(",")]:
        raw = base.model_dump(mode="json")
        raw["output"] = str(work / f"out_cpus{n}")
        raw["ray"]["num_cpus"] = n
        r = subprocess.run([sys.executable, "-c", RUN, json.dumps(raw)], capture_output=True, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        shards = list((work / f"out_cpus{n}" / "shards").rglob("*.tar"))
        total = sum(p.stat().st_size for p in shards)
        res.update(cpus=n, clips_per_s=res["clips"] / res["build_s"], bytes_per_clip=total / max(res["clips"], 1))
        rows.append(res)
        print(json.dumps(res))
    print("\n| Ray CPUs | clips | build s | clips/s | bytes/clip | Ray start s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['cpus']} | {r['clips']} | {r['build_s']:.1f} | {r['clips_per_s']:.2f} | {r['bytes_per_clip']:.0f} | {r['ray_start_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
