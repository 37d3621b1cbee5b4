"""Metric depth (and metric poses) for one clip: what the align stage calls per clip.

``align_clip(clip, relative_depth, reference, options)``:

1. fits the relative prediction to the metric reference (:func:`fit_alignment`);
2. if the clip's poses are only up to scale (RealEstate10K), estimates their metric scale —
   from the reference's own trajectory when it has one (MegaSaM), falling back to the
   depth-based estimate when that trajectory is near-static; from the clip's sparse points
   (``clip.tracks`` in the dataset's world) or the depth reprojection search otherwise — and
   scales ``c2w`` (and ``tracks``) by it;
3. checks that the aligned depth and the (scaled) poses agree (:func:`check_consistency`);
4. returns a new :class:`Clip` with ``depth``, ``depth_valid``, ``meta.depth_source='aligned'`` and
   ``meta.qc['align']`` (see :func:`align_qc`, with ``keep``/``reason``).

Failures of the fit or of the pose scale raise :class:`AlignmentError` (a ClipError: the runner
records it against the clip). A clip that aligns but fails QC is returned with
``qc['align']['keep'] = False`` unless ``options.raise_on_drop``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.clip import Clip
from stages.align.consistency import check_consistency
from stages.align.fit import AlignmentError, FitOptions, fit_alignment
from stages.align.pose_scale import (
    PoseScaleResult,
    StaticTrajectoryError,
    apply_pose_scale,
    estimate_pose_scale,
    scale_from_depth,
)
from stages.align.qc import AlignQCThresholds, align_qc
from stages.align.references import MetricReference

UP_TO_SCALE_DATASETS = ("realestate10k", "re10k")


class AlignClipOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prediction_kind: Literal["disparity", "depth"] = "disparity"
    fit: FitOptions = Field(default_factory=FitOptions)
    # "auto": meta.extra["metric_poses"] if present, else up to scale for UP_TO_SCALE_DATASETS.
    poses: Literal["auto", "metric", "up_to_scale"] = "auto"
    # "auto": reference trajectory if the reference has one (fallback: depth), else points/depth.
    pose_scale_method: Literal["auto", "trajectory", "depth"] = "auto"
    min_baseline_m: float = Field(0.05, gt=0)
    # A reference trajectory's scale is used only when its relative standard error is below this
    # (else: near-static, fall back to the depth-based scale).
    max_pose_scale_uncertainty: float = Field(0.03, gt=0)
    consistency: bool = True
    consistency_max_points: int = Field(2000, ge=10)
    thresholds: AlignQCThresholds = Field(default_factory=AlignQCThresholds)
    raise_on_drop: bool = False


def poses_up_to_scale(clip: Clip, options: AlignClipOptions) -> bool:
    if options.poses != "auto":
        return options.poses == "up_to_scale"
    if "metric_poses" in clip.meta.extra:
        return not bool(clip.meta.extra["metric_poses"])
    return clip.meta.dataset.lower() in UP_TO_SCALE_DATASETS


def _pose_scale(
    clip: Clip, depth, valid, reference: MetricReference, exclude, opts: AlignClipOptions
) -> PoseScaleResult:
    fallback_note = None
    if opts.pose_scale_method in ("auto", "trajectory") and reference.c2w is not None:
        try:
            return estimate_pose_scale(
                clip.c2w,
                reference.c2w,
                min_baseline_m=opts.min_baseline_m,
                max_scale_uncertainty=opts.max_pose_scale_uncertainty,
            )
        except StaticTrajectoryError as e:
            fallback_note = e.reason
    elif opts.pose_scale_method == "trajectory":
        raise AlignmentError("pose_scale_method='trajectory' needs a reference with poses (e.g. MegaSaM)")
    points = vis = None
    if clip.tracks is not None:
        points, vis = clip.tracks, clip.track_visible
    try:
        res = scale_from_depth(
            depth, valid, clip.intrinsics, clip.c2w, rgb=clip.rgb, points=points, points_visible=vis, exclude=exclude
        )
    except StaticTrajectoryError as e:
        raise StaticTrajectoryError(
            e.reason + (f" (reference trajectory: {fallback_note})" if fallback_note else "")
        ) from e
    if fallback_note:
        res.extra["fallback_from_trajectory"] = fallback_note
    return res


def align_clip(
    clip: Clip,
    relative_depth: np.ndarray,
    reference: MetricReference,
    options: AlignClipOptions | None = None,
    *,
    exclude: np.ndarray | None = None,
    prediction_valid: np.ndarray | None = None,
) -> Clip:
    """A new clip with metric depth aligned to ``reference`` (and metric poses); see module doc.

    ``relative_depth`` (T,H,W) is a relative disparity or depth (``options.prediction_kind``);
    ``exclude`` (T,H,W) marks sky / moving pixels kept out of the fit, the output and the
    static consistency check.
    """
    opts = options or AlignClipOptions()
    clip.validate()
    t, h, w = clip.rgb.shape[:3]
    pred = np.asarray(relative_depth)
    if pred.shape != (t, h, w):
        raise AlignmentError(f"relative depth {pred.shape} does not match the clip ({t},{h},{w})", clip.key)
    reference.check((t, h, w))
    if exclude is not None and np.shape(exclude) != (t, h, w):
        raise AlignmentError(f"exclude mask {np.shape(exclude)} does not match the clip ({t},{h},{w})", clip.key)

    fit = fit_alignment(
        pred,
        reference.depth,
        reference.valid,
        prediction_kind=opts.prediction_kind,
        prediction_valid=prediction_valid,
        exclude=exclude,
        weights=reference.weights,
        options=opts.fit,
    )

    c2w, tracks = clip.c2w, clip.tracks
    pose_res: PoseScaleResult | None = None
    if poses_up_to_scale(clip, opts):
        # Pixels whose aligned depth contradicts the reference (prediction outliers) stay out
        # of the depth-based pose scale.
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(fit.depth - reference.depth) / reference.depth
        agree = fit.valid & ~(reference.valid & ~(rel <= max(3.0 * fit.scatter, 0.05)))
        pose_res = _pose_scale(clip, fit.depth, agree, reference, exclude, opts)
        c2w = apply_pose_scale(clip.c2w, pose_res.scale)
        if tracks is not None:
            tracks = (tracks.astype(np.float64) * pose_res.scale).astype(clip.tracks.dtype)

    cons = None
    if opts.consistency and t > 1:
        th = opts.thresholds
        cons = check_consistency(
            fit.depth,
            fit.valid,
            clip.intrinsics,
            c2w,
            dynamic_mask=exclude,
            rgb=clip.rgb,
            max_depth_error=th.max_consistency_error,
            max_pixel_error=th.max_pixel_error,
            max_scale_factor=th.max_scale_factor,
            max_points=opts.consistency_max_points,
        )
    qc = align_qc(fit, pose_scale=pose_res, consistency=cons, thresholds=opts.thresholds)
    qc["reference"] = reference.kind
    if "focal_ratio" in reference.meta:
        qc["megasam_focal_ratio"] = float(reference.meta["focal_ratio"])
    qc["prediction_kind"] = opts.prediction_kind
    if pose_res is not None and pose_res.extra.get("fallback_from_trajectory"):
        qc["pose_scale_fallback"] = pose_res.extra["fallback_from_trajectory"]

    meta = copy.deepcopy(clip.meta)
    meta.depth_source = "aligned"
    meta.qc = {**meta.qc, "align": qc}
    if pose_res is not None:
        meta.extra = {**meta.extra, "metric_poses": True, "pose_scale": float(pose_res.scale)}
    out = dataclasses.replace(clip, meta=meta, depth=fit.depth, depth_valid=fit.valid, c2w=c2w, tracks=tracks)
    out.validate()
    if not qc["keep"] and opts.raise_on_drop:
        raise AlignmentError(f"alignment QC failed: {qc['reason']}", clip.key)
    return out
