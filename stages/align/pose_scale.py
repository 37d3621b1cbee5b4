"""Metric scale for camera trajectories that are only known up to scale (RealEstate10K SfM).

Two sources of metric scale:

* :func:`estimate_pose_scale` — a metric reference *trajectory* (MegaSaM ``cam_c2w``). Distances
  between camera centres ``|c_i - c_j|`` do not depend on the world frame, so the scale is the
  least-squares ratio over all frame pairs, ``s = sum d_ref d_src / sum d_src^2``, refitted after
  dropping pairs whose relative residual is beyond 3 robust sigmas. With ``similarity=True`` the
  full similarity ``c_ref ~= s R c_src + t`` is estimated too: Umeyama on the camera centres
  when they span more than a line, otherwise (straight-line motion, where Umeyama cannot fix
  the roll about the line) ``R`` from the camera orientations (``R ~= R_ref_i R_src_i^T``,
  projected onto SO(3)) and ``s, t`` by least squares given ``R``.
* :func:`scale_from_depth` — only a metric *depth* reference. If the dataset has sparse geometry
  in its own (up-to-scale) world (``points``), each point's camera depth ``z_src`` is compared with
  the metric depth at its pixel: ``s = median(D / z_src)`` (pixels do not change with scale).
  Otherwise the scale minimising the multi-view reprojection cost of the metric depth is found:
  pixels of frame i are lifted with the metric depth, moved with the relative pose whose
  translation is multiplied by ``s``, and compared with frame j's metric depth (truncated
  relative depth residual) and colour (truncated photometric residual). A log-spaced grid over
  plausible metric baselines is refined by golden-section search in ``log s``.

A trajectory that barely moves has no observable scale: :class:`StaticTrajectoryError` (an
:class:`AlignmentError`) says so, and callers may fall back (pose reference -> depth) or drop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline import geometry as geo
from stages.align.consistency import ReprojectionCost, sample_bilinear
from stages.align.fit import AlignmentError


class StaticTrajectoryError(AlignmentError):
    """The camera moves too little for its translation scale to be measured."""


@dataclass
class PoseScaleResult:
    """``scale`` multiplies the dataset's translations into metres; with a similarity,
    ``rotation``/``translation`` take the dataset's (scaled) world into the reference's."""

    scale: float
    method: str
    n: int  # pairs (trajectory) or points (depth)
    residual: float  # relative residual of the fit (dimensionless)
    baseline_m: float = float("nan")  # largest metric baseline of the trajectory
    rotation: np.ndarray | None = None
    translation: np.ndarray | None = None
    rotation_error_deg: float | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"pose_scale": float(self.scale), "pose_scale_method": self.method, "pose_scale_n": int(self.n),
                "pose_scale_residual": float(self.residual), "baseline_m": float(self.baseline_m),
                **({"rotation_error_deg": float(self.rotation_error_deg)} if self.rotation_error_deg is not None else {})}


def camera_centres(c2w: np.ndarray) -> np.ndarray:
    return np.asarray(c2w, np.float64)[:, :3, 3]


def apply_pose_scale(c2w: np.ndarray, s: float) -> np.ndarray:
    """Translations multiplied by ``s`` (world scaled about its origin); rotations unchanged."""
    if not (np.isfinite(s) and s > 0):
        raise AlignmentError(f"pose scale must be finite and positive, got {s}")
    out = np.array(c2w, dtype=np.float64, copy=True)
    out[..., :3, 3] *= s
    return out


def apply_similarity(c2w: np.ndarray, s: float, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Poses in the frame ``x' = s R x + t``: ``R_i' = R R_i``, ``c_i' = s R c_i + t``."""
    c2w = np.asarray(c2w, np.float64)
    rot = np.einsum("ij,tjk->tik", rotation, c2w[:, :3, :3])
    cen = s * camera_centres(c2w) @ np.asarray(rotation).T + np.asarray(translation)
    return geo.make_pose(rot, cen)


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~= s R src + t`` for point sets (N,3) (Umeyama 1991)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    cov = b.T @ a / len(src)
    u, d, vt = np.linalg.svd(cov)
    e = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[2, 2] = -1.0
    r = u @ e @ vt
    var = (a * a).sum() / len(src)
    s = float(np.trace(np.diag(d) @ e) / var) if with_scale else 1.0
    return s, r, md - s * r @ ms


def _project_so3(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    e = np.eye(3)
    e[2, 2] = np.sign(np.linalg.det(u @ vt))
    return u @ e @ vt


def _pairs_distances(c: np.ndarray, max_pairs: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(len(c), k=1)
    if i.size > max_pairs:
        keep = np.linspace(0, i.size - 1, max_pairs).round().astype(int)
        i, j = i[keep], j[keep]
    return np.linalg.norm(c[i] - c[j], axis=-1), np.stack([i, j], 1)


def estimate_pose_scale(c2w: np.ndarray, ref_c2w: np.ndarray, *, similarity: bool = False,
                        min_baseline_m: float = 0.05, outlier_k: float = 3.0) -> PoseScaleResult:
    """Scale (and optionally similarity) taking trajectory ``c2w`` (T,4,4, up to scale) onto the
    metric ``ref_c2w`` (T,4,4, any world frame). Raises :class:`StaticTrajectoryError` when the
    reference camera moves less than ``min_baseline_m`` or the dataset's does not move at all."""
    c2w = np.asarray(c2w, np.float64)
    ref_c2w = np.asarray(ref_c2w, np.float64)
    if c2w.shape != ref_c2w.shape or c2w.ndim != 3 or c2w.shape[1:] != (4, 4):
        raise AlignmentError(f"trajectories must both be (T,4,4), got {c2w.shape} and {ref_c2w.shape}")
    if len(c2w) < 2:
        raise StaticTrajectoryError("a single frame has no baseline")
    cs, cr = camera_centres(c2w), camera_centres(ref_c2w)
    d_src, _ = _pairs_distances(cs)
    d_ref, _ = _pairs_distances(cr)
    base_ref = float(d_ref.max())
    base_src = float(d_src.max())
    if base_ref < min_baseline_m:
        raise StaticTrajectoryError(f"near-static trajectory: reference camera moves at most {base_ref:.3g} m "
                                    f"< {min_baseline_m} m; its scale is not observable")
    if not base_src > 1e-9 * max(1.0, float(np.abs(cs).max())):
        raise StaticTrajectoryError("near-static trajectory: the dataset's camera centres coincide")
    use = np.ones_like(d_src, bool)
    s = float((d_ref * d_src).sum() / (d_src * d_src).sum())
    for _ in range(3):
        rel = (d_ref - s * d_src) / np.maximum(d_ref, min_baseline_m)
        sig = max(1.4826 * float(np.median(np.abs(rel - np.median(rel)))), 1e-6)
        use = np.abs(rel - np.median(rel)) <= outlier_k * sig
        s = float((d_ref[use] * d_src[use]).sum() / (d_src[use] ** 2).sum())
    big = d_ref >= min_baseline_m
    rel = (d_ref - s * d_src) / np.maximum(d_ref, min_baseline_m)
    residual = float(np.sqrt(np.mean(rel[big] ** 2))) if np.any(big) else float("nan")
    if not (np.isfinite(s) and s > 0):
        raise AlignmentError(f"pose scale is not finite and positive: {s}")
    res = PoseScaleResult(scale=s, method="trajectory", n=int(use.sum()), residual=residual, baseline_m=base_ref)
    if similarity:
        a = cs - cs.mean(0)
        sv = np.linalg.svd(a, compute_uv=False)
        if sv[1] > 1e-3 * sv[0]:
            s2, r, t = umeyama(cs, cr)
            res.method = "umeyama"
        else:  # collinear centres: rotation from the orientations
            r = _project_so3(np.einsum("tij,tkj->ik", ref_c2w[:, :3, :3], c2w[:, :3, :3]))
            s2 = float((((cr - cr.mean(0)) @ r) * a).sum() / (a * a).sum())
            t = cr.mean(0) - s2 * r @ cs.mean(0)
            res.method = "orientation+lsq"
        rot_err = np.einsum("ij,tjk->tik", r, c2w[:, :3, :3]) @ np.swapaxes(ref_c2w[:, :3, :3], 1, 2)
        ang = np.degrees(np.arccos(np.clip((np.trace(rot_err, axis1=1, axis2=2) - 1) / 2, -1, 1)))
        res.scale, res.rotation, res.translation = float(s2), r, t
        res.rotation_error_deg = float(np.median(ang))
        fit = s2 * cs @ r.T + t
        res.residual = float(np.sqrt(np.mean(np.sum((fit - cr) ** 2, -1))) / max(base_ref, 1e-12))
    return res


# ----------------------------------------------------------------------------------------------
# Scale from a metric depth reference


def _scale_from_points(points, points_visible, depth, valid, intrinsics, c2w) -> PoseScaleResult:
    pts = np.asarray(points, np.float64)
    t = depth.shape[0]
    if pts.ndim == 2:
        pts = np.broadcast_to(pts, (t,) + pts.shape)
    ratios = []
    for f in range(t):
        ok = np.all(np.isfinite(pts[f]), axis=-1)
        if points_visible is not None:
            ok &= np.asarray(points_visible[f], bool)
        if not np.any(ok):
            continue
        uv, z = geo.project(pts[f][ok], intrinsics[f], c2w[f])
        d, good = sample_bilinear(depth[f], uv[:, 0], uv[:, 1], valid[f])
        good &= z > 0
        ratios.append(d[good] / z[good])
    r = np.concatenate(ratios) if ratios else np.zeros(0)
    if r.size < 8:
        raise AlignmentError(f"too few sparse points land on valid metric depth ({r.size} < 8)")
    s = float(np.median(r))
    spread = float(1.4826 * np.median(np.abs(r / s - 1.0)))
    return PoseScaleResult(scale=s, method="points", n=int(r.size), residual=spread)


def scale_from_depth(depth: np.ndarray, valid: np.ndarray, intrinsics: np.ndarray, c2w: np.ndarray, *,
                     rgb: np.ndarray | None = None, points: np.ndarray | None = None,
                     points_visible: np.ndarray | None = None, exclude: np.ndarray | None = None,
                     pairs: list[tuple[int, int]] | None = None, max_points: int = 1000,
                     depth_trunc: float = 0.2, photo_trunc: float = 0.15, photo_weight: float = 3.0,
                     min_observability: float = 0.05, grid: int = 41, seed: int = 0) -> PoseScaleResult:
    """Scale for the up-to-scale poses ``c2w`` that makes them agree with metric ``depth``.

    ``points`` (N,3) or (T,N,3) in the dataset's world: sparse-point ratio method. Otherwise the
    reprojection search (module docstring) over ``pairs`` (default short/medium/long gaps), with
    the photometric term when ``rgb`` is given. ``exclude`` (T,H,W) removes moving/sky pixels.
    Raises :class:`StaticTrajectoryError` when the cost barely depends on the scale (relative
    drop from scale->0 to the optimum below ``min_observability``).
    """
    depth = np.asarray(depth, np.float64)
    valid = np.asarray(valid, bool)
    c2w = np.asarray(c2w, np.float64)
    t, h, w = depth.shape
    if points is not None:
        return _scale_from_points(points, points_visible, depth, valid, intrinsics, c2w)
    cs = camera_centres(c2w)
    base_src = float(_pairs_distances(cs)[0].max()) if t > 1 else 0.0
    if not base_src > 1e-9 * max(1.0, float(np.abs(cs).max())):
        raise StaticTrajectoryError("near-static trajectory: the camera centres coincide")
    use = valid if exclude is None else valid & ~np.asarray(exclude, bool)
    med_depth = float(np.median(depth[use])) if np.any(use) else float("nan")
    if not np.isfinite(med_depth):
        raise AlignmentError("no valid metric depth to scale the poses with")
    cost = ReprojectionCost(depth, valid, intrinsics, c2w, rgb=rgb, exclude=exclude, pairs=pairs,
                            max_points=max_points, depth_trunc=depth_trunc, photo_trunc=photo_trunc,
                            photo_weight=photo_weight, seed=seed)
    # Metric baselines from 1e-3 to 2 median depths are plausible for one clip.
    s, best, edge = cost.search(1e-3 * med_depth / base_src, 2.0 * med_depth / base_src, grid)
    zero = cost(0.0)
    observability = float((zero - best) / max(zero, 1e-12))
    if observability < min_observability:
        raise StaticTrajectoryError(f"near-static trajectory: translation changes the reprojection cost by only "
                                    f"{observability:.3f} < {min_observability} of its value; scale not observable")
    if edge:
        raise AlignmentError(f"depth-based pose scale hit the edge of its search range (metric baseline "
                             f"{s * base_src:.3g} m vs median depth {med_depth:.3g} m)")
    return PoseScaleResult(scale=s, method="reprojection" + ("+photo" if rgb is not None else ""), n=cost.n_points,
                           residual=float(best), baseline_m=s * base_src,
                           extra={"observability": observability, "cost_at_zero": float(zero)})
