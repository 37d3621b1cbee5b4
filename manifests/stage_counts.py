"""Per-stage counters of one shard, recorded in its ``done`` ledger event (column ``stage_counts``).

For every stage a shard's clips pass through (in order: ``pipeline.plan.stages_for``), how many
clips came in, how many went on, how many were dropped and why (reason categories of
:func:`manifests.clip_qc.failure_categories`), and the seconds spent on the written clips. A
stage reports what it did through what it returns: a clip that goes on carries its seconds
per stage (``Clip.aux['timings']``), a dropped one is a ``ClipFailure`` naming the stage and the
reason. The write stage, which receives all of them, folds them into these counters, so
``d4s status`` and ``d4s report`` only add them up.
"""

from __future__ import annotations

from manifests.clip_qc import failure_categories


def stage_counts(order: list[str], n_clips: int, failures: list[dict], seconds: dict[str, float]) -> dict[str, dict]:
    """``{stage: {"in", "out", "dropped_by_reason": {category: clips}, "seconds"}}`` for ``n_clips``
    clips passing ``order``, of which ``failures`` (``ClipFailure.to_json()`` dicts) were dropped
    (``in - out`` clips; one clip failing several QC checks counts under each). A failure at a stage
    outside ``order`` counts at the last stage (where it was found)."""
    out = {s: {"in": 0, "out": 0, "dropped_by_reason": {}, "seconds": float(seconds.get(s, 0.0))} for s in order}
    at_stage = [0] * len(order)
    for f in failures:
        at = order.index(f["stage"]) if f["stage"] in order else len(order) - 1
        at_stage[at] += 1
        dropped = out[order[at]]["dropped_by_reason"]
        for cat in failure_categories(f["stage"], f.get("reason") or "", f.get("clip_id")):
            dropped[cat] = dropped.get(cat, 0) + 1
    alive = n_clips
    for s, lost in zip(order, at_stage):
        out[s]["in"], out[s]["out"] = alive, alive - lost
        alive -= lost
    return out
