"""Chaos run: kill Ray workers, the local raylet and the driver at random times during a demo build
and its resumes; every trial must end with ``verify`` passing and shards byte-identical to a clean
build, no clip lost and none duplicated.

Usage: python bench/chaos.py --trials N --seed S [--out DIR] [--datasets a,b] [--scenes K] [--megasam]

Per run: the demo data is rendered once and built twice without faults (the reference; the two
must agree byte for byte, and the faster one's timings aim the faults). Each
trial then starts ``d4s build`` as a driver subprocess with its own local Ray, in its own session
and Ray temp dir, and follows a fault plan drawn from ``random.Random(f"{seed}:{trial}")``:

* ``driver``: SIGKILL the driver process (its local Ray dies with it);
* ``worker``: SIGKILL one busy Ray worker process (``ray::<task or actor method>``) of this
  trial's Ray, found among the driver's descendants in ``/proc``;
* ``raylet``: SIGKILL the trial's raylet (the whole local node is lost; the driver dies).

With ``--megasam`` RealEstate10K takes MegaSaM as its metric reference (the stand-in program,
answering the rendered truth after 6 s, about a real run's start-up; one retry per run) and runs
in scene passes, and two more kinds aim at the scene passes:

* ``megasam``: SIGKILL a running MegaSaM command (the stand-in process itself);
* ``scene``: SIGKILL a busy worker of a scene pass (the depth actor, a MegaSaM task, an align task).

Kills are aimed relative to the run's own first busy Ray worker, at random fractions of the
reference's work phase (a third of the driver kills instead fall in Ray start-up and planning). When a run ends with a non-zero status
the trial runs ``d4s resume OUT`` (or ``d4s build CONFIG`` again when the driver died before the
output recorded its config), with fresh faults for the first ``--fault-runs`` runs, until one
run exits 0. Every process a driver started is killed when the run ends. Then the trial checks:
``verify``; the shard files, their paths and the index against the reference; clips lost
(planned, neither in a shard nor recorded as failed) and duplicated (a key more than once
across shards).

Writes ``chaos.json`` and ``chaos.md`` under ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

DEFAULT_DATASETS = "tartanair,pointodyssey,dynamic_replica,matrixcity"
FAULT_KINDS = ("driver", "worker", "raylet", "megasam", "scene")
SCENE_PASS_WORKERS = ("ray::_ModelActor", "ray::megasam_task", "ray::align_task")
MEGASAM_COMMAND = "pipeline.demo.megasam_stand_in"


# ------------------------------------------------------------------------------------------
# processes, from /proc (Linux)


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process; None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return None if rest[0] in ("Z", "X") else (int(rest[1]), int(rest[19]))
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[tuple[int, int], str]:
    """Every live descendant of ``root``: (pid, start time) -> command line."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st:
                children.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child in starts:
                out[(child, starts[child])] = _cmdline(child)
                todo.append(child)
    return out


def _kill(pid: int, start: int) -> bool:
    """SIGKILL ``pid`` if it is still the process that started at ``start`` (pids get reused)."""
    st = _proc_stat(pid)
    if not st or st[1] != start:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _is_busy_worker(cmdline: str) -> bool:
    """A Ray worker process running a task or an actor method (not an idle worker, not Ray's agents)."""
    return cmdline.startswith("ray::") and not cmdline.startswith("ray::IDLE") and "Agent" not in cmdline.split(" ", 1)[0]


class Driver:
    """One ``d4s`` command in its own session, with its descendants tracked while it lives."""

    def __init__(self, args: list[str], env: dict, log_path: Path):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.t0 = time.time()
        self.seen: dict[tuple[int, int], str] = {}
        self.first_busy: float | None = None  # seconds after start when a worker first ran a task
        self.last_busy: float | None = None  # ... and when one was last seen running one
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._track, daemon=True)
        self._watch.start()

    def _track(self) -> None:
        while not self._stop.is_set():
            found = descendants(self.proc.pid)
            with self._lock:
                self.seen.update(found)
            if any(_is_busy_worker(c) for c in found.values()):
                self.last_busy = time.time() - self.t0
                if self.first_busy is None:
                    self.first_busy = self.last_busy
            if self.proc.poll() is not None:
                return
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def live_children(self) -> dict[tuple[int, int], str]:
        found = descendants(self.proc.pid)
        with self._lock:
            self.seen.update(found)
        return found

    def finish(self, timeout: float) -> tuple[int | None, int]:
        """Wait for the driver (None: it hung and was killed); then kill what it left behind."""
        try:
            rc = self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self._stop.set()
        self._watch.join()
        leftovers = 0
        for _ in range(50):  # orphans of a killed driver: raylet, GCS, workers, agents
            alive = [(p, s) for (p, s) in self.seen if _proc_stat(p) and _proc_stat(p)[1] == s]
            if not alive:
                break
            for p, s in alive:
                leftovers += _kill(p, s)
            time.sleep(0.1)
        self.log.close()
        return rc, leftovers


# ------------------------------------------------------------------------------------------
# fault plans


def plan_faults(rng: random.Random, run_index: int, fault_runs: int, scene_faults: bool = False) -> list[tuple[str, float, str]]:
    """(anchor, fraction, kind) for one run; runs past ``fault_runs`` get none.

    Anchor ``work``: at ``fraction`` of the reference's work phase (first to last busy worker seen)
    after this run's first busy worker shows. Anchor ``start``: at ``fraction`` of the reference's
    time to its first busy worker after the driver starts (Ray start-up and planning). Aiming by
    the run's own first busy worker keeps faults inside the work even when Ray's start-up time
    varies, as it does on a shared machine. A driver kill hits start-up/planning one time in three,
    else the DAG (or, near its end, the index and ledger writes).
    """
    if run_index >= fault_runs:
        return []
    first = run_index == 0
    faults = [("work", rng.uniform(0.0, 0.9), "worker") for _ in range(rng.choice([0, 1, 1, 2] if first else [0, 1]))]
    if rng.random() < (0.4 if first else 0.25):
        faults.append(("start", rng.uniform(0.3, 1.0), "driver") if rng.random() < 1 / 3
                      else ("work", rng.uniform(0.0, 1.1), "driver"))
    elif rng.random() < (0.3 if first else 0.1):
        faults.append(("work", rng.uniform(0.1, 0.8), "raylet"))
    if first and not faults:  # every trial's build gets at least one fault
        faults.append(("work", rng.uniform(0.0, 0.7), "worker"))
    if scene_faults:  # every faulted run also gets a kill aimed at a scene pass
        faults.append(("work", rng.uniform(0.0, 0.6), rng.choice(["megasam", "scene"])))
    return faults


def _busy_workers(drv: Driver) -> list[tuple[tuple[int, int], str]]:
    return [(k, c) for k, c in drv.live_children().items() if _is_busy_worker(c)]


def _raylet(drv: Driver) -> list[tuple[tuple[int, int], str]]:
    return [(k, c) for k, c in drv.live_children().items() if "/raylet" in c.split(" ", 1)[0]]


def _megasam_runs(drv: Driver) -> list[tuple[tuple[int, int], str]]:
    return [(k, c) for k, c in drv.live_children().items() if MEGASAM_COMMAND in c]


def _scene_pass_workers(drv: Driver) -> list[tuple[tuple[int, int], str]]:
    return [(k, c) for k, c in _busy_workers(drv) if c.startswith(SCENE_PASS_WORKERS)]


def inject(drv: Driver, kind: str, rng: random.Random, patience_s: float = 3.0) -> dict | None:
    """Carry out one fault now; a worker fault waits up to ``patience_s`` for a busy worker."""
    if kind == "driver":
        if not drv.alive():
            return None
        os.kill(drv.proc.pid, signal.SIGKILL)
        return {"kind": "driver", "target": "driver"}
    pick = {"worker": _busy_workers, "raylet": _raylet, "megasam": _megasam_runs, "scene": _scene_pass_workers}[kind]
    deadline = time.time() + patience_s
    while drv.alive() and time.time() < deadline:
        cands = pick(drv)
        if cands:
            (pid, start), cmd = rng.choice(sorted(cands))
            if _kill(pid, start):
                target = {"raylet": "raylet", "megasam": "megasam command"}.get(kind, cmd.split(" ", 1)[0])
                return {"kind": kind, "target": target}
        time.sleep(0.05)
    return None


# ------------------------------------------------------------------------------------------
# checks


def shard_digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "shards").rglob("*")) if p.is_file()}


def clip_accounting(out: Path) -> dict:
    """Planned clips vs shard contents and recorded failures."""
    from manifests.store import ManifestStore
    from pipeline.storage import Store

    ms = ManifestStore(Store(str(out)))
    planned = [c["clip_id"] for c in ms.clips()]
    keys: Counter = Counter()
    for p in sorted((out / "shards").rglob("*.tar")):
        with tarfile.open(fileobj=io.BytesIO(p.read_bytes())) as tar:
            keys.update({m.name.split(".", 1)[0] for m in tar.getmembers()})
    failed = {f["clip_id"] for e in ms.ledger().values() if e["state"] == "done" for f in e["clips_failed"]}
    index = sorted((r["key"], r["shard_path"], r["offset"]) for r in ms.index())
    return {"planned": len(planned), "written": sum(keys.values()), "failed": sorted(failed),
            "lost": sorted(set(planned) - set(keys) - failed),
            "duplicated": sorted(k for k, n in keys.items() if n > 1) + sorted(set(keys) & failed),
            "index": index}


# ------------------------------------------------------------------------------------------
# trials


def _env(ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join a Ray of the caller
    env.update(RAY_DISABLE_USAGE_STATS="1", RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    return env


def run_trial(trial: int, seed: int, base: dict, work: Path, ref: dict, max_runs: int,
              fault_runs: int, run_timeout_s: float, scene_faults: bool = False) -> dict:
    from pipeline.verify import verify

    rng = random.Random(f"{seed}:{trial}")  # the fault plans: what, and when
    pick = random.Random(f"{seed}:{trial}:pick")  # which worker (kept apart: candidates depend on timing)
    out = work / f"trial-{trial:03d}"
    shutil.rmtree(out, ignore_errors=True)
    raw = json.loads(json.dumps(base))
    raw["output"] = str(out)
    cfg_path = work / f"trial-{trial:03d}.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="d4sc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    t0 = time.time()
    faults, runs, hangs, leftovers, planned = [], [], 0, 0, 0
    try:
        for run_index in range(max_runs):
            recorded = (out / "config.resolved.yaml").exists() and (out / "manifests" / "shards.parquet").exists()
            args = (["resume", str(out)] if recorded else ["build", str(cfg_path)]) + ["--no-progress"]
            plan = plan_faults(rng, run_index, fault_runs, scene_faults)
            planned += len(plan)
            drv = Driver(args, _env(ray_tmp), work / f"trial-{trial:03d}.log")
            done_faults, pending = [], list(plan)
            while pending and drv.alive():
                now = time.time() - drv.t0
                for item in list(pending):
                    anchor, frac, kind = item
                    if anchor == "start":
                        due = frac * ref["first_busy_s"]
                    elif drv.first_busy is not None:
                        due = drv.first_busy + frac * ref["work_s"]
                    else:
                        continue
                    if now >= due:
                        pending.remove(item)
                        f = inject(drv, kind, pick)
                        if f:
                            done_faults.append({**f, "run": run_index, "at_s": round(time.time() - drv.t0, 2)})
                time.sleep(0.02)
            rc, left = drv.finish(run_timeout_s - (time.time() - drv.t0))
            hangs += rc is None
            leftovers += left
            faults += done_faults
            runs.append({"cmd": args[0], "rc": rc, "faults": [f["kind"] for f in done_faults],
                         "seconds": round(time.time() - drv.t0, 1)})
            if rc == 0:
                break
        finished = bool(runs) and runs[-1]["rc"] == 0
        rep = verify(str(out)) if (out / "manifests").exists() else None
        acc = clip_accounting(out) if rep is not None and (out / "manifests" / "clips.parquet").exists() else None
        digests = shard_digests(out) if (out / "shards").exists() else {}
        return {
            "trial": trial, "finished": finished, "runs": len(runs), "resumes": max(0, len(runs) - 1),
            "run_log": runs, "faults_planned": planned, "faults": faults, "faults_by_kind": dict(Counter(f["kind"] for f in faults)),
            "worker_targets": dict(Counter(f["target"] for f in faults if f["kind"] in ("worker", "scene"))),
            "verify_ok": bool(rep and rep.ok), "verify_problems": rep.problems[:10] if rep else ["no output"],
            "identical": digests == ref["digests"] and acc is not None and acc["index"] == ref["accounting"]["index"],
            "failed_as_reference": acc is not None and acc["failed"] == ref["accounting"]["failed"],
            "lost": len(acc["lost"]) if acc else None, "duplicated": len(acc["duplicated"]) if acc else None,
            "hangs": hangs, "leftover_processes_killed": leftovers, "seconds": round(time.time() - t0, 1),
        }
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def reference_build(base: dict, work: Path, run_timeout_s: float, name: str = "reference") -> dict:
    """A clean build without faults: the bytes every trial must reproduce, and its timing."""
    import yaml

    from pipeline.verify import verify

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    raw = json.loads(json.dumps(base))
    raw["output"] = str(out)
    (work / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="d4sc", dir="/tmp")
    try:
        drv = Driver(["build", str(work / f"{name}.yaml"), "--no-progress"], _env(ray_tmp), work / f"{name}.log")
        rc, _ = drv.finish(run_timeout_s)
        seconds = time.time() - drv.t0
        busy = (drv.first_busy, drv.last_busy) if drv.first_busy is not None else (0.5 * seconds, seconds)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rep = verify(str(out))
    if rc != 0 or not rep.ok:
        raise RuntimeError(f"the clean build {name} failed (rc {rc}, {rep.problems[:3]}); see {work / f'{name}.log'}")
    acc = clip_accounting(out)
    return {"seconds": seconds, "first_busy_s": busy[0], "work_s": max(1.0, busy[1] - busy[0]), "digests": shard_digests(out), "accounting": acc}


def references(base: dict, work: Path, run_timeout_s: float) -> dict:
    """Two clean builds: they must agree byte for byte; the faster timings aim the faults (one
    build slowed down by a busy machine would push every fault past the end of the trials' runs)."""
    a = reference_build(base, work, run_timeout_s, "reference")
    b = reference_build(base, work, run_timeout_s, "reference-2")
    if a["digests"] != b["digests"] or a["accounting"] != b["accounting"]:
        raise RuntimeError("two clean builds differ: the output is not reproducible, chaos results would mean nothing")
    shutil.rmtree(work / "reference-2", ignore_errors=True)
    return {**a, **{k: min(a[k], b[k]) for k in ("seconds", "first_busy_s", "work_s")}}


def summarize(args, datasets: list[str], ref: dict, trials: list[dict], wall_s: float) -> dict:
    by_kind: Counter = Counter()
    targets: Counter = Counter()
    for t in trials:
        by_kind.update(t["faults_by_kind"])
        targets.update(t["worker_targets"])
    return {
        "command": f"python bench/chaos.py --trials {args.trials} --seed {args.seed}"
                   + (f" --datasets {args.datasets}" if args.datasets != DEFAULT_DATASETS else "")
                   + (f" --scenes {args.scenes}" if args.scenes != 2 else "")
                   + (" --megasam" if args.megasam else ""),
        "seed": args.seed, "datasets": datasets, "scenes_per_dataset": args.scenes, "ray_cpus": args.num_cpus,
        "reference": {"seconds": round(ref["seconds"], 1), "work_phase_s": round(ref["work_s"], 1), "clips_planned": ref["accounting"]["planned"],
                      "clips_written": ref["accounting"]["written"], "clips_failed": len(ref["accounting"]["failed"]),
                      "shards": len(ref["digests"])},
        "trials": len(trials),
        "faults_planned": sum(t["faults_planned"] for t in trials), "faults_injected": sum(by_kind.values()), "faults_by_kind": dict(by_kind), "worker_targets": dict(targets),
        "runs": sum(t["runs"] for t in trials), "resumes": sum(t["resumes"] for t in trials),
        "all_finished": all(t["finished"] for t in trials),
        "verify_failures": sum(not t["verify_ok"] for t in trials),
        "not_identical": sum(not t["identical"] for t in trials),
        "clips_lost": sum(t["lost"] or 0 for t in trials) + sum(t["lost"] is None for t in trials),
        "clips_duplicated": sum(t["duplicated"] or 0 for t in trials),
        "hangs": sum(t["hangs"] for t in trials),
        "wall_s": round(wall_s, 1),
        "per_trial": trials,
    }


def markdown(s: dict) -> str:
    lines = ["| trial | faults (run: kinds) | runs | resumes | verify | identical | lost | duplicated | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in s["per_trial"]:
        per_run = "; ".join(f"{i}: {'+'.join(r['faults'])}" for i, r in enumerate(t["run_log"]) if r["faults"]) or "-"
        lines.append(f"| {t['trial']} | {per_run} | {t['runs']} | {t['resumes']} | {'ok' if t['verify_ok'] else 'FAIL'} | "
                     f"{'yes' if t['identical'] else 'NO'} | {t['lost']} | {t['duplicated']} | {t['seconds']} |")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["faults_by_kind"].items()))
    lines += ["", f"trials {s['trials']}, faults injected {s['faults_injected']} ({kinds}; {s['faults_planned']} planned: "
                  f"the others fell after the run had ended or found no busy worker), runs {s['runs']} "
                  f"({s['resumes']} resumes), verify failures {s['verify_failures']}, not identical {s['not_identical']}, "
                  f"clips lost {s['clips_lost']}, duplicated {s['clips_duplicated']}, hangs {s['hangs']}, "
                  f"wall {s['wall_s']} s"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--datasets", default=DEFAULT_DATASETS)
    ap.add_argument("--scenes", type=int, default=2, help="demo scenes per dataset")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of each trial's local Ray")
    ap.add_argument("--max-runs", type=int, default=8, help="build + resumes per trial at most")
    ap.add_argument("--fault-runs", type=int, default=3, help="runs of a trial that get faults (later runs none)")
    ap.add_argument("--run-timeout", type=float, default=300.0, help="a driver running longer counts as hung")
    ap.add_argument("--keep", action="store_true", help="keep the trial outputs")
    ap.add_argument("--megasam", action="store_true",
                    help="RealEstate10K with MegaSaM (the stand-in) in scene passes; adds kills of MegaSaM runs and "
                         "of scene-pass workers")
    args = ap.parse_args(argv)

    from pipeline.demo.build_demo import demo_config

    t0 = time.time()
    work = Path(args.out or tempfile.mkdtemp(prefix="d4s-chaos-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.datasets.split(",") if d]
    if args.megasam and "realestate10k" not in datasets:
        datasets.append("realestate10k")
    base = demo_config(str(work / "data"), datasets=datasets, scenes=args.scenes,  # renders once
                       megasam_stand_in=args.megasam, megasam_delay_s=6.0).model_dump(mode="json")
    base["ray"]["num_cpus"] = args.num_cpus
    ref = references(base, work, args.run_timeout)
    print(f"reference: {ref['accounting']['planned']} clips in {len(ref['digests'])} shards, {ref['seconds']:.1f} s "
          f"(workers busy for {ref['work_s']:.1f} s)", flush=True)
    trials = []
    for i in range(args.trials):
        t = run_trial(i, args.seed, base, work, ref, max_runs=args.max_runs,
                      fault_runs=args.fault_runs, run_timeout_s=args.run_timeout, scene_faults=args.megasam)
        trials.append(t)
        print(f"trial {i}: faults {[(f['run'], f['kind'], f['at_s']) for f in t['faults']]}, runs {t['runs']}, "
              f"verify {'ok' if t['verify_ok'] else t['verify_problems']}, identical {t['identical']}, "
              f"lost {t['lost']}, duplicated {t['duplicated']}, {t['seconds']} s", flush=True)
        if not args.keep and t["verify_ok"] and t["identical"]:
            shutil.rmtree(work / f"trial-{i:03d}", ignore_errors=True)
    s = summarize(args, datasets, ref, trials, time.time() - t0)
    (work / "chaos.json").write_text(json.dumps(s, indent=1))
    (work / "chaos.md").write_text(markdown(s))
    print(markdown(s))
    print(f"written: {work / 'chaos.json'}, {work / 'chaos.md'}")
    return s


if __name__ == "__main__":
    summary = main()
    ok = (summary["all_finished"] and not summary["verify_failures"] and not summary["not_identical"]
          and not summary["clips_lost"] and not summary["clips_duplicated"])
    sys.exit(0 if ok else 1)
