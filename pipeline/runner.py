"""Build and resume: plan, then stream shards through the Ray DAG with exactly-once publication.

Exactly-once, step by step:

1. The plan (clip ids, shard assignment) is recorded before any work and never changes for an
   output; a resume re-plans and refuses to continue if the inputs now plan differently.
2. A shard is written whole to a temporary name and published atomically (rename; or one PUT
   on object stores); its bytes are deterministic, so a retried or duplicated attempt
   publishes identical bytes.
3. Only then does the driver append a ``done`` ledger event with the sha256 it read back.
   Readers (``verify``, training) trust the ledger, not the directory listing.
4. On resume, a shard counts as done only if its ledger event says so *and* its file exists
   with that checksum; everything else (pending, running at crash time, failed, corrupted,
   missing) is rebuilt. Stray temporary files from dead workers are removed.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from manifests.store import ManifestStore, host_name
from pipeline.config import OUTPUT_CONFIG_NAME as CONFIG_NAME
from pipeline.config import BuildConfig, ConfigError, load_config, load_output_config
from pipeline.dag import ShardDAG
from pipeline.deps import build_needs
from pipeline.deps import check as check_packages
from pipeline.plan import Plan, make_plan
from pipeline.progress import BuildProgress
from pipeline.split import TRAIN, split_of_clips
from pipeline.storage import Store

log = logging.getLogger("d4s")


@dataclass
class BuildSummary:
    output: str
    shards_total: int
    shards_done: int
    shards_failed: int
    shards_skipped: int
    clips_written: int
    clips_failed: int
    seconds: float
    failures: list[dict] = field(default_factory=list)
    # counters the stages reported (frames through each model, MegaSaM runs and cache hits, ...),
    # summed over the shards written by this call
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.shards_failed == 0


def _check_plan_unchanged(ms: ManifestStore, plan: Plan) -> None:
    old = {c["clip_id"]: c["shard_id"] for c in ms.clips()}
    new = {c["clip_id"]: c["shard_id"] for c in plan.clips}
    if old != new:
        gone, added = len(set(old) - set(new)), len(set(new) - set(old))
        raise ConfigError(f"the inputs no longer give the recorded plan ({gone} clips gone, {added} new, "
                          f"or shards reassigned); build into a new output")


def _shard_is_intact(store: Store, rel: str, sha: str | None) -> bool:
    return bool(sha) and store.exists(rel) and store.sha256(rel) == sha


def remove_stray_temporaries(store: Store) -> int:
    n = 0
    for rel in store.walk_files("shards"):
        if ".tmp-" in rel:
            store.remove(rel)
            n += 1
    return n


def build(cfg: BuildConfig, resume: bool = False, show_progress: bool = True) -> BuildSummary:
    """Run (or continue) a build into ``cfg.output``. Safe to call again after any crash."""
    t0 = time.time()
    cfg = cfg.resolved()
    check_packages(build_needs(cfg), "d4s build")  # before planning reads data and before Ray starts
    store = Store(cfg.output)
    ms = ManifestStore(store)
    plan = make_plan(cfg)
    if ms.has_plan():
        if store.exists(CONFIG_NAME):
            recorded = load_config(store.read_text(CONFIG_NAME), is_text=True)
            if recorded.planning_hash() != cfg.planning_hash():
                raise ConfigError(f"{cfg.output} already holds a build with a different plan; "
                                  f"use `d4s resume {cfg.output}` or a new output")
        _check_plan_unchanged(ms, plan)
        store.write_bytes_atomic(CONFIG_NAME, cfg.to_yaml().encode())
    else:
        if resume:
            raise ConfigError(f"{cfg.output} has no recorded plan; nothing to resume")
        # config first, then the plan: an output that has a plan always has its config, so a
        # driver killed between the two leaves something `d4s resume` can continue
        store.write_bytes_atomic(CONFIG_NAME, cfg.to_yaml().encode())
        ms.write_plan(plan.scenes, plan.clips, plan.shards)

    ledger = ms.ledger()
    todo, skipped = [], 0
    for sh in plan.shards:
        ev = ledger.get(sh["shard_id"])
        if ev and ev["state"] == "done" and _shard_is_intact(store, sh["path"], ev["sha256"]):
            skipped += 1
        else:
            todo.append(sh)
    remove_stray_temporaries(store)

    clips_by_shard: dict[str, list[dict]] = {}
    for c in plan.clips:
        clips_by_shard.setdefault(c["shard_id"], []).append(c)

    build_id = uuid.uuid4().hex[:12]
    done = failed = written = clips_failed = 0
    failures: list[dict] = []
    stats: dict = {}
    progress = BuildProgress(total_shards=len(plan.shards), total_clips=len(plan.clips), enabled=show_progress,
                             already_shards=skipped,
                             already_clips=sum(len(clips_by_shard[s["shard_id"]]) for s in plan.shards) - sum(len(clips_by_shard[s["shard_id"]]) for s in todo))
    if todo:
        dag = ShardDAG(cfg, plan, [c for s in todo for c in clips_by_shard[s["shard_id"]]])
        with progress:
            for sh in todo:
                ms.append_events([{"shard_id": sh["shard_id"], "state": "running", "build_id": build_id,
                                   "attempt": ledger.get(sh["shard_id"], {}).get("attempts", 0) + 1,
                                   "started_at": time.time(), "host": host_name()}])
            for sh, result, error in dag.run(todo, clips_by_shard):
                if error is None:
                    done += 1
                    written += result["samples_written"]
                    clips_failed += len(result["clips_failed"])
                    failures.extend(result["clips_failed"])
                    for k, v in (result.get("stats") or {}).items():
                        stats[k] = stats.get(k, 0) + v
                    event = {"shard_id": sh["shard_id"], "state": "done", "build_id": build_id, **result}
                    if result.get("log"):
                        store.write_bytes_atomic(f"logs/{sh['shard_id']}.log", result["log"].encode())
                else:
                    failed += 1
                    event = {"shard_id": sh["shard_id"], "state": "failed", "build_id": build_id, "error": error,
                             "finished_at": time.time(), "host": host_name()}
                ms.append_events([event])
                progress.shard_finished(result["samples_written"] if error is None else 0,
                                        len(result["clips_failed"]) if error is None else len(clips_by_shard[sh["shard_id"]]))
                if cfg.fault.driver_exit_after_shards is not None and done + failed >= cfg.fault.driver_exit_after_shards:
                    os._exit(19)  # test hook: the driver dies between shards
    write_index(ms, plan, {name: ds.val_fraction for name, ds in cfg.datasets.items()})
    ms.compact()
    return BuildSummary(cfg.output, len(plan.shards), done, failed, skipped, written, clips_failed,
                        time.time() - t0, failures, stats)


def write_index(ms: ManifestStore, plan: Plan, val_fractions: dict[str, float] | None = None) -> None:
    """The training index: every written sample's key -> shard and byte offset, from the ledger, with its
    scene and split (``train`` | ``val``, by scene: :mod:`pipeline.split`)."""
    ledger = ms.ledger()
    split = split_of_clips(plan.clips, val_fractions or {})
    scene = {c["clip_id"]: c["scene"] for c in plan.clips}
    rows = []
    for sh in plan.shards:
        ev = ledger.get(sh["shard_id"])
        if not ev or ev["state"] != "done":
            continue
        for key, offset, num_frames, dynamic in ev["samples"]:
            rows.append({"key": key, "dataset": sh["dataset"], "shard_id": sh["shard_id"], "shard_path": sh["path"],
                         "offset": offset, "num_frames": num_frames, "dynamic": dynamic,
                         "scene": scene.get(key, ""), "split": split.get(key, TRAIN)})
    ms.write_index(rows)


def resume(output: str, show_progress: bool = True, overrides: dict | None = None) -> BuildSummary:
    cfg = load_output_config(output)
    if overrides:
        cfg = BuildConfig.model_validate({**cfg.model_dump(), **overrides})
    return build(cfg, resume=True, show_progress=show_progress)
