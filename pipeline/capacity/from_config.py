"""``d4s plan CONFIG``: the capacity of a build of this config, from its plan and a probe of its data.

The counts are exactly what ``d4s build`` would plan (:func:`pipeline.plan.make_plan`); the first
planned clip of every dataset is read to learn its image size and ground-truth track count.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.capacity.costs import load_costs
from pipeline.capacity.rows import assemble_report, dataset_row, pass_frames
from pipeline.config import BuildConfig


def _probe(cfg: BuildConfig, plan, name: str, first: dict | None) -> tuple[tuple[int, int], int | None, str]:
    """Image size and ground-truth track count of the dataset's first planned clip (``first``)."""
    from pipeline.clip import ClipFailure
    from stages.ingest.stage import ingest_clip

    if first is None:
        return None, None, "no clip planned"
    spec = {**first, "ordinal": -1}  # -1: never matches a fault-injection ordinal
    try:
        clip = ingest_clip(spec, plan.scene_refs[(name, first["scene"])], cfg)
    except Exception as exc:  # a probe must never stop a capacity report
        return None, None, f"{type(exc).__name__}: {exc}"
    if isinstance(clip, ClipFailure):
        return None, None, f"{clip.reason}" + (f" ({clip.path})" if getattr(clip, "path", None) else "")
    n = int(clip.tracks.shape[1]) if clip.tracks is not None else 0
    return (int(clip.rgb.shape[1]), int(clip.rgb.shape[2])), n, f"read from {first['clip_id']}"


def capacity_report(cfg: BuildConfig, costs: str | Path | dict | None = None, probe: bool = True) -> dict:
    """Scenes, clips, frames, projected output bytes, GPU-hours per model stage and CPU core-hours.

    Counts come from :func:`pipeline.plan.make_plan` (the same plan ``d4s build`` records). With
    ``probe`` the first planned clip of each dataset is read to learn its image size and its
    ground-truth track count; otherwise (or when that read fails) the nominal figures of the costs
    file are used and the report says so. The result is plain JSON-serialisable data.
    """
    from pipeline.deps import build_needs, check
    from pipeline.plan import make_plan

    c = load_costs(costs)
    rcfg = cfg.resolved()
    check(build_needs(rcfg), "d4s plan")  # what the planned build will need, before reading any data
    plan = make_plan(rcfg)
    rows, notes = [], []
    # one pass over the plan (it has a row per clip: ~10^6 at full scale), not one per dataset
    n_scenes = Counter(s["dataset"] for s in plan.scenes)
    n_clips = Counter(x["dataset"] for x in plan.clips)
    n_shards = Counter(s["dataset"] for s in plan.shards)
    first_clip: dict[str, dict] = {}
    scene_clips: dict[str, dict[str, list]] = {}
    for x in plan.clips:
        first_clip.setdefault(x["dataset"], x)
        scene_clips.setdefault(x["dataset"], {}).setdefault(x["scene"], []).append(x["frames"])
    for name in sorted(d for d, ds in rcfg.datasets.items() if ds.enabled):
        scenes, clips, shards = n_scenes[name], n_clips[name], n_shards[name]
        hw = n_gt = None
        why = "probe disabled"
        if probe:
            hw, n_gt, why = _probe(rcfg, plan, name, first_clip.get(name))
        if hw is None:
            nhw, nn, src = c.nominal(name)
            hw, n_gt, source = nhw, nn, f"nominal ({why})"
            notes.append(
                f"{name}: image size {nhw[1]}x{nhw[0]} and {nn} ground-truth tracks per clip taken from the "
                f"costs file ({src or 'nominal release figures'}) because the data was not read: {why}"
            )
        else:
            source = why
        rows.append(
            dataset_row(
                name,
                rcfg,
                c,
                scenes=scenes,
                clips=clips,
                shards=shards,
                image_hw=hw,
                gt_tracks=n_gt or 0,
                hw_source=source,
                passes=pass_frames(rcfg, name, list(scene_clips.get(name, {}).values())),
            )
        )
    return assemble_report(rcfg, c, rows, notes, mode="plan")
