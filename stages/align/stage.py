"""Align stage: make the depth stage's relative prediction metric (docs/ALIGNMENT.md)."""
from __future__ import annotations

from pipeline.clip import Clip, ClipFailure
from pipeline.config import BuildConfig
from stages.contract import StageContract

CONTRACT = StageContract(
    name="align",
    inputs=("aux.relative_depth", "c2w", "intrinsics", "reference: gt | megasam | vda_metric | sparse tracks"),
    outputs=("depth", "depth_valid", "c2w (rescaled where poses are up to scale)", "meta.qc.align"),
    runs_as="task (CPU; MegaSaM runs as an external command)",
    acts_when="the clip carries a relative depth prediction",
    errors="degenerate fit, QC thresholds, MegaSaM failure/timeout",
)


def align(clip, cfg: BuildConfig):
    if isinstance(clip, ClipFailure) or "relative_depth" not in clip.aux:
        return clip
    from stages.align.pipeline_stage import align_for_pipeline

    try:
        out = align_for_pipeline(clip, cfg)
        out.aux.pop("relative_depth", None)
        return out.validate()
    except Exception as exc:
        return ClipFailure.from_exception(clip.key, "align", exc)
