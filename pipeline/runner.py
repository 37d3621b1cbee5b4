"""Build and resume: plan, then stream shards through the Ray DAG with exactly-once publication.

Exactly-once, step by step:

0. One driver per output: the driver takes the output's lease (``manifests/lease.py``) before
   anything else and keeps it renewed; a second driver is refused with who holds it. Every
   write below (config, plan, ledger, compaction, the sweep of temporaries) is the holder's, and
   each ledger append first checks that the lease is still held.
1. The plan (clip ids, shard assignment) is recorded before any work and never changes for an
   output; a resume re-plans and refuses to continue if the inputs now plan differently. The
   config is recorded without its fault hooks; a later build or resume whose *content*
   settings differ (``BuildConfig.content_fields``) is refused with the differing fields,
   unless ``new_version`` asks to rebuild the shards they change with the new settings. A later
   build with the same content records its config's other settings (moved dataset roots);
   run-time overrides (``--address``, retries, in-flight limit) apply to the run only and, like
   a resume, never rewrite the recorded config.
2. A shard is written whole to a temporary name and published atomically (rename; or one PUT
   on object stores); its bytes are deterministic, so a retried or duplicated attempt
   publishes identical bytes (on machines with the same libraries, docs/FORMAT.md).
3. Only then does the driver append a ``done`` ledger event with the sha256 it read back and the
   stored object's fingerprint. Readers (``verify``, training) trust the ledger, not the listing.
4. On resume, a shard counts as done only if its ledger event says so *and* its object is
   there, unchanged: one listing of ``shards/`` gives every object's fingerprint (size and ETag,
   or size, mtime and inode); an object whose fingerprint differs from the recorded one is
   hashed (in parallel) against the recorded sha256. Everything else (pending, running at crash
   time, failed, corrupted, missing) is rebuilt. ``full_check`` hashes every shard; ``d4s
   verify`` checks everything. Stray temporary files are removed by the lease holder.
5. Transient failures (lost workers or nodes, out of memory, timeouts, an unreachable store)
   never publish a shard with a clip missing: the DAG re-runs the shard with backoff and, if the
   failure persists, it is recorded ``failed`` (``error_class: transient``) for resume.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from manifests.index_rows import LEDGER_COLUMNS, index_rows
from manifests.lease import Lease
from manifests.store import ManifestStore, host_name
from pipeline.config import OUTPUT_CONFIG_NAME as CONFIG_NAME
from pipeline.config import BuildConfig, ConfigError, load_output_config
from pipeline.dag import ShardDAG, check_cluster_address
from pipeline.deps import build_needs
from pipeline.deps import check as check_packages
from pipeline.feed import FeedMonitor
from pipeline.plan import Plan, make_plan
from pipeline.progress import BuildProgress
from pipeline.storage import Store

log = logging.getLogger("d4s")

CONFIG_HISTORY = "config.history"
HASH_WORKERS = 16  # shards hashed at once when a resume must read them


class ConfigDriftError(ConfigError):
    """The output was built with other content settings (the differing fields are listed)."""


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
    shards_failed_transient: int = 0  # of shards_failed: transient (resume rebuilds them)

    @property
    def ok(self) -> bool:
        return self.shards_failed == 0


def _check_plan_unchanged(ms: ManifestStore, plan: Plan) -> None:
    old = {c["clip_id"]: c["shard_id"] for c in ms.clips()}
    new = {c["clip_id"]: c["shard_id"] for c in plan.clips}
    if old != new:
        gone, added = len(set(old) - set(new)), len(set(new) - set(old))
        raise ConfigError(
            f"the inputs no longer give the recorded plan ({gone} clips gone, {added} new, "
            f"or shards reassigned); build into a new output"
        )


def remove_stray_temporaries(store: Store, lease: Lease, rels: list[str] | None = None) -> int:
    """Delete ``.tmp-`` files under ``shards/`` (write attempts that died mid-publish). Only the
    lease holder may: another driver's in-flight temporary would otherwise vanish before its
    rename."""
    n = 0
    for rel in store.walk_files("shards") if rels is None else rels:
        if ".tmp-" in rel:
            lease.check()
            store.remove(rel)
            n += 1
    return n


def settle_done_shards(
    store: Store, shards: list[dict], ledger: dict[str, dict], full_check: bool = False, workers: int = HASH_WORKERS
) -> tuple[set[str], list[str]]:
    """(ids of the shards that are done and intact, stray temporaries) from one listing of ``shards/``.

    A done shard whose stored object still has the fingerprint recorded at publication is
    trusted without reading it. One whose fingerprint changed (rewritten, by a zombie attempt
    or by hand) but whose size matches is hashed against the recorded sha256; the hashes run in
    ``workers`` threads. ``full_check`` hashes every done shard.
    """
    listing = store.files_detail("shards")
    done: set[str] = set()
    to_hash: list[tuple[str, str, str]] = []
    for sh in shards:
        ev = ledger.get(sh["shard_id"])
        if not ev or ev["state"] != "done" or not ev.get("sha256"):
            continue
        info = listing.get(sh["path"])
        if info is None:
            continue
        if full_check:
            to_hash.append((sh["shard_id"], sh["path"], ev["sha256"]))
        elif ev.get("fingerprint") and Store.fingerprint(info) == ev["fingerprint"]:
            done.add(sh["shard_id"])
        elif ev.get("bytes") is None or info.get("size") == ev["bytes"]:
            to_hash.append((sh["shard_id"], sh["path"], ev["sha256"]))
    if to_hash:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(to_hash)))) as pool:
            for (sid, _, sha), got in zip(to_hash, pool.map(lambda t: store.sha256(t[1]), to_hash)):
                if got == sha:
                    done.add(sid)
    return done, [rel for rel in listing if ".tmp-" in rel]


def _record_new_version(
    store: Store, ms: ManifestStore, recorded: BuildConfig, cfg: BuildConfig, plan: Plan, lease: Lease, build_id: str
) -> None:
    """Start a new output version: the shards of every dataset whose content settings changed
    (``BuildConfig.content_hash(dataset)``: a global setting changes them all) back to pending
    first, then the old config into ``config.history/`` and the new one recorded (a crash in
    between leaves the old config with those shards pending, which a resume rebuilds
    consistently). Shards of datasets whose settings did not change stay done."""
    changed = {
        d: cfg.content_hash(d)
        for d in cfg.datasets
        if d not in recorded.datasets or recorded.content_hash(d) != cfg.content_hash(d)
    }
    lease.check()
    ms.append_events(
        [
            {
                "shard_id": sh["shard_id"],
                "state": "pending",
                "build_id": build_id,
                "host": host_name(),
                "error": f"content settings changed: new version {changed[sh['dataset']]}",
                "finished_at": time.time(),
            }
            for sh in plan.shards
            if sh["dataset"] in changed
        ]
    )
    store.write_bytes_atomic(
        f"{CONFIG_HISTORY}/{int(time.time())}-{recorded.content_hash()}.yaml", recorded.to_yaml().encode()
    )
    store.write_bytes_atomic(CONFIG_NAME, cfg.recorded().to_yaml().encode())


def _check_recorded(
    store: Store,
    ms: ManifestStore,
    cfg: BuildConfig,
    run: BuildConfig,
    plan: Plan,
    resume: bool,
    new_version: bool,
    lease: Lease,
    build_id: str,
) -> None:
    """Refuse a different plan or (without ``new_version``) different content settings.

    The recorded config is never rewritten by a resume or by run-time overrides. A ``d4s build``
    given a config with the same content records that config's other settings (a dataset moved
    to another root, other resources, the validation split): later resumes read the new roots.
    """
    if not store.exists(CONFIG_NAME):
        raise ConfigError(f"{cfg.output} has a plan but no {CONFIG_NAME}; it was not written by d4s")
    recorded = load_output_config(run.output)
    if recorded.planning_hash() != run.planning_hash():
        raise ConfigError(
            f"{cfg.output} already holds a build with a different plan; use `d4s resume {cfg.output}` or a new output"
        )
    _check_plan_unchanged(ms, plan)
    drift = recorded.content_diff(run)
    if drift and not new_version:
        raise ConfigDriftError(
            f"{cfg.output} was built with other content settings ({len(drift)} differ: {'; '.join(drift[:12])}"
            + (" ..." if len(drift) > 12 else "")
            + "). Shards of both would be mixed: build into a new output, "
            "or pass --new-version to rebuild the shards these settings change with the new settings"
        )
    if drift:
        log.warning("new output version for %s: %s", cfg.output, "; ".join(drift))
        _record_new_version(store, ms, recorded, cfg, plan, lease, build_id)
    elif not resume and cfg.recorded().model_dump(mode="json") != recorded.model_dump(mode="json"):
        lease.check()
        store.write_bytes_atomic(CONFIG_NAME, cfg.recorded().to_yaml().encode())


class _SkewedClock:
    """Test hook (``fault.clock_skew_s``): this process's wall clock runs off, as on a host without NTP."""

    def __init__(self, skew_s: float):
        self.skew_s = skew_s
        self.saved = None

    def __enter__(self):
        if self.skew_s:
            self.saved = (time.time, time.time_ns)
            real, real_ns = self.saved
            time.time = lambda: real() + self.skew_s
            time.time_ns = lambda: real_ns() + int(self.skew_s * 1e9)
        return self

    def __exit__(self, *exc):
        if self.saved:
            time.time, time.time_ns = self.saved


def _die_in_compaction() -> None:
    os._exit(21)  # test hook: killed between the compacted file and the deletion of its inputs


def _compaction_hook(run: BuildConfig):
    return _die_in_compaction if run.fault.driver_exit_in_compaction else None


def build(
    cfg: BuildConfig,
    resume: bool = False,
    show_progress: bool = True,
    overrides: dict | None = None,
    new_version: bool = False,
    full_check: bool = False,
) -> BuildSummary:
    """Run (or continue) a build into ``cfg.output``. Safe to call again after any crash.

    ``overrides`` are run-time settings for this run only (merged field by field, never
    recorded); ``new_version`` accepts changed content settings by rebuilding the shards they change;
    ``full_check`` re-hashes every finished shard instead of trusting unchanged fingerprints.
    """
    t0 = time.time()
    cfg = cfg.resolved().with_absolute_locations()
    if resume:
        cfg = cfg.recorded()  # a fault hook recorded by an older d4s never comes back
    run = cfg.with_overrides(overrides)
    check_packages(build_needs(run), "d4s build")  # before the lease, planning reads data and Ray starts
    check_cluster_address(run)  # a cluster address where nothing answers: one line, before the lease
    with _SkewedClock(run.fault.clock_skew_s):
        store = Store(run.output)
        if store.is_local and os.path.exists(store.root) and not os.path.isdir(store.root):
            raise ConfigError(f"output {store.root} is not a folder (a file is there)")
        ms = ManifestStore(store)
        lease = Lease(
            store, command="resume" if resume else "build", ttl_s=run.lease.ttl_s, heartbeat_s=run.lease.heartbeat_s
        )
        lease.acquire(min_epoch=ms.max_epoch())
        try:
            lease.start_heartbeat()
            ms.set_epoch(lease.record.epoch)
            return _build_holding_lease(cfg, run, store, ms, lease, resume, show_progress, new_version, full_check, t0)
        finally:
            lease.release()


def _build_holding_lease(
    cfg: BuildConfig,
    run: BuildConfig,
    store: Store,
    ms: ManifestStore,
    lease: Lease,
    resume: bool,
    show_progress: bool,
    new_version: bool,
    full_check: bool,
    t0: float,
) -> BuildSummary:
    build_id = lease.owner
    plan = make_plan(run)
    if ms.has_plan():
        _check_recorded(store, ms, cfg, run, plan, resume, new_version, lease, build_id)
    else:
        if resume:
            raise ConfigError(f"{run.output} has no recorded plan; nothing to resume")
        # config first, then the plan: an output that has a plan always has its config, so a
        # driver killed between the two leaves something `d4s resume` can continue
        lease.check()
        store.write_bytes_atomic(CONFIG_NAME, cfg.recorded().to_yaml().encode())
        ms.write_plan(plan.scenes, plan.clips, plan.shards)

    ledger = ms.ledger(columns=("sha256", "fingerprint", "bytes"))  # what settling done shards needs
    intact, strays = settle_done_shards(store, plan.shards, ledger, full_check=full_check)
    todo = [sh for sh in plan.shards if sh["shard_id"] not in intact]
    skipped = len(plan.shards) - len(todo)
    if remove_stray_temporaries(store, lease, strays):
        log.info("removed temporaries of write attempts that died mid-publish")

    clips_by_shard: dict[str, list[dict]] = {}
    for c in plan.clips:
        clips_by_shard.setdefault(c["shard_id"], []).append(c)

    content_hash = {d: run.content_hash(d) for d in run.datasets}  # each shard's samples' meta.config_hash
    done = failed = failed_transient = written = clips_failed = 0
    failures: list[dict] = []
    stats: dict = {}
    progress = BuildProgress(
        total_shards=len(plan.shards),
        total_clips=len(plan.clips),
        enabled=show_progress,
        already_shards=skipped,
        already_clips=len(plan.clips) - sum(len(clips_by_shard[s["shard_id"]]) for s in todo),
    )
    if todo:
        dag = ShardDAG(run, plan, [c for s in todo for c in clips_by_shard[s["shard_id"]]])
        feed = FeedMonitor(run.max_inflight_shards, sorted(dag.pools))  # do the model actors wait?
        with progress:
            lease.check()
            now = time.time()
            ms.append_events(
                [
                    {
                        "shard_id": sh["shard_id"],
                        "state": "running",
                        "build_id": build_id,
                        "attempt": ledger.get(sh["shard_id"], {}).get("attempts", 0) + 1,
                        "started_at": now,
                        "host": host_name(),
                    }
                    for sh in todo
                ]
            )
            for sh, result, error in dag.run(todo, clips_by_shard):
                if error is None:
                    done += 1
                    written += result["samples_written"]
                    clips_failed += len(result["clips_failed"])
                    failures.extend(result["clips_failed"])
                    for k, v in (result.get("stats") or {}).items():
                        stats[k] = stats.get(k, 0) + v
                    queued = len(todo) - (done + failed) - run.max_inflight_shards
                    if (warning := feed.observe(result.get("stats") or {}, max(0, queued), dag.spare_cpus)) is not None:
                        log.warning(warning)
                    event = {
                        "shard_id": sh["shard_id"],
                        "state": "done",
                        "build_id": build_id,
                        "content_hash": content_hash[sh["dataset"]],
                        **result,
                    }
                    if result.get("log"):
                        lease.check()
                        try:  # information only: a log that cannot be written must not undo the shard
                            store.write_bytes_atomic(f"logs/{sh['shard_id']}.log", result["log"].encode())
                        except OSError as exc:
                            log.warning("shard %s: its log was not written (%s)", sh["shard_id"], exc)
                else:
                    failed += 1
                    failed_transient += error.transient
                    event = {
                        "shard_id": sh["shard_id"],
                        "state": "failed",
                        "build_id": build_id,
                        "error": error.message,
                        "error_class": error.error_class,
                        "attempt": error.attempts,
                        "finished_at": time.time(),
                        "host": host_name(),
                    }
                lease.check()
                ms.append_events([event])
                ms.maybe_compact(after_write=_compaction_hook(run))
                progress.shard_finished(
                    result["samples_written"] if error is None else 0,
                    len(result["clips_failed"]) if error is None else len(clips_by_shard[sh["shard_id"]]),
                )
                if (
                    run.fault.driver_exit_after_shards is not None
                    and done + failed >= run.fault.driver_exit_after_shards
                ):
                    os._exit(19)  # test hook: the driver dies between shards
        # A write attempt whose worker or node died mid-publish leaves its ``.tmp-`` file behind (the
        # retry publishes under a new one). Every shard of this run is settled now, so no attempt of
        # this driver is still writing, and no other driver writes while it holds the lease: remove
        # the leftovers, or ``verify`` would flag them in a complete build.
        if remove_stray_temporaries(store, lease):
            log.info("removed temporaries of write attempts that died mid-publish")
    lease.check()
    write_index(ms, plan, {name: ds.val_fraction for name, ds in run.datasets.items()})
    ms.compact(after_write=_compaction_hook(run))
    return BuildSummary(
        run.output,
        len(plan.shards),
        done,
        failed,
        skipped,
        written,
        clips_failed,
        time.time() - t0,
        failures,
        stats,
        failed_transient,
    )


def write_index(ms: ManifestStore, plan: Plan, val_fractions: dict[str, float] | None = None) -> None:
    """The training index: every written sample's key -> shard, the shard's sha256 and the sample's
    byte offset, from the ledger, with its scene and split (``train`` | ``val``, by scene:
    :mod:`pipeline.split`); :mod:`manifests.index_rows`."""
    ledger = ms.ledger(columns=LEDGER_COLUMNS)
    ms.write_index(index_rows(ledger, plan.clips, plan.shards, val_fractions or {}))


def resume(
    output: str, show_progress: bool = True, overrides: dict | None = None, full_check: bool = False
) -> BuildSummary:
    """Continue ``output`` with its recorded config; ``overrides`` apply to this run only."""
    return build(
        load_output_config(output), resume=True, show_progress=show_progress, overrides=overrides, full_check=full_check
    )
