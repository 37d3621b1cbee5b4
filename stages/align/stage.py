"""Align stage: make the depth stage's relative prediction metric, one fit per scene (docs/ALIGNMENT.md)."""

from __future__ import annotations

from pipeline.config import BuildConfig
from stages.contract import StageContract

CONTRACT = StageContract(
    name="align",
    inputs=(
        "aux.relative_depth (all clips of a scene)",
        "c2w",
        "intrinsics",
        "reference: megasam, vda_metric or sparse tracks",
    ),
    outputs=("depth", "depth_valid", "c2w (rescaled where poses are up to scale)", "meta.qc.align (clip and scene)"),
    runs_as="task (CPU), one per scene (or per clip)",
    acts_when="the clip carries a relative depth prediction",
    errors="degenerate scene fit (fails the scene's clips), scene or clip QC thresholds",
)


def align(clips: list, cfg: BuildConfig, megasam=None) -> list:
    """The clips of one pass (a scene, or one clip), aligned; failures pass through."""
    from stages.align.pipeline_stage import align_group

    return align_group(clips, cfg, megasam)
