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


def depth_limits(cfg: BuildConfig, dataset: str) -> tuple[float, float]:
    """The dataset's (min_depth_m, max_depth_m): its config, else its adapter's defaults."""
    from stages.ingest import adapter_class

    ds = cfg.datasets[dataset]
    d = adapter_class(dataset).defaults
    lo = ds.min_depth_m if ds.min_depth_m is not None else d.min_depth_m
    hi = ds.max_depth_m if ds.max_depth_m is not None else d.max_depth_m
    return float(lo), float(hi)


def reference_for(clip: Clip, cfg: BuildConfig) -> MetricReference:
    src = cfg.datasets[clip.meta.dataset].depth_source
    t, h, w = clip.rgb.shape[:3]
    # The maximum depth is applied by the fit (options_for), through the prediction: cutting a
    # noisy reference on its own values would select its errors (stages/align/fit.py).
    lo, hi = depth_limits(cfg, clip.meta.dataset)
    if src == "megasam":
        out = _megasam_runner(cfg).run(clip.key, clip.rgb)
        return reference_from_megasam(out, h, w, expected_frames=t, min_depth=lo, clip_intrinsics=clip.intrinsics)
    if src == "sparse":
        if clip.tracks is None:
            raise AlignmentError("depth_source 'sparse' needs the dataset's metric 3D tracks; this clip has none", clip.key)
        return reference_from_tracks(clip.tracks, clip.intrinsics, clip.c2w, h, w, visible=clip.track_visible,
                                     min_depth=lo)
    if src == "vda_metric":
        if clip.aux.get("relative_kind") != "metric_depth":
            raise ConfigError("depth_source 'vda_metric' needs stages.depth.metric: true")
        return reference_from_metric_depth(clip.aux["relative_depth"], min_depth=lo, max_depth=min(hi, 80.0))
    raise ConfigError(f"dataset {clip.meta.dataset}: depth_source {src!r} has no alignment reference")


def options_for(cfg: BuildConfig, relative_kind: str, *, dataset: str | None = None) -> AlignClipOptions:
    """Fit options from the config; with ``dataset`` its depth limits bound the fit and output."""
    a = cfg.stages.align
    space = "depth" if a.model == "depth_affine" else "disparity"
    limits = {} if dataset is None else dict(zip(("min_depth", "max_depth"), depth_limits(cfg, dataset)))
    fit = FitOptions(space=space, per_frame=a.per_frame, scale_only=a.model == "scale_only", robust=a.robust,
                     **limits)
    return AlignClipOptions(prediction_kind="depth" if relative_kind == "metric_depth" else "disparity", fit=fit,
                            thresholds=a.thresholds)


def align_for_pipeline(clip: Clip, cfg: BuildConfig) -> Clip:
    ref = reference_for(clip, cfg)
    opts = options_for(cfg, clip.aux.get("relative_kind", "disparity"), dataset=clip.meta.dataset)
    out = align_clip(clip, clip.aux["relative_depth"], ref, opts)
    qc = out.meta.qc.get("align", {})
    if not qc.get("keep", True) and cfg.stages.align.drop_on_qc:
        raise AlignmentError(f"align QC: {qc.get('reason')}", clip.key)
    return out
