"""``d4s status``: where a build stands, read from the manifests alone (never from shards).

Read-only by construction: the ledger is read once per command (``d4s report`` passes the events
it read), and nothing here imports Ray. Per dataset and stage: clips done / failed / skipped
(the counters the write stage recorded, manifests/stage_counts.py) and pending. Throughput of
the latest build and the ETA of what is left. QC distributions (alignment scale, inliers,
residual, AbsRel, pose scale, consistency, depth range, static-track drift, ground-truth
self-check agreement, ground-truth track filters) per dataset from the ledger's per-sample
records, and drops counted per dataset and reason category.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from manifests.lease import lease_status
from manifests.stage_counts import stage_counts
from manifests.store import ManifestStore, current_states
from pipeline.storage import Store

# (label, path into a clip_qc record) of the distributions shown per dataset.
QC_METRICS = (
    ("depth median (m)", ("depth_median_m",)),
    ("align scale", ("align", "scale")),
    ("align inlier ratio", ("align", "inlier_ratio")),
    ("align residual", ("align", "residual")),
    ("align AbsRel", ("align", "abs_rel")),
    ("align delta<1.25", ("align", "delta_1_25")),
    ("pose scale", ("align", "pose_scale")),
    ("consistency error", ("align", "consistency_error")),
    ("static tracks kept", ("tracks", "kept_fraction")),
    ("GT self-check agreement", ("selfcheck", "agreement")),
    ("GT self-check overlap", ("selfcheck", "overlap")),
    ("GT tracks: jumps dropped", ("gt_tracks", "dropped_jumps")),
    ("GT points: off-image", ("gt_tracks", "hidden_off_image")),
)


def _get(rec: dict, path: tuple[str, ...]):
    for p in path:
        if not isinstance(rec, dict) or rec.get(p) is None:
            return None
        rec = rec[p]
    return rec if isinstance(rec, (int, float)) and not isinstance(rec, bool) and math.isfinite(rec) else None


def qc_distributions(records: list[dict]) -> dict[str, dict[str, dict]]:
    """{dataset: {metric: {n, p5, p50, p95}}} over the per-sample QC records."""
    by_ds: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_ds[r.get("dataset", "?")].append(r)
    out: dict[str, dict[str, dict]] = {}
    for ds, recs in sorted(by_ds.items()):
        rows = {}
        for label, path in QC_METRICS:
            vals = np.array([v for v in (_get(r, path) for r in recs) if v is not None], dtype=np.float64)
            if vals.size:
                p5, p50, p95 = np.percentile(vals, [5, 50, 95])
                rows[label] = {"n": int(vals.size), "p5": float(p5), "p50": float(p50), "p95": float(p95)}
        flagged = sum(1 for r in recs if isinstance(r.get("align"), dict) and r["align"].get("keep") is False)
        if flagged:
            rows["kept despite failed align QC"] = {"n": flagged}
        out[ds] = rows
    return out


def build_window(evs: list[dict]) -> tuple[float | None, float | None, int]:
    """(start, end, clips) of one build's ledger events: the first submission, the last finished
    shard (done or failed) and the clips its done shards settled. The one definition of a build's
    throughput, shared by ``d4s status`` and ``d4s report``."""
    starts = [e["started_at"] for e in evs if e["state"] == "running" and e.get("started_at")]
    ends = [e["finished_at"] for e in evs if e["state"] in ("done", "failed") and e.get("finished_at")]
    clips = sum(
        (e.get("samples_written") or 0) + len(e.get("clips_failed") or [])
        for e in evs
        if e["state"] == "done" and e.get("finished_at")
    )
    return (min(starts) if starts else None), (max(ends) if ends else None), clips


def _throughput(events: list[dict], clips_left: int, driving: bool = True) -> dict:
    """Clips per second of the latest build (first submission to last finished shard) and ETA.
    ``driving``: a driver holds the output now; without one, clips left are not being built:
    ``stopped`` (with ``clips_left``) and no ETA (`d4s resume` continues)."""
    stopped = bool(clips_left) and not driving
    builds = [e["build_id"] for e in events if e.get("build_id")]
    if not builds:
        return {"build_id": None, "clips": 0, "seconds": 0.0, "clips_per_s": None, "eta_s": None, "stopped": stopped}
    latest = builds[-1]
    start, end, clips = build_window([e for e in events if e.get("build_id") == latest])
    base = {"build_id": latest, "clips": clips, "stopped": stopped, "clips_left": clips_left}
    if start is None or end is None:
        return {**base, "seconds": 0.0, "clips_per_s": None, "eta_s": None}
    secs = end - start
    rate = clips / secs if secs > 0 else None
    eta = (clips_left / rate) if rate and not stopped else None
    return {**base, "seconds": round(secs, 3), "clips_per_s": rate, "eta_s": 0.0 if clips_left == 0 else eta}


def _counters(ev: dict, order: list[str], num_clips: int) -> dict[str, dict]:
    """A done event's per-stage counters; events written before they were recorded get them
    computed from the same fields by the same function the write stage uses."""
    if ev.get("stage_counts"):
        return ev["stage_counts"]
    return stage_counts(order, num_clips, ev.get("clips_failed") or [], ev.get("timings") or {})


def collect_status(output: str, events: list[dict] | None = None) -> dict:
    """Everything ``d4s status`` shows, from the manifests alone. ``events``: the ledger's events
    when the caller has read them already (``d4s report``), so the ledger is read once."""
    from pipeline.config import load_output_config
    from pipeline.plan import stages_for

    store = Store(output)
    ms = ManifestStore(store)
    if not ms.has_plan():
        raise FileNotFoundError(f"{output}: no plan recorded (run `d4s build` first)")
    cfg = load_output_config(output)
    events = ms.ledger_events() if events is None else events
    ledger = current_states(events)
    datasets: dict[str, Counter] = defaultdict(Counter)
    stages: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    shards = Counter()
    failures, qc_records = [], []
    drops: dict[str, Counter] = defaultdict(Counter)
    timings = Counter()
    # a shard is running while the build that marked it so holds the output's lease (queued or at
    # work in that build); one left "running" by a dead driver is pending work for `d4s resume`
    lease = lease_status(store)  # the driver that holds (or last held) the output: read once
    live = lease["owner"] if lease and not lease["released"] and not lease["stale"] else None
    for sh in ms.shards():
        ds_name = sh["dataset"]
        order = stages_for(cfg, ds_name) if ds_name in cfg.datasets else ["ingest", "encode", "write"]
        ev = ledger.get(sh["shard_id"])
        state = ev["state"] if ev else "pending"
        if state == "running" and (live is None or ev.get("build_id") != live):
            state = "pending"
        shards[state] += 1
        ds = datasets[ds_name]
        st = stages[ds_name]
        if state == "done":
            n_failed = len(ev["clips_failed"])
            ds["clips_done"] += sh["num_clips"] - n_failed
            ds["clips_failed"] += n_failed
            for name, c in _counters(ev, order, sh["num_clips"]).items():
                st[name]["done"] += c["out"]
                st[name]["failed"] += c["in"] - c["out"]
                st[name]["skipped"] += sh["num_clips"] - c["in"]
                drops[ds_name].update(c["dropped_by_reason"])
                timings[name] += c["seconds"]
            # clips recorded inside a done shard are permanent (bad input): a transient clip failure
            # keeps its shard from being published (pipeline/failures.py)
            failures.extend(
                {**f, "dataset": ds_name, "shard_id": sh["shard_id"], "class": "permanent"} for f in ev["clips_failed"]
            )
            qc_records.extend({**r, "dataset": r.get("dataset", ds_name)} for r in ev.get("clip_qc") or [])
        else:
            ds["clips_pending"] += sh["num_clips"]
            for name in order:
                st[name]["pending"] += sh["num_clips"]
            if state == "failed":
                failures.append(
                    {
                        "clip_id": None,
                        "stage": "shard",
                        "reason": ev["error"],
                        "path": None,
                        "dataset": ds_name,
                        "shard_id": sh["shard_id"],
                        "class": ev.get("error_class") or "permanent",
                    }
                )
    clips_left = sum(c["clips_pending"] for c in datasets.values())
    no_clips = _datasets_without_clips(ms, set(datasets))
    for d in no_clips:
        datasets.setdefault(d, Counter())  # listed with zero counts: planned, but no scene gave a clip
    return {
        "output": output,
        "datasets": {
            d: {k: int(c.get(k, 0)) for k in ("clips_done", "clips_failed", "clips_pending")}
            for d, c in sorted(datasets.items())
        },
        "stages": {
            d: {
                name: {k: int(c.get(k, 0)) for k in ("done", "failed", "pending", "skipped")} for name, c in per.items()
            }
            for d, per in sorted(stages.items())
        },
        "shards": {k: int(shards.get(k, 0)) for k in ("done", "failed", "running", "pending")},
        "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
        "throughput": _throughput(events, clips_left, driving=live is not None),
        "qc": qc_distributions(qc_records),
        "drops": {d: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for d, c in sorted(drops.items())},
        "failures": failures,
        # transient: shards left failed by a lost worker/node, OOM or timeout, rebuilt by `d4s resume`;
        # permanent: clips of bad input (and shards failing for a non-transient reason), recorded once
        "failure_classes": {c: sum(f["class"] == c for f in failures) for c in ("transient", "permanent")},
        "lease": lease,
        "no_clips": no_clips,  # dataset -> why none of its scenes gave a clip (scenes.parquet notes)
    }


def _datasets_without_clips(ms: ManifestStore, with_shards: set[str]) -> dict[str, str]:
    """Datasets that were planned (their scenes are in scenes.parquet) but hold no shard: each with
    its scenes' notes, most frequent first (e.g. "2 scenes gave no clip: only 10 frames, ...")."""
    notes: dict[str, Counter] = defaultdict(Counter)
    for sc in ms.scenes():
        if sc["dataset"] not in with_shards:
            notes[sc["dataset"]][sc.get("note") or "no clip planned"] += 1
    out = {}
    for d, c in sorted(notes.items()):
        n = sum(c.values())
        out[d] = f"{n} scene{'s' if n != 1 else ''} gave no clip: " + "; ".join(k for k, _ in c.most_common(3))
    return out
