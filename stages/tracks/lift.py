"""Lift 2D point tracks to 3D world tracks with depth and cameras; static-scene tracks and QC.

Conventions (:mod:`pipeline.geometry`): OpenCV cameras, c2w (T, 4, 4), metres, intrinsics
(T, 4) fx fy cx cy in pixels, the centre of pixel (i, j) at (u, v) = (j + 0.5, i + 0.5).

Depth sampling is bilinear in *inverse* depth over the four pixel centres around (u, v): for
any planar surface 1/z is affine in (u, v), so planes are recovered exactly, and it equals
ordinary bilinear depth interpolation to first order elsewhere.

A lifted point is marked not visible when
  * it was not visible in 2D, or falls outside the image (beyond the outer pixel centres by
    more than half a pixel), or in front of / behind nothing (non-positive depth);
  * any of the (weighted) four neighbour depths is invalid;
  * the neighbours disagree: max/min - 1 > ``occlusion_rel_tol`` (a depth edge, where the
    sample would mix foreground and background);
  * (occlusion test) the depth map is closer than the track's last accepted 3D point seen
    from the current camera: z_map < z_pred * (1 - tol * gap), gap = frames since that point.
    This catches occluders the 2D tracker missed; a point that moves towards the camera by
    more than ``tol`` of its depth per frame is dropped as well (conservative).

Positions at non-visible frames are filled by linear interpolation in time between visible
frames of the same track (held constant before the first / after the last); tracks never
visible are 0. Consumers must use the mask.
"""
from __future__ import annotations

import numpy as np

from pipeline.geometry import invert_pose


def _sample_inverse_depth(depth: np.ndarray, valid: np.ndarray, uv: np.ndarray, rel_tol: float):
    """Bilinear inverse-depth sample of one frame. uv (N, 2) d4s pixels -> (z (N,), ok (N,))."""
    h, w = depth.shape
    x = uv[:, 0] - 0.5
    y = uv[:, 1] - 0.5
    finite = np.isfinite(x) & np.isfinite(y)
    inside = finite & (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    x = np.clip(np.where(finite, x, 0.0), 0.0, w - 1.0)
    y = np.clip(np.where(finite, y, 0.0), 0.0, h - 1.0)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, max(w - 2, 0))
    y0 = np.clip(np.floor(y).astype(np.int64), 0, max(h - 2, 0))
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = np.clip(x - x0, 0.0, 1.0)
    fy = np.clip(y - y0, 0.0, 1.0)
    corners = [(y0, x0, (1 - fx) * (1 - fy)), (y0, x1, fx * (1 - fy)), (y1, x0, (1 - fx) * fy), (y1, x1, fx * fy)]
    inv = np.zeros(len(uv))
    ok = inside.copy()
    zmin = np.full(len(uv), np.inf)
    zmax = np.zeros(len(uv))
    for yy, xx, wt in corners:
        z = depth[yy, xx].astype(np.float64)
        used = wt > 1e-9
        good = valid[yy, xx] & np.isfinite(z) & (z > 0)
        ok &= ~used | good
        zs = np.where(good, z, 1.0)
        inv += np.where(used, wt / zs, 0.0)
        zmin = np.where(used & good, np.minimum(zmin, zs), zmin)
        zmax = np.where(used & good, np.maximum(zmax, zs), zmax)
    ok &= zmax <= zmin * (1.0 + rel_tol)
    with np.errstate(divide="ignore"):
        zs = np.where(ok & (inv > 0), 1.0 / np.where(inv > 0, inv, 1.0), 0.0)
    return zs, ok & (inv > 0)


def _unproject(uv: np.ndarray, z: np.ndarray, k: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    fx, fy, cx, cy = (float(a) for a in k)
    cam = np.stack([(uv[:, 0] - cx) / fx * z, (uv[:, 1] - cy) / fy * z, z], axis=-1)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def _camera_depth(points: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    w2c = invert_pose(c2w)
    return points @ w2c[2, :3] + w2c[2, 3]


def _fill_invisible(track: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Linear interpolation in time over non-visible frames, per track. (T, N, 3)."""
    t, n, _ = track.shape
    out = np.zeros_like(track)
    ts = np.arange(t)
    for j in range(n):
        vis = visible[:, j]
        if not vis.any():
            continue
        for c in range(3):
            out[:, j, c] = np.interp(ts, ts[vis], track[vis, j, c])
    return out


def lift_tracks(
    tracks2d: np.ndarray,
    visible: np.ndarray,
    depth: np.ndarray,
    depth_valid: np.ndarray,
    intrinsics: np.ndarray,
    c2w: np.ndarray,
    occlusion_rel_tol: float = 0.05,
    temporal_occlusion: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """2D tracks (T, N, 2) d4s pixels + depth (T, H, W) -> (track_world (T, N, 3) float32, visible (T, N))."""
    tracks2d = np.asarray(tracks2d, dtype=np.float64)
    t, n, _ = tracks2d.shape
    if depth.shape[0] != t or intrinsics.shape != (t, 4) or c2w.shape != (t, 4, 4):
        raise ValueError(
            f"shapes disagree: tracks {tracks2d.shape}, depth {depth.shape}, intrinsics {intrinsics.shape}, c2w {c2w.shape}"
        )
    if depth_valid is None:
        depth_valid = np.isfinite(depth) & (depth > 0)
    world = np.zeros((t, n, 3))
    vis = np.zeros((t, n), dtype=bool)
    z_map = np.zeros((t, n))
    for f in range(t):
        z, ok = _sample_inverse_depth(depth[f], depth_valid[f], tracks2d[f], occlusion_rel_tol)
        ok &= np.asarray(visible[f], dtype=bool)
        world[f] = _unproject(tracks2d[f], z, intrinsics[f], c2w[f])
        vis[f] = ok
        z_map[f] = z
    if temporal_occlusion:
        ref = np.zeros((n, 3))
        ref_t = np.full(n, -1)
        for f in range(t):
            has = ref_t >= 0
            if has.any():
                z_pred = _camera_depth(ref, c2w[f])
                gap = f - ref_t
                occluded = has & vis[f] & (z_map[f] < z_pred * (1.0 - occlusion_rel_tol * gap))
                vis[f] &= ~occluded
            ref[vis[f]] = world[f][vis[f]]
            ref_t[vis[f]] = f
    world = _fill_invisible(world, vis)
    return world.astype(np.float32), vis


def static_drift_qc(
    track_world: np.ndarray,
    visible: np.ndarray,
    c2w: np.ndarray | None = None,
    max_rel_drift: float = 0.02,
) -> dict:
    """How well lifted tracks of a static scene stay put.

    Per track with >= 2 visible frames: drift = distance of each visible position from the
    track's median position; relative drift divides by the distance to the camera centre of
    that frame (or by the median point's distance to the origin when ``c2w`` is None).
    Returns median_drift_m and median_drift_rel over all visible (frame, track) samples, and
    kept_fraction: the share of those tracks whose median relative drift <= ``max_rel_drift``.
    """
    track_world = np.asarray(track_world, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    use = visible.sum(axis=0) >= 2
    if not use.any():
        return {"median_drift_m": float("nan"), "median_drift_rel": float("nan"), "kept_fraction": 0.0, "num_tracks": 0}
    pts = track_world[:, use]
    vis = visible[:, use]
    med = np.stack([np.median(pts[vis[:, j], j], axis=0) for j in range(pts.shape[1])])  # M 3
    drift = np.linalg.norm(pts - med[None], axis=-1)  # T M
    if c2w is not None:
        dist = np.linalg.norm(pts - np.asarray(c2w)[:, None, :3, 3], axis=-1)
    else:
        dist = np.broadcast_to(np.linalg.norm(med, axis=-1)[None], drift.shape)
    rel = drift / np.maximum(dist, 1e-9)
    per_track = np.array([np.median(rel[vis[:, j], j]) for j in range(rel.shape[1])])
    return {
        "median_drift_m": float(np.median(drift[vis])),
        "median_drift_rel": float(np.median(rel[vis])),
        "kept_fraction": float(np.mean(per_track <= max_rel_drift)),
        "num_tracks": int(use.sum()),
    }


def tracks_from_depth_static(
    depth: np.ndarray,
    valid: np.ndarray,
    intrinsics: np.ndarray,
    c2w: np.ndarray,
    grid: int,
    query_frames: list[int] | int = (0,),
    occlusion_rel_tol: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Tracks of a static scene from depth and cameras alone.

    A ``grid x grid`` set of pixel centres (evenly spread, W/64 margin) in each query frame is
    unprojected with that frame's depth (pixels with invalid depth or on a depth edge dropped),
    projected into every frame and kept visible where it lands in the image in front of the
    camera and the depth map there agrees within ``occlusion_rel_tol`` (relative).
    Returns (track_world (T, N, 3) float32 - constant in time, visible (T, N) bool).
    """
    t, h, w = depth.shape
    qf = [query_frames] if isinstance(query_frames, (int, np.integer)) else list(query_frames)
    margin = w / 64
    js = np.unique(np.clip(np.floor(np.linspace(margin, w - margin, grid)), 0, w - 1).astype(int))
    is_ = np.unique(np.clip(np.floor(np.linspace(margin, h - margin, grid)), 0, h - 1).astype(int))
    jj, ii = np.meshgrid(js, is_)
    uv = np.stack([jj.ravel() + 0.5, ii.ravel() + 0.5], axis=-1).astype(np.float64)
    points = []
    for f in qf:
        z, ok = _sample_inverse_depth(depth[f], valid[f], uv, occlusion_rel_tol)
        points.append(_unproject(uv[ok], z[ok], intrinsics[f], c2w[f]))
    pts = np.concatenate(points) if points else np.zeros((0, 3))
    n = len(pts)
    vis = np.zeros((t, n), dtype=bool)
    for f in range(t):
        w2c = invert_pose(c2w[f])
        cam = pts @ w2c[:3, :3].T + w2c[:3, 3]
        zc = cam[:, 2]
        fx, fy, cx, cy = (float(a) for a in intrinsics[f])
        with np.errstate(divide="ignore", invalid="ignore"):
            proj = np.stack([fx * cam[:, 0] / zc + cx, fy * cam[:, 1] / zc + cy], axis=-1)
        front = zc > 1e-6
        proj = np.where(front[:, None], proj, np.nan)
        zs, ok = _sample_inverse_depth(depth[f], valid[f], proj, occlusion_rel_tol)
        vis[f] = front & ok & (np.abs(zs - zc) <= occlusion_rel_tol * zs)
    return np.broadcast_to(pts[None], (t, n, 3)).astype(np.float32), vis
