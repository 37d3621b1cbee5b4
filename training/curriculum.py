"""Curriculum: which stage a global step is in, and what each stage trains.

Stages come from the config (``TrainConfig.stages``), each with its step count, resolution, frame
count, scene filter (static / dynamic / any), dataset mixture, frozen parts and active losses.
Diff4Splat's recipe (preset ``full``): 1) static scenes at 256², deformation frozen, FM + photo + geo
(40k steps); 2) the same at 512² (40k); 3) everything unfrozen on dynamic data with every loss (20k).
The trainer applies a stage's freezing with :meth:`training.model.Diff4Splat.apply_stage`, rebuilds the
DDP wrapper and the data stream at each stage boundary, and checkpoints at the end of every stage.
"""

from __future__ import annotations

from training.config import StageConfig, TrainConfig


def stage_position(cfg: TrainConfig, step: int) -> tuple[int, int]:
    """Global step (optimiser steps done) -> (stage index, steps done in that stage).

    Returns ``(len(stages), 0)`` when the curriculum is complete.
    """
    acc = 0
    for i, s in enumerate(cfg.stages):
        if step < acc + s.steps:
            return i, step - acc
        acc += s.steps
    return len(cfg.stages), 0


def describe(stage: StageConfig) -> str:
    return (
        f"'{stage.name}': {stage.steps} steps, {stage.resolution}px, {stage.num_frames} frames, "
        f"scenes={stage.scenes}, losses={stage.losses}, frozen={stage.frozen or 'none'}, "
        f"mixture={stage.mixture or 'by size'}"
    )
