"""Metric references a relative depth prediction is aligned to.

A :class:`MetricReference` is a (possibly sparse) metric depth map per frame with a validity
mask, optionally with the reference's own metric camera poses (MegaSaM), which the pose-scale
step uses. Builders:

* :func:`reference_from_gt` — synthetic ground truth (for measurement; synthetic clips keep GT);
* :func:`reference_from_metric_depth` — a dense metric prediction, e.g. metric Video Depth Anything;
* :func:`reference_from_tracks` — sparse metric 3D points (Stereo4D world tracks (T,N,3), NaN
  where untracked) projected into each frame with the clip's metric intrinsics and c2w;
* :func:`reference_from_megasam` — a MegaSaM npz (depth resized to the clip's size, poses kept).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pipeline import geometry as geo
from stages.align.fit import AlignmentError
from stages.align.megasam import MegaSaMOutput, load_megasam_npz

REFERENCE_KINDS = ("gt", "vda_metric", "tracks", "megasam", "metric")


@dataclass
class MetricReference:
    """Metric depth (T,H,W) float32 metres, valid where ``valid``; optional metric poses.

    ``c2w``/``intrinsics`` are the reference's own cameras when it has them (MegaSaM): their
    world frame is unrelated to the clip's, only its scale is metric. ``weights`` are optional
    per-pixel confidences for the fit.
    """

    depth: np.ndarray
    valid: np.ndarray
    kind: str
    c2w: np.ndarray | None = None
    intrinsics: np.ndarray | None = None
    weights: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def sparse(self) -> bool:
        return bool(self.valid.mean() < 0.2)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.depth.shape)  # type: ignore[return-value]

    def check(self, shape: tuple[int, int, int]) -> "MetricReference":
        if self.kind not in REFERENCE_KINDS:
            raise AlignmentError(f"unknown reference kind {self.kind!r}")
        if tuple(self.depth.shape) != tuple(shape) or self.valid.shape != self.depth.shape:
            raise AlignmentError(
                f"{self.kind} reference depth {self.depth.shape} / valid {self.valid.shape} "
                f"does not match the clip {tuple(shape)}"
            )
        if self.c2w is not None and self.c2w.shape != (shape[0], 4, 4):
            raise AlignmentError(f"{self.kind} reference poses {self.c2w.shape} do not match {shape[0]} frames")
        return self


def _clean(depth: np.ndarray, valid: np.ndarray | None, min_depth: float, max_depth: float):
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim != 3:
        raise AlignmentError(f"reference depth must be (T,H,W), got {d.shape}")
    ok = np.isfinite(d) & (d > min_depth) & (d <= max_depth)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != d.shape:
            raise AlignmentError(f"reference mask {valid.shape} does not match depth {d.shape}")
        ok &= valid
    return np.where(ok, d, 0.0).astype(np.float32), ok


def reference_from_gt(
    depth: np.ndarray, valid: np.ndarray | None = None, *, min_depth: float = 1e-3, max_depth: float = 1e3
) -> MetricReference:
    """Ground-truth depth (synthetic data); values beyond ``max_depth`` (sky) are invalid."""
    d, ok = _clean(depth, valid, min_depth, max_depth)
    return MetricReference(depth=d, valid=ok, kind="gt")


def reference_from_metric_depth(
    depth: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    kind: str = "vda_metric",
    min_depth: float = 1e-3,
    max_depth: float = 80.0,
    confidence: np.ndarray | None = None,
) -> MetricReference:
    """A dense metric depth prediction (metric VDA). ``max_depth`` cuts sky/far, where metric
    predictors are least reliable."""
    d, ok = _clean(depth, valid, min_depth, max_depth)
    return MetricReference(depth=d, valid=ok, kind=kind, weights=confidence)


def reference_from_tracks(
    tracks: np.ndarray,
    intrinsics: np.ndarray,
    c2w: np.ndarray,
    height: int,
    width: int,
    *,
    visible: np.ndarray | None = None,
    min_depth: float = 1e-3,
    max_depth: float = 1e3,
) -> MetricReference:
    """Sparse metric depth from world points ``tracks`` (T,N,3) (NaN = untracked).

    Each frame's tracked points are projected with that frame's intrinsics and metric c2w; a
    point lands in pixel ``(i, j) = (floor(v), floor(u))`` (pixel centres at +0.5). Points
    behind the camera (z <= min_depth), outside the image, beyond ``max_depth``, non-finite or
    not ``visible`` are dropped; where several land in one pixel the nearest wins (z-buffer).
    """
    tr = np.asarray(tracks, dtype=np.float64)
    t = tr.shape[0]
    if tr.ndim != 3 or tr.shape[2] != 3:
        raise AlignmentError(f"tracks must be (T,N,3), got {tr.shape}")
    if np.shape(intrinsics) != (t, 4) or np.shape(c2w) != (t, 4, 4):
        raise AlignmentError(
            f"tracks need ({t},4) intrinsics and ({t},4,4) c2w, got {np.shape(intrinsics)} {np.shape(c2w)}"
        )
    depth = np.full((t, height, width), np.inf)
    n_proj = 0
    for f in range(t):
        pts = tr[f]
        ok = np.all(np.isfinite(pts), axis=-1)
        if visible is not None:
            ok &= np.asarray(visible[f], bool)
        if not np.any(ok):
            continue
        uv, z = geo.project(pts[ok], intrinsics[f], c2w[f])
        with np.errstate(invalid="ignore"):
            good = np.isfinite(z) & (z > min_depth) & (z <= max_depth) & np.all(np.isfinite(uv), axis=-1)
        uv, z = uv[good], z[good]
        j = np.floor(uv[:, 0]).astype(np.int64)
        i = np.floor(uv[:, 1]).astype(np.int64)
        inside = (i >= 0) & (i < height) & (j >= 0) & (j < width)
        i, j, z = i[inside], j[inside], z[inside]
        np.minimum.at(depth[f], (i, j), z)
        n_proj += int(z.size)
    valid = np.isfinite(depth)
    return MetricReference(
        depth=np.where(valid, depth, 0.0).astype(np.float32), valid=valid, kind="tracks", meta={"n_projected": n_proj}
    )


# MegaSaM's consistent-video-depth step writes ``np.clip(depth, 1e-3, 1e2)`` (cvd_opt/cvd_opt.py,
# the ``np.savez`` of ``*_sgd_cvd_hr.npz``): a depth at the ceiling is "100 m or farther" (sky, far
# field), not a measurement.
MEGASAM_DEPTH_CEILING_M = 100.0


def reference_from_megasam(
    source: str | os.PathLike | MegaSaMOutput,
    height: int,
    width: int,
    *,
    expected_frames: int | None = None,
    min_depth: float = 1e-3,
    max_depth: float = 1e3,
    saturation_m: float | None = MEGASAM_DEPTH_CEILING_M,
    clip_intrinsics: np.ndarray | None = None,
    max_focal_mismatch: float = 0.15,
) -> MetricReference:
    """A MegaSaM result (path to its npz or a loaded :class:`MegaSaMOutput`) at the clip's size.

    The depth is resized by nearest neighbour at pixel centres when MegaSaM ran at another
    resolution (see :meth:`MegaSaMOutput.resized`); the intrinsics are scaled accordingly. The
    reference keeps MegaSaM's ``cam_c2w`` (metric scale, its own world frame) for pose scaling.
    Depths at MegaSaM's clipping ceiling (``saturation_m``, within 0.1 %) are invalid: they mark
    the far field, not a distance; ``min_depth``/``max_depth`` are the dataset's limits.

    With ``clip_intrinsics`` (T,4) at the clip's size, MegaSaM's focal length (it optimises its
    own) is compared with the clip's: ``rho = median_t sqrt(fx_m fy_m / (fx_c fy_c))``. MegaSaM's
    depth is anchored by its metric depth prior, and its translations explain the image motion
    through its focal (parallax ``f B / z``), so under the clip's camera its baselines are
    ``rho`` times too short: the reference's translations are multiplied by ``rho``
    (``meta['focal_ratio']``). Beyond ``max_focal_mismatch`` (``|rho - 1|``) its solution does
    not describe this camera and :class:`AlignmentError` says so.
    """
    out = source if isinstance(source, MegaSaMOutput) else load_megasam_npz(source, expected_frames)
    if expected_frames is not None and out.num_frames != expected_frames:
        raise AlignmentError(f"MegaSaM output has {out.num_frames} frames for {expected_frames}", out.path)
    depth, k = out.resized(height, width)
    saturated = None if saturation_m is None else ~(np.asarray(depth) >= saturation_m * (1 - 1e-3))
    d, ok = _clean(depth, saturated, min_depth, max_depth)
    c2w = out.cam_c2w.copy()
    meta = {"path": out.path, "source_size": list(out.depths.shape[1:])}
    if clip_intrinsics is not None:
        rho, offset = _focal_ratio(k, clip_intrinsics)
        meta.update(focal_ratio=rho, principal_point_offset_px=offset)
        if not abs(rho - 1.0) <= max_focal_mismatch:
            fm, fc = float(np.median(k[:, 0])), float(np.median(np.asarray(clip_intrinsics)[:, 0]))
            raise AlignmentError(
                f"MegaSaM's focal length fx={fm:.1f} px differs from the clip's fx={fc:.1f} px by "
                f"{rho - 1:+.1%} (more than {max_focal_mismatch:.0%}): its depth and poses do not "
                f"describe this camera",
                out.path,
            )
        c2w[:, :3, 3] *= rho
    return MetricReference(depth=d, valid=ok, kind="megasam", c2w=c2w, intrinsics=k, meta=meta)


def _focal_ratio(k_ref: np.ndarray, k_clip: np.ndarray) -> tuple[float, float]:
    """Median geometric-mean focal ratio reference / clip, and the largest principal-point
    offset in pixels, for (T,4) fx fy cx cy at the same image size."""
    kr, kc = np.asarray(k_ref, np.float64), np.asarray(k_clip, np.float64)
    if kc.shape != kr.shape:
        raise AlignmentError(f"clip intrinsics {kc.shape} do not match the reference's {kr.shape}")
    rho = float(np.median(np.sqrt(kr[:, 0] * kr[:, 1] / (kc[:, 0] * kc[:, 1]))))
    offset = float(np.max(np.hypot(kr[:, 2] - kc[:, 2], kr[:, 3] - kc[:, 3])))
    return rho, offset
