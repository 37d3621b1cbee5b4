"""Ray worker processes a build keeps, side by side for two code trees.

A stage task that starts before its inputs exist and waits for them inside holds a worker process
for the wait, and Ray starts more processes (each importing the stages, torch among them) for the
work meanwhile. This runs ``d4s build --demo`` with each code tree in turn (its own local Ray, the
same demo data) and samples the machine's ``ray::`` processes every ``--every`` seconds: the most at
once, their most resident memory together, and the build's seconds.

    python bench/bench_worker_processes.py --trees .bench-old . --out /tmp/bench-workers

``--trees``: code roots (e.g. an older commit unpacked with ``git archive``); each runs with its
root first on ``PYTHONPATH``. Run it on an otherwise idle machine: it counts every ``ray::`` process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def ray_processes() -> tuple[int, int, dict[str, int]]:
    """(count, resident MiB together, count per process title) of the machine's ``ray::`` processes."""
    out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True, check=True).stdout
    n, rss, names = 0, 0, {}
    for line in out.splitlines():
        kb, _, args = line.strip().partition(" ")
        if args.startswith("ray::"):
            n += 1
            rss += int(kb)
            title = args.split()[0]
            names[title] = names.get(title, 0) + 1
    return n, rss // 1024, names


def run_tree(tree: Path, out: Path, every: float) -> dict:
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-c", "from pipeline.cli import app; app()", "build", "--demo", str(out)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    most, most_rss, at_most = 0, 0, {}
    while proc.poll() is None:
        n, rss, names = ray_processes()
        if n > most:
            most, at_most = n, names
        most_rss = max(most_rss, rss)
        time.sleep(every)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"build with {tree} failed ({proc.returncode}):\n{log[-3000:]}")
    return {
        "tree": str(tree),
        "build_s": round(time.time() - t0, 1),
        "most_ray_processes": most,
        "most_ray_rss_mib": most_rss,
        "processes_at_most": at_most,
        "summary": [line for line in log.splitlines() if "clips written" in line],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", type=Path, required=True, help="code roots, run in this order")
    ap.add_argument("--out", type=Path, required=True, help="folder for the builds and bench_worker_processes.json")
    ap.add_argument("--every", type=float, default=0.5, help="sampling period in seconds")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, tree in enumerate(args.trees):
        row = run_tree(tree.resolve(), args.out / f"build-{i}", args.every)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "bench_worker_processes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
