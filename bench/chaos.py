"""Chaos run: kill Ray workers, raylets, nodes and the driver at random times during a demo build
and its resumes, start a second driver on the same output, skew a driver's clock, kill the
driver inside a ledger compaction, stop the S3 server; every trial must end with ``verify``
passing and shards byte-identical to a clean build, no clip lost and none duplicated.

Usage: python bench/chaos.py --trials N --seed S [--out DIR] [--datasets a,b] [--scenes K]
       [--megasam] [--nodes K] [--s3] [--kinds a,b]

Per run: the demo data is rendered once and built twice without faults (the reference; the two
must agree byte for byte, and the faster one's timings aim the faults). Each
trial then starts ``d4s build`` as a driver subprocess, in its own session, and follows a fault
plan drawn from ``random.Random(f"{seed}:{trial}")``. Where the drivers run:

* default: each driver starts its own local Ray (its own Ray temp dir);
* ``--nodes K``: one multi-node Ray cluster for the whole run (``ray.cluster_utils.Cluster`` in
  this process: a head with no CPUs and K worker nodes of ``--num-cpus`` each, on loopback);
  drivers join it with ``--address`` (a run-time setting: never recorded in the output);
* ``--s3``: outputs go to an S3 server (moto's server mode, in this process, on loopback) at
  ``s3://<bucket>/<trial>``; drivers and the cluster get its endpoint and fake credentials.

With ``--megasam`` RealEstate10K takes MegaSaM as its metric reference (the stand-in program,
answering the rendered truth after 6 s, about a real run's start-up; one retry per run) and runs
in scene passes, and two more kinds aim at the scene passes (every faulted run gets one of them).

Fault kinds (``--kinds``; default: every kind the setting supports):

* ``driver``: SIGKILL the driver process (a local Ray dies with it);
* ``worker``: SIGKILL one busy Ray worker process (``ray::<task or actor method>``);
* ``raylet``: SIGKILL a local run's raylet (its only node; the driver dies);
* ``node``: with ``--nodes``, remove a worker node without grace (raylet and workers SIGKILLed)
  and add a fresh one;
* ``second_driver``: start ``d4s resume OUT`` while the driver works: it must be refused (exit 3)
  while the first holds the output's lease;
* ``clock_skew``: the run's driver has its wall clock off by up to two hours either way
  (``--fault '{"clock_skew_s": ...}'``);
* ``compaction``: the run's driver exits inside its ledger compaction, after writing the
  compacted file and before deleting the files it folded;
* ``s3_outage``: with ``--s3``, stop the S3 server for 2-8 s and start it again;
* ``megasam``: with ``--megasam``, SIGKILL a running MegaSaM command (the stand-in process itself);
* ``scene``: with ``--megasam``, SIGKILL a busy worker of a scene pass (a scene ingest, the depth actor, a MegaSaM
  task, an align task).

Timed kills are aimed relative to the run's own first busy Ray worker, at random fractions of
the reference's work phase (a third of the driver kills instead fall in Ray start-up and
planning). When a run ends with a non-zero status the trial runs ``d4s resume OUT`` (or ``d4s
build CONFIG`` again when the driver died before the output recorded its config), with fresh
faults for the first ``--fault-runs`` runs, until one run exits 0. Every process a driver started
is killed when the run ends. Then the trial checks: ``verify``; the shard files, their paths and
the index against the reference; clips lost (planned, neither in a shard nor recorded as
failed) and duplicated (a key more than once across shards); ledger rows stored twice (after the
final compaction every event must be stored once).

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
FAULT_KINDS = (
    "driver",
    "worker",
    "raylet",
    "node",
    "second_driver",
    "clock_skew",
    "compaction",
    "s3_outage",
    "megasam",
    "scene",
)
RUN_FAULTS = ("clock_skew", "compaction")  # given to the driver as --fault for the whole run
SCENE_FAULTS = ("megasam", "scene")  # kills aimed at the scene passes (--megasam)
SCENE_PASS_WORKERS = ("ray::ingest_scene_task", "ray::_ModelActor", "ray::megasam_task", "ray::align_task")
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
    return (
        cmdline.startswith("ray::") and not cmdline.startswith("ray::IDLE") and "Agent" not in cmdline.split(" ", 1)[0]
    )


class Driver:
    """One ``d4s`` command in its own session, with its descendants tracked while it lives."""

    def __init__(self, args: list[str], env: dict, log_path: Path, busy_root: int | None = None):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.t0 = time.time()
        # where its Ray workers live: under the driver (its own local Ray), or under the cluster's raylets
        self.busy_root = busy_root
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
            workers = found if self.busy_root is None else descendants(self.busy_root)
            if any(_is_busy_worker(c) for c in workers.values()):
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
# where the drivers run: their own local Ray or a shared cluster; outputs on disk or on S3


class World:
    """The setting of a chaos run (see the module docs): cluster, S3 server, environment."""

    def __init__(self, work: Path, nodes: int = 0, num_cpus: int = 2, s3: bool = False, megasam: bool = False):
        self.work, self.nodes, self.num_cpus, self.megasam = work, nodes, num_cpus, megasam
        self.s3 = self.cluster = None
        self._outage = threading.Lock()
        self.outages = 0
        if s3:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            import logging

            from s3_server import LocalS3

            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            self.s3 = LocalS3(bucket="d4s-chaos").start()
            self.s3.create_bucket()
            self.s3.apply_env()  # this process (checks, a cluster's raylets) talks to it too
        if nodes:
            from ray.cluster_utils import Cluster

            self.ray_tmp = tempfile.mkdtemp(prefix="d4scc", dir="/tmp")
            os.environ["RAY_TMPDIR"] = self.ray_tmp
            # quick death detection of a removed node (the default takes ~15 s)
            system = {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 3,
            }
            self.cluster = Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": system},
            )
            for _ in range(nodes):
                self.cluster.add_node(num_cpus=num_cpus)
            self.cluster.wait_for_nodes()

    @property
    def kinds(self) -> tuple[str, ...]:
        drop = {"raylet"} if self.cluster else {"node"}
        if not self.s3:
            drop.add("s3_outage")
        if not self.megasam:
            drop.update(SCENE_FAULTS)
        return tuple(k for k in FAULT_KINDS if k not in drop)

    def output(self, name: str) -> str:
        return self.s3.url(name) if self.s3 else str(self.work / name)

    def env(self, ray_tmp: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join a Ray of the caller
        env.update(RAY_DISABLE_USAGE_STATS="1", RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
        if self.s3:
            env.update(self.s3.env())
        return env

    def address_args(self) -> list[str]:
        return ["--address", self.cluster.address] if self.cluster else []

    def busy_root(self) -> int | None:
        return os.getpid() if self.cluster else None

    def kill_node(self, rng: random.Random) -> dict | None:
        """Remove a worker node without grace, then add a fresh one (capacity stays the same)."""
        nodes = sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)
        if not nodes:
            return None
        victim = rng.choice(nodes)
        self.cluster.remove_node(victim, allow_graceful=False)
        self.cluster.add_node(num_cpus=self.num_cpus)
        return {"kind": "node", "target": victim.node_id[:8]}

    def outage(self, seconds: float) -> dict | None:
        """Stop the S3 server for ``seconds`` (in a thread; its objects survive the restart)."""
        if not self._outage.acquire(blocking=False):
            return None

        def run() -> None:
            try:
                self.s3.stop()
                time.sleep(seconds)
                self.s3.start()
            finally:
                self._outage.release()

        threading.Thread(target=run, daemon=True).start()
        self.outages += 1
        return {"kind": "s3_outage", "target": f"{seconds:.1f} s"}

    def wait_s3_up(self) -> None:
        with self._outage:
            pass

    def close(self) -> None:
        if self.cluster:
            self.cluster.shutdown()
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
        if self.s3:
            self.wait_s3_up()
            self.s3.stop()
            self.s3.restore_env()


# ------------------------------------------------------------------------------------------
# fault plans


def plan_faults(
    rng: random.Random, run_index: int, fault_runs: int, kinds: tuple[str, ...] = ("driver", "worker", "raylet")
) -> list[tuple[str, float, str]]:
    """(anchor, value, kind) for one run; runs past ``fault_runs`` get none.

    Anchor ``work``: at ``value`` times the reference's work phase (first to last busy worker seen)
    after this run's first busy worker shows. Anchor ``start``: at ``value`` times the reference's
    time to its first busy worker after the driver starts (Ray start-up and planning). Aiming by
    the run's own first busy worker keeps faults inside the work even when Ray's start-up time
    varies, as it does on a shared machine. A driver kill hits start-up/planning one time in three,
    else the DAG (or, near its end, the index and ledger writes). Anchor ``run``: the whole run
    (``value`` is the clock skew in seconds, or 1 for the compaction kill). Kinds not in ``kinds``
    are never drawn; the draws for the original three kinds come first and in their old order,
    then the scene-pass kill (``--megasam``), so a seed plans the same kills as before for them.
    """
    if run_index >= fault_runs:
        return []
    first = run_index == 0
    lose_node = "raylet" if "raylet" in kinds else ("node" if "node" in kinds else None)
    faults = []
    if "worker" in kinds:
        faults += [
            ("work", rng.uniform(0.0, 0.9), "worker") for _ in range(rng.choice([0, 1, 1, 2] if first else [0, 1]))
        ]
    if "driver" in kinds and rng.random() < (0.4 if first else 0.25):
        faults.append(
            ("start", rng.uniform(0.3, 1.0), "driver")
            if rng.random() < 1 / 3
            else ("work", rng.uniform(0.0, 1.1), "driver")
        )
    elif lose_node and rng.random() < (0.3 if first else 0.1):
        faults.append(("work", rng.uniform(0.1, 0.8), lose_node))
    if first and not faults and "worker" in kinds:  # every trial's build gets at least one fault
        faults.append(("work", rng.uniform(0.0, 0.7), "worker"))
    scene = [k for k in SCENE_FAULTS if k in kinds]
    if scene:  # every faulted run also gets a kill aimed at a scene pass
        faults.append(("work", rng.uniform(0.0, 0.6), rng.choice(scene)))
    if "second_driver" in kinds and rng.random() < 0.3:
        faults.append(("work", rng.uniform(0.0, 0.8), "second_driver"))
    if "clock_skew" in kinds and rng.random() < 0.25:
        faults.append(("run", rng.choice([-1, 1]) * rng.uniform(60.0, 7200.0), "clock_skew"))
    if "compaction" in kinds and rng.random() < 0.2:
        faults.append(("run", 1.0, "compaction"))
    if "s3_outage" in kinds and rng.random() < 0.3:
        faults.append(("work", rng.uniform(0.0, 0.8), "s3_outage"))
    if first and not faults and kinds:
        faults.append(("run", 1.0, "compaction") if "compaction" in kinds else ("run", 3600.0, "clock_skew"))
    return faults


def run_fault_args(plan: list[tuple[str, float, str]]) -> list[str]:
    """The ``--fault`` option for the run-wide faults of a plan."""
    hooks = {}
    for _anchor, value, kind in plan:
        if kind == "clock_skew":
            hooks["clock_skew_s"] = round(value, 1)
        elif kind == "compaction":
            hooks["driver_exit_in_compaction"] = True
    return ["--fault", json.dumps(hooks)] if hooks else []


def _busy_workers(drv: Driver) -> list[tuple[tuple[int, int], str]]:
    found = drv.live_children() if drv.busy_root is None else descendants(drv.busy_root)
    return [(k, c) for k, c in found.items() if _is_busy_worker(c)]


def _raylet(drv: Driver) -> list[tuple[tuple[int, int], str]]:
    return [(k, c) for k, c in drv.live_children().items() if "/raylet" in c.split(" ", 1)[0]]


def _megasam_runs(drv: Driver) -> list[tuple[tuple[int, int], str]]:
    found = drv.live_children() if drv.busy_root is None else descendants(drv.busy_root)
    return [(k, c) for k, c in found.items() if MEGASAM_COMMAND in c]


def _scene_pass_workers(drv: Driver) -> list[tuple[tuple[int, int], str]]:
    return [(k, c) for k, c in _busy_workers(drv) if c.startswith(SCENE_PASS_WORKERS)]


def inject(
    drv: Driver,
    kind: str,
    rng: random.Random,
    patience_s: float = 3.0,
    world: World | None = None,
    second: dict | None = None,
) -> dict | None:
    """Carry out one fault now; a worker fault waits up to ``patience_s`` for a busy worker.
    ``second`` (for ``second_driver``): what starting another driver needs (args, env, log)."""
    if kind == "driver":
        if not drv.alive():
            return None
        os.kill(drv.proc.pid, signal.SIGKILL)
        return {"kind": "driver", "target": "driver"}
    if kind == "node":
        return world.kill_node(rng) if drv.alive() else None
    if kind == "s3_outage":
        return world.outage(rng.uniform(2.0, 8.0)) if drv.alive() else None
    if kind == "second_driver":
        if not drv.alive():
            return None
        second["driver"] = Driver(second["args"], second["env"], second["log"])
        return {"kind": "second_driver", "target": "d4s resume"}
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
# checks (through pipeline.storage.Store: local outputs and s3:// alike)


def shard_digests(out: str | Path) -> dict[str, str]:
    from pipeline.storage import Store

    store = Store(str(out))
    return {rel: hashlib.sha256(store.read_bytes(rel)).hexdigest() for rel in store.walk_files("shards")}


def clip_accounting(out: str | Path) -> dict:
    """Planned clips vs shard contents and recorded failures; ledger rows stored more than once."""
    from manifests.store import LEDGER_DIR, ManifestStore, _parse
    from pipeline.storage import Store

    store = Store(str(out))
    ms = ManifestStore(store)
    planned = [c["clip_id"] for c in ms.clips()]
    keys: Counter = Counter()
    for rel in store.walk_files("shards"):
        if rel.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(store.read_bytes(rel))) as tar:
                keys.update({m.name.split(".", 1)[0] for m in tar.getmembers()})
    events = ms.ledger_events()
    failed = {f["clip_id"] for e in ms.ledger(events).values() if e["state"] == "done" for f in e["clips_failed"]}
    stored_rows = sum(
        _parse(store.read_bytes(f"{LEDGER_DIR}/{n}"), columns=["seq"]).num_rows
        for n in store.listdir(LEDGER_DIR)
        if n.endswith(".parquet") and ".tmp-" not in n
    )
    index = sorted((r["key"], r["shard_path"], r["offset"]) for r in ms.index())
    return {
        "planned": len(planned),
        "written": sum(keys.values()),
        "failed": sorted(failed),
        "lost": sorted(set(planned) - set(keys) - failed),
        "duplicated": sorted(k for k, n in keys.items() if n > 1) + sorted(set(keys) & failed),
        "ledger_rows_twice": stored_rows - len(events),
        "index": index,
    }


def _recorded(out: str) -> bool:
    from pipeline.storage import Store

    store = Store(out)
    return store.exists("config.resolved.yaml") and store.exists("manifests/shards.parquet")


# ------------------------------------------------------------------------------------------
# trials


def run_trial(
    trial: int,
    seed: int,
    base: dict,
    work: Path,
    ref: dict,
    max_runs: int,
    fault_runs: int,
    run_timeout_s: float,
    world: World | None = None,
    kinds: tuple[str, ...] | None = None,
) -> dict:
    from pipeline.storage import Store
    from pipeline.verify import verify

    world = world or World(work)
    kinds = world.kinds if kinds is None else kinds
    rng = random.Random(f"{seed}:{trial}")  # the fault plans: what, and when
    pick = random.Random(f"{seed}:{trial}:pick")  # which worker (kept apart: candidates depend on timing)
    out = world.output(f"trial-{trial:03d}")
    Store(out).remove("")
    raw = json.loads(json.dumps(base))
    raw["output"] = out
    cfg_path = work / f"trial-{trial:03d}.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="d4sc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = work / f"trial-{trial:03d}.log"
    t0 = time.time()
    faults, runs, hangs, leftovers, planned, seconds = [], [], 0, 0, 0, []
    try:
        for run_index in range(max_runs):
            if world.s3:
                world.wait_s3_up()
            args = (["resume", out] if _recorded(out) else ["build", str(cfg_path)]) + ["--no-progress"]
            plan = plan_faults(rng, run_index, fault_runs, kinds)
            planned += len(plan)
            run_wide = [f for f in plan if f[0] == "run"]
            timed = [f for f in plan if f[0] != "run"]
            drv = Driver(
                args + world.address_args() + run_fault_args(run_wide),
                world.env(ray_tmp),
                log,
                busy_root=world.busy_root(),
            )
            done_faults = [
                {"kind": k, "target": f"{v:+.0f} s" if k == "clock_skew" else "driver", "run": run_index, "at_s": 0.0}
                for _, v, k in run_wide
            ]
            second = {
                "args": ["resume", out, "--no-progress"] + world.address_args(),
                "env": world.env(ray_tmp),
                "log": log,
            }
            pending = list(timed)
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
                        f = inject(drv, kind, pick, world=world, second=second)
                        if f:
                            done_faults.append({**f, "run": run_index, "at_s": round(time.time() - drv.t0, 2)})
                time.sleep(0.02)
            rc, left = drv.finish(run_timeout_s - (time.time() - drv.t0))
            hangs += rc is None
            leftovers += left
            second_rc = None
            if "driver" in second:  # a second driver on the same output: refused while the first held it
                second_rc, left2 = second["driver"].finish(run_timeout_s)
                leftovers += left2
                for f in done_faults:
                    if f["kind"] == "second_driver":
                        f["outcome"] = {3: "refused", 0: "ran after the first ended"}.get(
                            second_rc, f"exit {second_rc}"
                        )
            faults += done_faults
            runs.append(
                {
                    "cmd": args[0],
                    "rc": rc,
                    "faults": [f["kind"] for f in done_faults],
                    "second_rc": second_rc,
                    "seconds": round(time.time() - drv.t0, 1),
                }
            )
            seconds.append(time.time() - drv.t0)
            if rc == 0 and second_rc in (None, 0, 3):
                break
        finished = bool(runs) and runs[-1]["rc"] == 0
        if world.s3:
            world.wait_s3_up()
        store = Store(out)
        has_plan = store.exists("manifests/clips.parquet")
        rep = verify(out) if store.exists("manifests") or has_plan else None
        acc = clip_accounting(out) if rep is not None and has_plan else None
        digests = shard_digests(out) if has_plan else {}
        second_outcomes = [f.get("outcome") for f in faults if f["kind"] == "second_driver"]
        return {
            "trial": trial,
            "finished": finished,
            "runs": len(runs),
            "resumes": max(0, len(runs) - 1),
            "run_log": runs,
            "faults_planned": planned,
            "faults": faults,
            "faults_by_kind": dict(Counter(f["kind"] for f in faults)),
            "worker_targets": dict(Counter(f["target"] for f in faults if f["kind"] in ("worker", "scene"))),
            "second_drivers": dict(Counter(second_outcomes)),
            "verify_ok": bool(rep and rep.ok),
            "verify_problems": rep.problems[:10] if rep else ["no output"],
            "identical": digests == ref["digests"] and acc is not None and acc["index"] == ref["accounting"]["index"],
            "failed_as_reference": acc is not None and acc["failed"] == ref["accounting"]["failed"],
            "lost": len(acc["lost"]) if acc else None,
            "duplicated": len(acc["duplicated"]) if acc else None,
            "ledger_rows_twice": acc["ledger_rows_twice"] if acc else None,
            "hangs": hangs,
            "leftover_processes_killed": leftovers,
            "seconds": round(time.time() - t0, 1),
        }
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def reference_build(
    base: dict, work: Path, run_timeout_s: float, name: str = "reference", world: World | None = None
) -> dict:
    """A clean build without faults: the bytes every trial must reproduce, and its timing."""
    import yaml

    from pipeline.storage import Store
    from pipeline.verify import verify

    world = world or World(work)
    out = world.output(name)
    Store(out).remove("")
    raw = json.loads(json.dumps(base))
    raw["output"] = out
    (work / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="d4sc", dir="/tmp")
    try:
        drv = Driver(
            ["build", str(work / f"{name}.yaml"), "--no-progress"] + world.address_args(),
            world.env(ray_tmp),
            work / f"{name}.log",
            busy_root=world.busy_root(),
        )
        rc, _ = drv.finish(run_timeout_s)
        seconds = time.time() - drv.t0
        busy = (drv.first_busy, drv.last_busy) if drv.first_busy is not None else (0.5 * seconds, seconds)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rep = verify(out)
    if rc != 0 or not rep.ok:
        raise RuntimeError(f"the clean build {name} failed (rc {rc}, {rep.problems[:3]}); see {work / f'{name}.log'}")
    acc = clip_accounting(out)
    return {
        "seconds": seconds,
        "first_busy_s": busy[0],
        "work_s": max(1.0, busy[1] - busy[0]),
        "digests": shard_digests(out),
        "accounting": acc,
    }


def references(base: dict, work: Path, run_timeout_s: float, world: World | None = None) -> dict:
    """Two clean builds: they must agree byte for byte; the faster timings aim the faults (one
    build slowed down by a busy machine would push every fault past the end of the trials' runs)."""
    from pipeline.storage import Store

    world = world or World(work)
    a = reference_build(base, work, run_timeout_s, "reference", world)
    b = reference_build(base, work, run_timeout_s, "reference-2", world)
    if a["digests"] != b["digests"] or a["accounting"] != b["accounting"]:
        raise RuntimeError("two clean builds differ: the output is not reproducible, chaos results would mean nothing")
    Store(world.output("reference-2")).remove("")
    return {**a, **{k: min(a[k], b[k]) for k in ("seconds", "first_busy_s", "work_s")}}


def summarize(args, datasets: list[str], ref: dict, trials: list[dict], wall_s: float, kinds=()) -> dict:
    by_kind: Counter = Counter()
    targets: Counter = Counter()
    seconds: Counter = Counter()
    for t in trials:
        by_kind.update(t["faults_by_kind"])
        targets.update(t["worker_targets"])
        seconds.update(t.get("second_drivers") or {})
    return {
        "command": f"python bench/chaos.py --trials {args.trials} --seed {args.seed}"
        + (f" --datasets {args.datasets}" if args.datasets != DEFAULT_DATASETS else "")
        + (f" --scenes {args.scenes}" if args.scenes != 2 else "")
        + (" --megasam" if args.megasam else "")
        + (f" --num-cpus {args.num_cpus}" if args.num_cpus != 2 else "")
        + (f" --nodes {args.nodes}" if args.nodes else "")
        + (" --s3" if args.s3 else "")
        + (f" --kinds {args.kinds}" if args.kinds else ""),
        "seed": args.seed,
        "datasets": datasets,
        "scenes_per_dataset": args.scenes,
        "ray_cpus": args.num_cpus,
        "nodes": args.nodes,
        "s3": args.s3,
        "kinds": list(kinds),
        "reference": {
            "seconds": round(ref["seconds"], 1),
            "work_phase_s": round(ref["work_s"], 1),
            "clips_planned": ref["accounting"]["planned"],
            "clips_written": ref["accounting"]["written"],
            "clips_failed": len(ref["accounting"]["failed"]),
            "shards": len(ref["digests"]),
        },
        "trials": len(trials),
        "faults_planned": sum(t["faults_planned"] for t in trials),
        "faults_injected": sum(by_kind.values()),
        "faults_by_kind": dict(by_kind),
        "worker_targets": dict(targets),
        "second_drivers": dict(seconds),
        "runs": sum(t["runs"] for t in trials),
        "resumes": sum(t["resumes"] for t in trials),
        "all_finished": all(t["finished"] for t in trials),
        "verify_failures": sum(not t["verify_ok"] for t in trials),
        "not_identical": sum(not t["identical"] for t in trials),
        "clips_lost": sum(t["lost"] or 0 for t in trials) + sum(t["lost"] is None for t in trials),
        "clips_duplicated": sum(t["duplicated"] or 0 for t in trials),
        "ledger_rows_twice": sum(t["ledger_rows_twice"] or 0 for t in trials),
        "hangs": sum(t["hangs"] for t in trials),
        "wall_s": round(wall_s, 1),
        "per_trial": trials,
    }


def markdown(s: dict) -> str:
    lines = [
        "| trial | faults (run: kinds) | runs | resumes | verify | identical | lost | duplicated | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in s["per_trial"]:
        per_run = "; ".join(f"{i}: {'+'.join(r['faults'])}" for i, r in enumerate(t["run_log"]) if r["faults"]) or "-"
        lines.append(
            f"| {t['trial']} | {per_run} | {t['runs']} | {t['resumes']} | {'ok' if t['verify_ok'] else 'FAIL'} | "
            f"{'yes' if t['identical'] else 'NO'} | {t['lost']} | {t['duplicated']} | {t['seconds']} |"
        )
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["faults_by_kind"].items()))
    second = ", ".join(f"{k} {v}" for k, v in sorted(s.get("second_drivers", {}).items())) or "none"
    lines += [
        "",
        f"trials {s['trials']}, faults injected {s['faults_injected']} ({kinds}; {s['faults_planned']} planned: "
        f"the others fell after the run had ended or found no busy worker), runs {s['runs']} "
        f"({s['resumes']} resumes), second drivers: {second}, verify failures {s['verify_failures']}, "
        f"not identical {s['not_identical']}, clips lost {s['clips_lost']}, duplicated {s['clips_duplicated']}, "
        f"ledger rows stored twice {s['ledger_rows_twice']}, hangs {s['hangs']}, wall {s['wall_s']} s",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--datasets", default=DEFAULT_DATASETS)
    ap.add_argument("--scenes", type=int, default=2, help="demo scenes per dataset")
    ap.add_argument(
        "--megasam",
        action="store_true",
        help="RealEstate10K with MegaSaM (the stand-in) in scene passes; adds kills of MegaSaM runs and "
        "of scene-pass workers",
    )
    ap.add_argument(
        "--num-cpus", type=int, default=2, help="CPUs of each trial's local Ray (of each worker node with --nodes)"
    )
    ap.add_argument(
        "--nodes", type=int, default=0, help="run every driver on one multi-node cluster of this many worker nodes"
    )
    ap.add_argument("--s3", action="store_true", help="outputs on an S3 server (moto) started by this script")
    ap.add_argument(
        "--kinds",
        default="",
        help=f"fault kinds, comma-separated (default: all the setting supports: {','.join(FAULT_KINDS)})",
    )
    ap.add_argument("--max-runs", type=int, default=8, help="build + resumes per trial at most")
    ap.add_argument("--fault-runs", type=int, default=3, help="runs of a trial that get faults (later runs none)")
    ap.add_argument("--run-timeout", type=float, default=300.0, help="a driver running longer counts as hung")
    ap.add_argument("--keep", action="store_true", help="keep the trial outputs")
    args = ap.parse_args(argv)

    from pipeline.demo.build_demo import demo_config
    from pipeline.storage import Store

    t0 = time.time()
    work = Path(args.out or tempfile.mkdtemp(prefix="d4s-chaos-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.datasets.split(",") if d]
    if args.megasam and "realestate10k" not in datasets:
        datasets.append("realestate10k")
    base = demo_config(
        str(work / "data"),
        datasets=datasets,
        scenes=args.scenes,  # renders once
        megasam_stand_in=args.megasam,
        megasam_delay_s=6.0,
    ).model_dump(mode="json")
    base["ray"]["num_cpus"] = args.num_cpus
    # a transient failure (a node or the store gone for seconds) is re-run after 1 s, not 30
    base["ray"].update(shard_retries=2, retry_backoff_s=1.0)
    world = World(work, nodes=args.nodes, num_cpus=args.num_cpus, s3=args.s3, megasam=args.megasam)
    try:
        kinds = tuple(k for k in args.kinds.split(",") if k) if args.kinds else world.kinds
        unknown = set(kinds) - set(world.kinds)
        if unknown:
            raise SystemExit(
                f"fault kinds {sorted(unknown)} do not apply here (this setting supports {list(world.kinds)})"
            )
        ref = references(base, work, args.run_timeout, world)
        print(
            f"reference: {ref['accounting']['planned']} clips in {len(ref['digests'])} shards, {ref['seconds']:.1f} s "
            f"(workers busy for {ref['work_s']:.1f} s); fault kinds {list(kinds)}",
            flush=True,
        )
        trials = []
        for i in range(args.trials):
            t = run_trial(
                i,
                args.seed,
                base,
                work,
                ref,
                max_runs=args.max_runs,
                fault_runs=args.fault_runs,
                run_timeout_s=args.run_timeout,
                world=world,
                kinds=kinds,
            )
            trials.append(t)
            print(
                f"trial {i}: faults {[(f['run'], f['kind'], f['at_s']) for f in t['faults']]}, runs {t['runs']}, "
                f"verify {'ok' if t['verify_ok'] else t['verify_problems']}, identical {t['identical']}, "
                f"lost {t['lost']}, duplicated {t['duplicated']}, ledger rows twice {t['ledger_rows_twice']}, "
                f"{t['seconds']} s",
                flush=True,
            )
            if not args.keep and t["verify_ok"] and t["identical"]:
                Store(world.output(f"trial-{i:03d}")).remove("")
        s = summarize(args, datasets, ref, trials, time.time() - t0, kinds)
    finally:
        world.close()
    (work / "chaos.json").write_text(json.dumps(s, indent=1))
    (work / "chaos.md").write_text(markdown(s))
    print(markdown(s))
    print(f"written: {work / 'chaos.json'}, {work / 'chaos.md'}")
    return s


if __name__ == "__main__":
    summary = main()
    ok = (
        summary["all_finished"]
        and not summary["verify_failures"]
        and not summary["not_identical"]
        and not summary["clips_lost"]
        and not summary["clips_duplicated"]
        and not summary["ledger_rows_twice"]
    )
    sys.exit(0 if ok else 1)
