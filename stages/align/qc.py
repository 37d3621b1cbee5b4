"""Per-clip QC of metric alignment: the numbers and a keep/drop decision with its reason."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from stages.align.consistency import ConsistencyResult
from stages.align.fit import AlignResult
from stages.align.pose_scale import PoseScaleResult


class AlignQCThresholds(BaseModel):
    """Keep a clip only if every check passes. Defaults are deliberately permissive for real data
    (metric references themselves err by 5-15 %); tighten them per dataset in the config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_inlier_ratio: float = Field(0.6, ge=0, le=1)  # share of fitted points within 3 sigma
    # Largest systematic relative error of the fit over prediction bins (AlignResult.residual);
    # the reference's own noise averages out of it (a stereo reference's does not out of an RMS).
    max_residual: float = Field(0.15, ge=0)
    # Aligned vs reference, all common pixels, in the fit's noise space and beyond the reference's
    # own noise (AlignResult.excess_abs_rel): depth AbsRel against a stereo reference measures
    # mostly that reference's far-field noise.
    max_abs_rel: float = Field(0.25, ge=0)
    # Share of common pixels within 25 % of the reference or within its noise (noise_delta_1_25).
    min_delta_1_25: float = Field(0.7, ge=0, le=1)
    # Correlation of the fitted values with the reference (inliers): the noise-aware checks trust
    # the fit's own sigma, which an unrelated prediction inflates to the reference's whole spread.
    min_correlation: float = Field(0.5, ge=-1, le=1)
    min_points: int = Field(64, ge=1)  # fitted points
    min_valid_ratio: float = Field(0.5, ge=0, le=1)  # aligned-valid / prediction-valid pixels
    max_consistency_error: float = Field(0.05, ge=0)  # median relative depth reprojection error
    max_pixel_error: float = Field(2.0, ge=0)  # median round-trip reprojection error, pixels
    max_scale_factor: float = Field(1.1, ge=1)  # poses vs depth: best translation multiplier
    max_pose_scale_residual: float = Field(0.2, ge=0)  # relative residual of the pose-scale fit
    min_pose_scale: float = Field(1e-4, gt=0)  # plausibility of the pose scale itself
    max_pose_scale: float = Field(1e4, gt=0)


def _f(v):
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [float(x) for x in v]
    try:
        return float(v)
    except TypeError:
        return [float(x) for x in v]


def align_qc(
    result: AlignResult,
    *,
    pose_scale: PoseScaleResult | float | None = None,
    consistency: ConsistencyResult | None = None,
    thresholds: AlignQCThresholds | None = None,
) -> dict:
    """The per-clip QC dict (JSON-serialisable) with ``keep`` and ``reason`` (None when kept).

    Keys: scale, shift, inlier_ratio, residual, scatter, abs_rel, delta_1_25, n_points, valid_ratio,
    pose_scale, pose_scale_method, pose_scale_residual, consistency_error, pixel_error,
    consistency_scale_factor, keep, reason, reasons.
    """
    th = thresholds or AlignQCThresholds()
    s = result.summary()
    qc = {
        k: s[k]
        for k in (
            "scale",
            "shift",
            "space",
            "per_frame",
            "inlier_ratio",
            "residual",
            "scatter",
            "abs_rel",
            "noise_abs_rel",
            "excess_abs_rel",
            "noise_delta_1_25",
            "correlation",
            "delta_1_25",
            "n_points",
            "valid_ratio",
            "far_limit_m",
            "far_field_ratio",
        )
    }
    reasons: list[str] = []

    def check(bad: bool, text: str):
        if bad:
            reasons.append(text)

    check(qc["n_points"] < th.min_points, f"n_points {qc['n_points']} < {th.min_points}")
    check(
        not qc["inlier_ratio"] >= th.min_inlier_ratio, f"inlier_ratio {qc['inlier_ratio']:.3f} < {th.min_inlier_ratio}"
    )
    check(not qc["residual"] <= th.max_residual, f"residual {qc['residual']:.3f} > {th.max_residual}")
    check(
        not qc["excess_abs_rel"] <= th.max_abs_rel,
        f"abs_rel beyond the reference's noise {qc['excess_abs_rel']:.3f} > {th.max_abs_rel}",
    )
    check(
        not qc["noise_delta_1_25"] >= th.min_delta_1_25,
        f"delta_1_25 (or within the reference's noise) {qc['noise_delta_1_25']:.3f} < {th.min_delta_1_25}",
    )
    check(
        not qc["correlation"] >= th.min_correlation,
        f"prediction explains little of the reference: correlation {qc['correlation']:.2f} < {th.min_correlation}",
    )
    check(not qc["valid_ratio"] >= th.min_valid_ratio, f"valid_ratio {qc['valid_ratio']:.3f} < {th.min_valid_ratio}")

    qc.update(pose_scale=None, pose_scale_method=None, pose_scale_residual=None)
    if isinstance(pose_scale, PoseScaleResult):
        qc.update(
            pose_scale=float(pose_scale.scale),
            pose_scale_method=pose_scale.method,
            pose_scale_residual=float(pose_scale.residual),
        )
        if pose_scale.method in ("trajectory", "umeyama", "orientation+lsq", "points"):
            # The reprojection method's residual is a cost, not a relative error; the consistency
            # check covers it.
            check(
                not pose_scale.residual <= th.max_pose_scale_residual,
                f"pose scale residual {pose_scale.residual:.3f} > {th.max_pose_scale_residual}",
            )
    elif pose_scale is not None:
        qc.update(pose_scale=float(pose_scale), pose_scale_method="given")
    if qc["pose_scale"] is not None:
        ps = qc["pose_scale"]
        check(
            not (th.min_pose_scale <= ps <= th.max_pose_scale),
            f"pose scale {ps:.3g} outside [{th.min_pose_scale}, {th.max_pose_scale}]",
        )

    qc.update(consistency_error=None, pixel_error=None, consistency_scale_factor=None)
    if consistency is not None:
        qc.update(
            consistency_error=_f(consistency.depth_error),
            pixel_error=_f(consistency.pixel_error),
            consistency_scale_factor=_f(consistency.scale_factor),
            track_depth_error=_f(consistency.track_depth_error),
            track_drift_m=_f(consistency.track_drift_m),
        )
        ce, pe, k = consistency.depth_error, consistency.pixel_error, consistency.scale_factor
        if consistency.n_points == 0 or math.isnan(ce):
            reasons.append("consistency: no reprojected point landed on valid depth")
        else:
            check(ce > th.max_consistency_error, f"consistency_error {ce:.3f} > {th.max_consistency_error}")
            check(pe > th.max_pixel_error, f"pixel_error {pe:.2f} > {th.max_pixel_error}")
        if k is not None:
            check(
                max(k, 1 / k) > th.max_scale_factor,
                f"poses and depth disagree in scale: translations fit best x{k:.3f}",
            )
    qc["keep"] = not reasons
    qc["reason"] = "; ".join(reasons) if reasons else None
    qc["reasons"] = reasons
    return qc
