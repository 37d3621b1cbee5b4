"""Glue between the build config and :func:`align_clip`: pick the metric reference per dataset.

``depth_source`` of the clip's dataset decides the reference:

* ``megasam``: run the configured MegaSaM command on the clip's frames (cached by clip id);
* ``sparse``: the clip's own metric 3D tracks projected into each frame (Stereo4D);
* ``vda_metric``: the metric Video Depth Anything prediction itself;
* ``gt``: never reaches here (the clip already has depth).
"""
from __future__ import annotations

import os
import tempfile

from pipeline.clip import Clip
from pipeline.config import BuildConfig, ConfigError
from stages.align.align_clip import AlignClipOptions, align_clip
from stages.align.fit import AlignmentError, FitOptions
from stages.align.references import (MetricReference, reference_from_megasam, reference_from_metric_depth,
                                     reference_from_tracks)

_RUNNERS: dict = {}


def _megasam_runner(cfg: BuildConfig):
    from stages.align.megasam import MegaSaMRunner

    a = cfg.stages.align
    if not a.megasam_command:
        raise ConfigError("stages.align.megasam_command is not set (docs/ALIGNMENT.md)")
    cache = a.cache_dir
    if cache is None:
        out = cfg.output
        local = "://" not in out or out.startswith("file://")
        cache = os.path.join(out.removeprefix("file://"), "cache", "megasam") if local else os.path.join(
            tempfile.gettempdir(), "d4s-megasam-cache")
    key = (a.megasam_command, cache)
    if key not in _RUNNERS:
        _RUNNERS[key] = MegaSaMRunner(a.megasam_command, cache, timeout_s=a.megasam_timeout_s, retries=a.megasam_retries)
    return _RUNNERS[key]


def reference_for(clip: Clip, cfg: BuildConfig) -> MetricReference:
    src = cfg.datasets[clip.meta.dataset].depth_source
    t, h, w = clip.rgb.shape[:3]
    if src == "megasam":
        out = _megasam_runner(cfg).run(clip.key, clip.rgb)
        return reference_from_megasam(out, h, w, expected_frames=t)
    if src == "sparse":
        if clip.tracks is None:
            raise AlignmentError("depth_source 'sparse' needs the dataset's metric 3D tracks; this clip has none", clip.key)
        return reference_from_tracks(clip.tracks, clip.intrinsics, clip.c2w, h, w, visible=clip.track_visible)
    if src == "vda_metric":
        if clip.aux.get("relative_kind") != "metric_depth":
            raise ConfigError("depth_source 'vda_metric' needs stages.depth.metric: true")
        return reference_from_metric_depth(clip.aux["relative_depth"])
    raise ConfigError(f"dataset {clip.meta.dataset}: depth_source {src!r} has no alignment reference")


def options_for(cfg: BuildConfig, relative_kind: str) -> AlignClipOptions:
    a = cfg.stages.align
    space = "depth" if a.model == "depth_affine" else "disparity"
    fit = FitOptions(space=space, per_frame=a.per_frame, scale_only=a.model == "scale_only", robust=a.robust)
    return AlignClipOptions(prediction_kind="depth" if relative_kind == "metric_depth" else "disparity", fit=fit,
                            thresholds=a.thresholds)


def align_for_pipeline(clip: Clip, cfg: BuildConfig) -> Clip:
    ref = reference_for(clip, cfg)
    out = align_clip(clip, clip.aux["relative_depth"], ref, options_for(cfg, clip.aux.get("relative_kind", "disparity")))
    qc = out.meta.qc.get("align", {})
    if not qc.get("keep", True) and cfg.stages.align.drop_on_qc:
        raise AlignmentError(f"align QC: {qc.get('reason')}", clip.key)
    return out
