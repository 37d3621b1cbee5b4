"""Lift 2D point tracks to 3D world tracks with depth and cameras; static-scene tracks and QC.

Conventions (:mod:`pipeline.geometry`): OpenCV cameras, c2w (T, 4, 4), metres, intrinsics
(T, 4) fx fy cx cy in pixels, the centre of pixel (i, j) at (u, v) = (j + 0.5, i + 0.5).

Depth sampling is bilinear in *inverse* depth over the four pixel centres around (u, v): for
any planar surface 1/z is affine in (u, v), so planes are recovered exactly, and it equals
ordinary bilinear depth interpolation to first order elsewhere. Within half a pixel of the
image edge (beyond the outer pixel centres) the border cell's weights extrapolate, so planes
stay exact there too.

A lifted point is marked not visible when
  * it was not visible in 2D, or falls outside the image (beyond the outer pixel centres by
    more than half a pixel), or in front of / behind nothing (non-positive depth);
  * any of the (weighted) four neighbour depths is invalid;
  * the 2x2 cell holds a depth edge, where the sample would mix foreground and background: the
    inverse-depth step across the cell departs from the step just outside it (on the better
    side) by more than ``tol`` of the inverse depth. A plane has equal steps whatever its
    angle, so distant ground seen at a grazing angle is kept; the former test (neighbours'
    max/min - 1 > tol) dropped all ground beyond 40 m at 512x288, f=300 (issue #20);
  * (occlusion test) the depth map is closer than the track's last accepted 3D point seen
    from the current camera: z_map < z_pred * (1 - tol * gap), gap = frames since that point.
    This catches occluders the 2D tracker missed; a point that moves towards the camera by
    more than ``tol`` of its depth per frame is dropped as well (conservative).

``tol`` is ``occlusion_rel_tol`` widened to the depth map's own noise: per frame the robust
spread of relative inverse-depth second differences (:func:`depth_noise_level`, 0 for rendered
depth); a step must exceed 3.5 of those sigmas, an occlusion 3 sigmas of a depth difference.
With 2 % per-pixel noise the former fixed test dropped 30 % of tracks on flat surfaces.

Positions at non-visible frames are filled by linear interpolation in time between visible
frames of the same track (held constant before the first / after the last); tracks never
visible are 0. Consumers must use the mask.
"""

from __future__ import annotations

import numpy as np

from pipeline.geometry import invert_pose

_NOISE_K = 3.5  # a jump counts as an edge only beyond this many noise sigmas of the map


def depth_noise_level(depth: np.ndarray, valid: np.ndarray) -> float:
    """Robust per-pixel noise of one depth map, as the spread of its relative second differences
    of inverse depth (zero on any plane, whatever its angle): ``1.4826 * median |d2q / q|`` over
    horizontal and vertical triples of valid pixels. Edges are a minority and do not move the
    median; a clean (rendered) map gives 0."""
    q = np.where(valid & np.isfinite(depth) & (depth > 0), 1.0 / np.where(depth > 0, depth, 1.0), np.nan)
    parts = []
    if q.shape[1] >= 3:
        parts.append(((q[:, :-2] - 2 * q[:, 1:-1] + q[:, 2:]) / q[:, 1:-1]).ravel())
    if q.shape[0] >= 3:
        parts.append(((q[:-2] - 2 * q[1:-1] + q[2:]) / q[1:-1]).ravel())
    d2 = np.concatenate(parts) if parts else np.zeros(0)
    d2 = d2[np.isfinite(d2)]
    return float(1.4826 * np.median(np.abs(d2))) if d2.size >= 64 else 0.0


def _cell_edge_deviation(q: np.ndarray, y0, x0, y1, x1, fx, fy) -> np.ndarray:
    """How far the inverse-depth step inside each 2x2 cell departs from a locally planar surface.

    On a plane, 1/z is affine in (u, v): the step across the cell equals the step just outside it
    on either side, at any viewing angle. At a depth edge inside the cell the inner step differs
    from both outer ones. Per row (and per column) of the cell the deviation is
    ``min(|g_in - g_left|, |g_in - g_right|)`` (an edge just *outside* the cell leaves one side
    planar and the sample clean); with no valid outer neighbour it is ``|g_in|``. Rows/columns
    with zero interpolation weight are ignored. Returns the largest deviation, in inverse depth.
    """
    h, w = q.shape

    def line_dev(a_in0, a_in1, a_out0, a_out1):
        g_in = a_in1 - a_in0
        d0 = np.abs(g_in - (a_in0 - a_out0))
        d1 = np.abs(g_in - (a_out1 - a_in1))
        best = np.fmin(d0, d1)  # NaN only where both outer samples are missing
        return np.where(np.isnan(best), np.abs(g_in), best)

    def at(yy, xx):
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        return np.where(inside, q[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], np.nan)

    dev = np.zeros(len(x0))
    use_x = np.abs(fx) > 1e-9  # fx < 0 or > 1: extrapolating at the border, both corners used
    use_y = np.abs(fy) > 1e-9
    for row, used in ((y0, np.abs(1 - fy) > 1e-9), (y1, use_y)):
        d = line_dev(at(row, x0), at(row, x1), at(row, x0 - 1), at(row, x1 + 1))
        dev = np.where(use_x & used, np.fmax(dev, d), dev)
    for col, used in ((x0, np.abs(1 - fx) > 1e-9), (x1, use_x)):
        d = line_dev(at(y0, col), at(y1, col), at(y0 - 1, col), at(y1 + 1, col))
        dev = np.where(use_y & used, np.fmax(dev, d), dev)
    return dev


def _sample_inverse_depth(depth: np.ndarray, valid: np.ndarray, uv: np.ndarray, rel_tol: float, noise: float = 0.0):
    """Bilinear inverse-depth sample of one frame. uv (N, 2) d4s pixels -> (z (N,), ok (N,)).

    ``ok`` is False where a used corner is invalid or the cell holds a depth edge: an
    inverse-depth step departing from the locally planar one (:func:`_cell_edge_deviation`) by
    more than ``max(rel_tol, 3.5 * noise)`` of the cell's inverse depth (``noise``:
    :func:`depth_noise_level`).
    """
    h, w = depth.shape
    x = uv[:, 0] - 0.5
    y = uv[:, 1] - 0.5
    finite = np.isfinite(x) & np.isfinite(y)
    inside = finite & (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    # Between the outer pixel centres and the image edge (half a pixel) the border cell's
    # weights extrapolate (fx in [-0.5, 0) or (1, 1.5]): exact on planes like the inside. A
    # one-pixel-wide image has no cell: its single column (row) is used as it is.
    x = np.clip(np.where(finite, x, 0.0), -0.5, w - 0.5)
    y = np.clip(np.where(finite, y, 0.0), -0.5, h - 0.5)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, max(w - 2, 0))
    y0 = np.clip(np.floor(y).astype(np.int64), 0, max(h - 2, 0))
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = np.where(x1 > x0, x - x0, 0.0)
    fy = np.where(y1 > y0, y - y0, 0.0)
    good_map = valid & np.isfinite(depth) & (depth > 0)
    q = np.where(good_map, 1.0 / np.where(good_map, depth, 1.0).astype(np.float64), np.nan)
    corners = [(y0, x0, (1 - fx) * (1 - fy)), (y0, x1, fx * (1 - fy)), (y1, x0, (1 - fx) * fy), (y1, x1, fx * fy)]
    inv = np.zeros(len(uv))
    ok = inside.copy()
    for yy, xx, wt in corners:
        qc = q[yy, xx]
        used = np.abs(wt) > 1e-9
        good = np.isfinite(qc)
        ok &= ~used | good
        inv += np.where(used & good, wt * np.where(good, qc, 0.0), 0.0)
    if len(uv):
        with np.errstate(invalid="ignore"):
            dev = _cell_edge_deviation(q, y0, x0, y1, x1, fx, fy)
            ok &= ~(dev > max(rel_tol, _NOISE_K * noise) * inv)
    with np.errstate(divide="ignore"):
        zs = np.where(ok & (inv > 0), 1.0 / np.where(inv > 0, inv, 1.0), 0.0)
    return zs, ok & (inv > 0)


def _occlusion_tolerance(rel_tol: float, noise: float) -> float:
    """Relative depth disagreement tolerated between a map sample and a predicted depth: the
    configured tolerance, widened to 3 sigma of the difference of two noisy samples (a second
    difference has sqrt(6) times the per-pixel sigma, a difference sqrt(2): noise / sqrt(3))."""
    return max(rel_tol, 3.0 * noise / np.sqrt(3.0))


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
    occ_tol = np.zeros(t)
    for f in range(t):
        noise = depth_noise_level(depth[f], depth_valid[f])
        z, ok = _sample_inverse_depth(depth[f], depth_valid[f], tracks2d[f], occlusion_rel_tol, noise)
        ok &= np.asarray(visible[f], dtype=bool)
        world[f] = _unproject(tracks2d[f], z, intrinsics[f], c2w[f])
        vis[f] = ok
        z_map[f] = z
        occ_tol[f] = _occlusion_tolerance(occlusion_rel_tol, noise)
    if temporal_occlusion:
        ref = np.zeros((n, 3))
        ref_t = np.full(n, -1)
        for f in range(t):
            has = ref_t >= 0
            if has.any():
                z_pred = _camera_depth(ref, c2w[f])
                gap = f - ref_t
                occluded = has & vis[f] & (z_map[f] < z_pred * (1.0 - occ_tol[f] * gap))
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
    kept_fraction: the share of those tracks whose median relative drift <= ``max_rel_drift``;
    ``checked`` False (and no figures) when no track is visible in two frames.
    """
    track_world = np.asarray(track_world, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    use = visible.sum(axis=0) >= 2
    if not use.any():  # nothing to measure (e.g. a 1-frame clip): not "every track drifts"
        return {
            "median_drift_m": None,
            "median_drift_rel": None,
            "kept_fraction": None,
            "num_tracks": 0,
            "checked": False,
        }
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
        "checked": True,
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
    noise = [depth_noise_level(depth[f], valid[f]) for f in range(t)]
    points = []
    for f in qf:
        z, ok = _sample_inverse_depth(depth[f], valid[f], uv, occlusion_rel_tol, noise[f])
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
        zs, ok = _sample_inverse_depth(depth[f], valid[f], proj, occlusion_rel_tol, noise[f])
        vis[f] = front & ok & (np.abs(zs - zc) <= _occlusion_tolerance(occlusion_rel_tol, noise[f]) * zs)
    return np.broadcast_to(pts[None], (t, n, 3)).astype(np.float32), vis
