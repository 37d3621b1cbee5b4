"""Metric scale for camera trajectories that are only known up to scale (RealEstate10K SfM).

Two sources of metric scale:

* :func:`estimate_pose_scale` — a metric reference *trajectory* (MegaSaM ``cam_c2w``). The
  similarity ``c_ref ~= s R c_src + t`` is fitted to the camera centres. ``R`` comes from the
  camera orientations (``R ~= R_ref_i R_src_i^T`` summed and projected onto SO(3)) when the two
  trajectories' rotations agree under it, else from the centres (Umeyama); given ``R``, ``s``
  and ``t`` are linear least squares, refitted after dropping frames beyond 3 robust sigmas.
  Noise on the reference centres enters ``s`` linearly, so it is unbiased; the former ratio of
  pairwise distances was not (noise lengthens short distances: +8.8 % on a 0.1 m path with
  1 cm jitter). Observability is judged from the fit itself: the scale's relative standard
  error (residual jitter over the path's spread) must stay below ``max_scale_uncertainty``
  and the fitted metric path must be at least ``min_baseline_m`` long; the largest noisy
  distance between reference centres, used before, grows with the jitter of a static camera.
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
from stages.align.consistency import ReprojectionCost, default_pairs, sample_bilinear
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
        return {
            "pose_scale": float(self.scale),
            "pose_scale_method": self.method,
            "pose_scale_n": int(self.n),
            "pose_scale_residual": float(self.residual),
            "baseline_m": float(self.baseline_m),
            **({"rotation_error_deg": float(self.rotation_error_deg)} if self.rotation_error_deg is not None else {}),
        }


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


def _extent(c: np.ndarray) -> float:
    """Largest distance between two of the points (N,3). Long trajectories are thinned to 200
    evenly spaced frames first (consecutive camera centres are close, so little is lost)."""
    if len(c) < 2:
        return 0.0
    if len(c) > 200:
        c = c[np.linspace(0, len(c) - 1, 200).round().astype(int)]
    return float(_pairs_distances(c, max_pairs=20000)[0].max())


def _rotation_angles_deg(r: np.ndarray, src_rot: np.ndarray, ref_rot: np.ndarray) -> np.ndarray:
    """Angle of ``R R_src,i`` against ``R_ref,i`` per frame; from the chord ``|E - I|_F =
    2 sqrt(2) sin(angle / 2)``, which stays accurate near zero (arccos of the trace does not)."""
    err = np.einsum("ij,tjk->tik", r, src_rot) @ np.swapaxes(ref_rot, 1, 2)
    chord = np.linalg.norm(err - np.eye(3), axis=(1, 2)) / (2 * np.sqrt(2))
    return np.degrees(2 * np.arcsin(np.clip(chord, 0, 1)))


def estimate_pose_scale(
    c2w: np.ndarray,
    ref_c2w: np.ndarray,
    *,
    similarity: bool = False,
    min_baseline_m: float = 0.05,
    outlier_k: float = 3.0,
    max_scale_uncertainty: float = 0.03,
    max_rotation_disagreement_deg: float = 5.0,
) -> PoseScaleResult:
    """Scale (and optionally similarity) taking trajectory ``c2w`` (T,4,4, up to scale) onto the
    metric ``ref_c2w`` (T,4,4, any world frame); any number of frames.

    The scale comes from the similarity ``c_ref ~= s R c_src + t`` fitted to the camera centres
    (module docstring): ``R`` from the camera orientations when both trajectories' rotations
    agree under it (median disagreement <= ``max_rotation_disagreement_deg``), else from the
    centres (Umeyama); then ``s`` by linear least squares given ``R``, which noise on the
    reference centres does not bias (the ratio of pairwise distances did: +8.8 % on a 0.1 m path
    with 1 cm jitter). Frames whose residual is beyond ``outlier_k`` robust sigmas are dropped
    and the fit repeated.

    Raises :class:`StaticTrajectoryError` when the scale is not observable: the dataset's camera
    does not move, the fitted metric extent of the path is below ``min_baseline_m``, the fitted
    scale is not positive, or its relative standard error (from the residual jitter and the
    path's spread) exceeds ``max_scale_uncertainty``. Unlike the largest noisy distance between
    reference centres, the standard error does not grow with the jitter of a static camera.
    """
    c2w = np.asarray(c2w, np.float64)
    ref_c2w = np.asarray(ref_c2w, np.float64)
    if c2w.shape != ref_c2w.shape or c2w.ndim != 3 or c2w.shape[1:] != (4, 4):
        raise AlignmentError(f"trajectories must both be (T,4,4), got {c2w.shape} and {ref_c2w.shape}")
    if len(c2w) < 2:
        raise StaticTrajectoryError("a single frame has no baseline")
    if not (np.all(np.isfinite(c2w)) and np.all(np.isfinite(ref_c2w))):
        raise AlignmentError("trajectories must be finite")
    cs, cr = camera_centres(c2w), camera_centres(ref_c2w)
    base_src = _extent(cs)
    if not base_src > 1e-9 * max(1.0, float(np.abs(cs).max())):
        raise StaticTrajectoryError("near-static trajectory: the dataset's camera centres coincide")

    # Rotation from the orientations when they are consistent: independent of the centres' noise.
    r_orient = _project_so3(np.einsum("tij,tkj->ik", ref_c2w[:, :3, :3], c2w[:, :3, :3]))
    rot_dis = float(np.median(_rotation_angles_deg(r_orient, c2w[:, :3, :3], ref_c2w[:, :3, :3])))
    from_orientations = rot_dis <= max_rotation_disagreement_deg

    use = np.ones(len(cs), bool)
    s = r = t = None
    n_min = max(2, (len(cs) + 1) // 2)
    for _ in range(4):
        ms, mr = cs[use].mean(0), cr[use].mean(0)
        a, b = cs[use] - ms, cr[use] - mr
        r = r_orient if from_orientations else umeyama(cs[use], cr[use])[1]
        s = float(((b @ r) * a).sum() / (a * a).sum())
        t = mr - s * r @ ms
        err = np.linalg.norm(s * cs @ r.T + t - cr, axis=-1)
        scale_err = 1.4826 * float(np.median(err[use]))
        new_use = err <= max(outlier_k * scale_err, 1e-9 * max(1.0, s * base_src))
        if new_use.sum() < n_min or np.array_equal(new_use, use):
            break
        use = new_use
    a = cs[use] - cs[use].mean(0)
    err = np.linalg.norm(s * cs @ r.T + t - cr, axis=-1)
    dof = 3 * int(use.sum()) - 4 - (0 if from_orientations else 3)  # s, t (and R from the centres)
    sigma = float(np.sqrt((err[use] ** 2).sum() / dof)) if dof > 0 else float("inf")
    spread = float(np.sqrt((a * a).sum()))
    se_rel = sigma / (abs(s) * spread) if s != 0 and spread > 0 else float("inf")
    extent_m = s * base_src
    if not (np.isfinite(s) and s > 0):
        raise StaticTrajectoryError(
            f"near-static trajectory: the reference path does not follow the dataset's "
            f"(fitted scale {s:.3g}); its scale is not observable"
        )
    if extent_m < min_baseline_m:
        raise StaticTrajectoryError(
            f"near-static trajectory: the camera moves {extent_m:.3g} m "
            f"< {min_baseline_m} m; its scale is not observable"
        )
    if not se_rel <= max_scale_uncertainty:
        raise StaticTrajectoryError(
            f"near-static trajectory: pose scale uncertain by {se_rel:.1%} > {max_scale_uncertainty:.1%} "
            f"(reference jitter {sigma:.3g} m against a {extent_m:.3g} m path)"
        )
    residual = float(np.sqrt(np.mean(err[use] ** 2)) / max(extent_m, 1e-12))
    angles = _rotation_angles_deg(r, c2w[:, :3, :3], ref_c2w[:, :3, :3])
    method = "trajectory"
    if similarity:
        method = "orientation+lsq" if from_orientations else "umeyama"
    res = PoseScaleResult(
        scale=s,
        method=method,
        n=int(use.sum()),
        residual=residual,
        baseline_m=extent_m,
        rotation=r,
        translation=t,
        rotation_error_deg=float(np.median(angles)),
        extra={
            "rotation_from": "orientations" if from_orientations else "centres",
            "scale_uncertainty": se_rel,
            "jitter_m": sigma,
            "orientation_disagreement_deg": rot_dis,
        },
    )
    if not similarity:
        res.rotation = res.translation = res.rotation_error_deg = None
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


def scale_from_depth(
    depth: np.ndarray,
    valid: np.ndarray,
    intrinsics: np.ndarray,
    c2w: np.ndarray,
    *,
    rgb: np.ndarray | None = None,
    points: np.ndarray | None = None,
    points_visible: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    pairs: list[tuple[int, int]] | None = None,
    max_points: int = 1000,
    depth_trunc: float = 0.2,
    photo_trunc: float = 0.15,
    photo_weight: float = 3.0,
    min_observability: float = 0.05,
    grid: int = 41,
    seed: int = 0,
) -> PoseScaleResult:
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
    pairs = default_pairs(t) if pairs is None else pairs
    # The baselines that matter are those of the frame pairs compared, not the whole path's
    # extent: a scene-length walk is many depths long while each pair sees one stretch of it.
    tiny = 1e-9 * max(1.0, float(np.abs(cs).max()))
    bases = [b for b in (float(np.linalg.norm(cs[i] - cs[j])) for i, j in pairs) if b > tiny]
    if not bases:
        raise StaticTrajectoryError("near-static trajectory: the camera centres coincide")
    base_min, base_max = min(bases), max(bases)
    use = valid if exclude is None else valid & ~np.asarray(exclude, bool)
    med_depth = float(np.median(depth[use])) if np.any(use) else float("nan")
    if not np.isfinite(med_depth):
        raise AlignmentError("no valid metric depth to scale the poses with")
    cost = ReprojectionCost(
        depth,
        valid,
        intrinsics,
        c2w,
        rgb=rgb,
        exclude=exclude,
        pairs=pairs,
        max_points=max_points,
        depth_trunc=depth_trunc,
        photo_trunc=photo_trunc,
        photo_weight=photo_weight,
        seed=seed,
    )
    # Plausible: the longest compared pair at least 1e-3 median depths, the shortest at most 2.
    # The grid keeps its density per decade (``grid`` points over the 3.3 decades of a clip whose
    # pairs' baselines are alike).
    lo, hi = 1e-3 * med_depth / base_max, 2.0 * med_depth / base_min
    n_grid = max(grid, int(np.ceil(grid * np.log10(hi / lo) / np.log10(2e3))))
    s, best, edge = cost.search(lo, hi, n_grid)
    zero = cost(0.0)
    observability = float((zero - best) / max(zero, 1e-12))
    if observability < min_observability:
        raise StaticTrajectoryError(
            f"near-static trajectory: translation changes the reprojection cost by only "
            f"{observability:.3f} < {min_observability} of its value; scale not observable"
        )
    if edge:
        raise AlignmentError(
            f"depth-based pose scale hit the edge of its search range (metric baselines "
            f"{s * base_min:.3g}-{s * base_max:.3g} m vs median depth {med_depth:.3g} m)"
        )
    return PoseScaleResult(
        scale=s,
        method="reprojection" + ("+photo" if rgb is not None else ""),
        n=cost.n_points,
        residual=float(best),
        baseline_m=s * _extent(cs),
        extra={"observability": observability, "cost_at_zero": float(zero)},
    )
