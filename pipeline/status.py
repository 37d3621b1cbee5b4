"""``d4s status``: counts per dataset and state, shard states, failures with reasons."""
from __future__ import annotations

from collections import Counter, defaultdict

from manifests.store import ManifestStore
from pipeline.storage import Store


def collect_status(output: str) -> dict:
    ms = ManifestStore(Store(output))
    if not ms.has_plan():
        raise FileNotFoundError(f"{output}: no plan recorded (run `d4s build` first)")
    ledger = ms.ledger()
    datasets: dict[str, Counter] = defaultdict(Counter)
    shards = Counter()
    failures = []
    for sh in ms.shards():
        ev = ledger.get(sh["shard_id"])
        state = ev["state"] if ev else "pending"
        # a shard left "running" by a dead driver is pending work
        shards["pending" if state == "running" else state] += 1
        ds = datasets[sh["dataset"]]
        if state == "done":
            failed = {f["clip_id"] for f in ev["clips_failed"]}
            ds["clips_done"] += sh["num_clips"] - len(failed)
            ds["clips_failed"] += len(failed)
            failures.extend({**f, "dataset": sh["dataset"], "shard_id": sh["shard_id"]} for f in ev["clips_failed"])
        else:
            ds["clips_pending"] += sh["num_clips"]
            if state == "failed":
                failures.append({"clip_id": None, "stage": "shard", "reason": ev["error"], "path": None,
                                 "dataset": sh["dataset"], "shard_id": sh["shard_id"]})
    timings = Counter()
    for ev in ledger.values():
        if ev["state"] == "done":
            for k, v in (ev.get("timings") or {}).items():
                timings[k] += v
    return {
        "output": output,
        "datasets": {d: {k: int(c.get(k, 0)) for k in ("clips_done", "clips_failed", "clips_pending")}
                     for d, c in sorted(datasets.items())},
        "shards": {k: int(shards.get(k, 0)) for k in ("done", "failed", "pending")},
        "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
        "failures": failures,
    }
