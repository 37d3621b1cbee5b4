"""Do the aligned depth and the (scaled) poses agree? Multi-view reprojection checks.

For a frame pair (i, j), sampled pixels ``p_i`` of frame i with depth ``D_i(p_i)`` are lifted
to the world with ``c2w_i`` and projected into frame j, landing at ``p_j`` with camera depth
``z_j``. For static, unoccluded content:

* depth reprojection error  ``|z_j - D_j(p_j)| / D_j(p_j)`` (``D_j`` sampled bilinearly);
* pixel reprojection error  the round trip: lift ``p_j`` with ``D_j(p_j)`` and project back into
  frame i; ``|p_i' - p_i|`` in pixels.

Medians over all pairs and points are reported (occlusions and moving objects are a minority;
``dynamic_mask`` removes known movers). A wrong pose scale moves every landing point by
``(s - 1) * baseline``, so the errors grow with the baseline-to-depth ratio: clips whose camera
barely moves cannot be checked this way (``coverage``/``baseline_ratio`` say so).
For 3D tracks (T,N,3) the drift of static points and their depth agreement are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline import geometry as geo


def grey(rgb: np.ndarray) -> np.ndarray:
    """Grey level in [0, 1] of colour values (..., 3): the channels' mean / 255, in float64."""
    return np.asarray(rgb, np.float64).mean(-1) / 255.0


def sample_bilinear(
    img: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    frame: np.ndarray | None = None,
):
    """Bilinear samples of ``img`` (H,W) or (H,W,C) at pixel coordinates ``u, v`` (centres at +0.5).

    Returns ``(values, ok)``; ``ok`` is False outside the image or where any of the four
    neighbours is not ``valid``. With ``frame`` (one index per point), ``img`` and ``valid`` are stacks of
    frames (T,H,W[,C]) and each point is sampled in its own frame: many frames' points in one call.
    The four neighbours are gathered from ``img`` as it is and only they are widened to float64:
    the same values as sampling a float64 copy, without converting the whole frame for a few
    hundred points (the alignment's scale search samples thousands of times).
    """
    lead = () if frame is None else (np.asarray(frame, np.int64),)
    h, w = img.shape[len(lead) : len(lead) + 2]
    x = np.asarray(u, np.float64) - 0.5
    y = np.asarray(v, np.float64) - 0.5
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    xs = np.where(ok, x, 0.0)
    ys = np.where(ok, y, 0.0)
    x0 = np.clip(np.floor(xs).astype(np.int64), 0, max(w - 2, 0))
    y0 = np.clip(np.floor(ys).astype(np.int64), 0, max(h - 2, 0))
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = xs - x0
    fy = ys - y0
    im = np.asarray(img)

    def at(yy, xx):
        return im[lead + (yy, xx)].astype(np.float64)

    if im.ndim == 3 + len(lead):
        fx, fy = fx[..., None], fy[..., None]
    val = (
        at(y0, x0) * (1 - fx) * (1 - fy)
        + at(y0, x1) * fx * (1 - fy)
        + at(y1, x0) * (1 - fx) * fy
        + at(y1, x1) * fx * fy
    )
    if valid is not None:
        vm = np.asarray(valid, bool)
        ok &= vm[lead + (y0, x0)] & vm[lead + (y0, x1)] & vm[lead + (y1, x0)] & vm[lead + (y1, x1)]
    return val, ok


def relative_pose(c2w_i: np.ndarray, c2w_j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation and translation taking camera-i coordinates to camera-j coordinates."""
    rel = geo.invert_pose(c2w_j) @ np.asarray(c2w_i, np.float64)
    return rel[:3, :3], rel[:3, 3]


def lift(u: np.ndarray, v: np.ndarray, z: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Pixels with z-depth to camera coordinates (P,3)."""
    fx, fy, cx, cy = k
    return np.stack([(u - cx) / fx * z, (v - cy) / fy * z, z], axis=-1)


def to_pixels(x_cam: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fx, fy, cx, cy = k
    z = x_cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return fx * x_cam[..., 0] / z + cx, fy * x_cam[..., 1] / z + cy, z


def default_pairs(num_frames: int, max_pairs: int = 24, max_gap: int = 16) -> list[tuple[int, int]]:
    """Short, medium and long baselines: gaps 1, T/4, T/2 and T-1, evenly thinned to ``max_pairs``.

    Gaps are capped at ``max_gap`` frames (with ``max_gap/2`` and ``max_gap/4`` added when a cap
    applies): in a scene-length video frames half a scene apart rarely see the same surfaces,
    and pairs without overlap carry no information. Clips of up to ``max_gap + 1`` frames are
    unaffected."""
    if num_frames < 2:
        return []
    wanted = {1, max(1, num_frames // 4), max(1, num_frames // 2), num_frames - 1}
    gaps = {min(g, max_gap) for g in wanted}
    if max(wanted) > max_gap:
        gaps |= {max(1, max_gap // 2), max(1, max_gap // 4)}
    gaps = sorted(gaps)
    pairs = [(i, i + g) for g in gaps for i in range(num_frames - g)]
    if len(pairs) > max_pairs:
        pairs = [pairs[k] for k in np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)]
    return pairs


def sample_pixels(mask: np.ndarray, max_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``max_points`` random (row, col) where ``mask``."""
    idx = np.flatnonzero(mask)
    if idx.size > max_points:
        idx = rng.choice(idx, max_points, replace=False)
    return np.unravel_index(idx, mask.shape)


class ReprojectionCost:
    """Multi-view reprojection cost of metric depth as a function of a translation scale ``s``.

    Pixels of frame i (random, at most ``max_points`` per directed pair) are lifted with
    ``depth`` and moved into frame j with the relative pose whose translation is multiplied by
    ``s``. Per point: the truncated relative depth residual ``min(|z_j - D_j(p_j)|/D_j, tau_d)/tau_d``
    plus, with ``rgb``, ``photo_weight`` times the truncated grey-level residual
    ``min(|I_i(p_i) - I_j(p_j)|, tau_p)/tau_p``; a point leaving the image or landing on invalid
    depth costs the truncation value. The mean over points is returned. Depth alone cannot see
    motion parallel to a plane; the photometric term can.
    """

    def __init__(
        self,
        depth,
        valid,
        intrinsics,
        c2w,
        *,
        rgb=None,
        exclude=None,
        pairs=None,
        max_points=1000,
        depth_trunc=0.2,
        photo_trunc=0.15,
        photo_weight=3.0,
        seed=0,
        landed_only=True,
        min_landed=0.25,
    ):
        # kept as given (float32 depth, uint8 colour): only the sampled points are widened to float64
        self.depth = np.asarray(depth)
        t = self.depth.shape[0]
        self.use = np.asarray(valid, bool) if exclude is None else np.asarray(valid, bool) & ~np.asarray(exclude, bool)
        self.intrinsics = np.asarray(intrinsics, np.float64)
        self.img = None if rgb is None else np.asarray(rgb)
        self.depth_trunc, self.photo_trunc, self.photo_weight = depth_trunc, photo_trunc, photo_weight
        self.landed_only, self.min_landed = landed_only, min_landed
        rng = np.random.default_rng(seed)
        # every directed pair's points in one set of arrays: a cost evaluation is a few array
        # operations over all of them (the scale search evaluates it ~50 times per check)
        js, rots, moves, cols_ = [], [], [], []
        for i0, j0 in default_pairs(t) if pairs is None else pairs:
            for i, j in ((i0, j0), (j0, i0)):
                rows, cols = sample_pixels(self.use[i], max_points, rng)
                if rows.size == 0:
                    continue
                r_ji, t_ji = relative_pose(c2w[i], c2w[j])
                z = self.depth[i, rows, cols].astype(np.float64)
                js.append(np.full(rows.size, j, np.int64))
                rots.append(lift(cols + 0.5, rows + 0.5, z, self.intrinsics[i]) @ r_ji.T)
                moves.append(np.broadcast_to(t_ji, (rows.size, 3)))
                if self.img is not None:
                    cols_.append(grey(self.img[i, rows, cols]))
        self.n_points = int(sum(j.size for j in js))
        if self.n_points:
            lands, self.j = np.unique(np.concatenate(js), return_inverse=True)  # per point: its frame j
            self.a = np.concatenate(rots)  # the point in frame j's axes before the translation
            self.t = np.concatenate(moves)  # frame j's translation, multiplied by s
            self.k = self.intrinsics[lands][self.j].T  # frame j's fx, fy, cx, cy per point
            self.col = np.concatenate(cols_) if self.img is not None else None
            # the frames points land in (a few of a scene), their grey levels computed once
            self.depth_j, self.use_j = self.depth[lands], self.use[lands]
            self.grey_j = None if self.img is None else grey(self.img[lands])

    def __call__(self, s: float) -> float:
        if self.n_points == 0:
            return float("nan")
        uj, vj, zj = to_pixels(self.a + s * self.t, self.k)
        dj, ok = sample_bilinear(self.depth_j, uj, vj, self.use_j, frame=self.j)
        ok &= zj > 0
        landed = int(ok.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            rd = np.where(
                ok,
                np.minimum(np.abs(zj - dj) / dj, self.depth_trunc),
                0.0 if self.landed_only else self.depth_trunc,
            )
        total = rd.sum() / self.depth_trunc
        if self.col is not None:
            ij, _ = sample_bilinear(self.grey_j, uj, vj, frame=self.j)
            rp = np.where(
                ok, np.minimum(np.abs(ij - self.col), self.photo_trunc), 0.0 if self.landed_only else self.photo_trunc
            )
            total += self.photo_weight * rp.sum() / self.photo_trunc
        if not self.landed_only:
            return float(total / self.n_points)
        worst = 1.0 + (self.photo_weight if self.img is not None else 0.0)
        if landed < self.min_landed * self.n_points:
            return worst
        return float(total / landed)

    def search(self, lo: float, hi: float, grid: int = 41, tol: float = 1e-4) -> tuple[float, float, bool]:
        """Minimiser of the cost over ``s`` in [lo, hi]: log grid, then golden section in log s.
        Returns ``(s, cost, at_edge)``; ``at_edge`` when the grid minimum is an end of the range."""
        logs = np.linspace(np.log(lo), np.log(hi), grid)
        costs = np.array([self(np.exp(x)) for x in logs])
        k = int(np.nanargmin(costs))
        a, b = logs[max(k - 1, 0)], logs[min(k + 1, grid - 1)]
        g = (np.sqrt(5) - 1) / 2
        c, d = b - g * (b - a), a + g * (b - a)
        fc, fd = self(np.exp(c)), self(np.exp(d))
        while b - a > tol:
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - g * (b - a)
                fc = self(np.exp(c))
            else:
                a, c, fc = c, d, fd
                d = a + g * (b - a)
                fd = self(np.exp(d))
        s = float(np.exp(0.5 * (a + b)))
        best = self(s)
        if not best <= costs[k]:
            s, best = float(np.exp(logs[k])), float(costs[k])
        return s, best, k in (0, grid - 1)


def depth_reprojection_error(
    depth: np.ndarray,
    valid: np.ndarray,
    intrinsics: np.ndarray,
    c2w: np.ndarray,
    *,
    dynamic_mask: np.ndarray | None = None,
    pairs: list[tuple[int, int]] | None = None,
    max_points: int = 4000,
    seed: int = 0,
) -> dict:
    """Median relative depth and round-trip pixel reprojection errors over frame pairs (both ways)."""
    t, h, w = depth.shape
    rng = np.random.default_rng(seed)
    static = (
        np.asarray(valid, bool) if dynamic_mask is None else np.asarray(valid, bool) & ~np.asarray(dynamic_mask, bool)
    )
    pairs = default_pairs(t) if pairs is None else pairs
    rel_all, px_all, per_pair = [], [], []
    n_sampled = 0
    baseline_ratio = []
    for i0, j0 in pairs:
        for i, j in ((i0, j0), (j0, i0)):
            rows, cols = sample_pixels(static[i], max_points, rng)
            if rows.size == 0:
                continue
            n_sampled += rows.size
            u, v = cols + 0.5, rows + 0.5
            z = depth[i, rows, cols].astype(np.float64)
            r_ji, t_ji = relative_pose(c2w[i], c2w[j])
            xj = lift(u, v, z, intrinsics[i]) @ r_ji.T + t_ji
            uj, vj, zj = to_pixels(xj, intrinsics[j])
            dj, ok = sample_bilinear(depth[j], uj, vj, static[j])
            ok &= zj > 0
            if not np.any(ok):
                per_pair.append({"pair": [int(i), int(j)], "n": 0})
                continue
            rel = np.abs(zj[ok] - dj[ok]) / dj[ok]
            r_ij, t_ij = relative_pose(c2w[j], c2w[i])
            xi = lift(uj[ok], vj[ok], dj[ok], intrinsics[j]) @ r_ij.T + t_ij
            ui, vi, _ = to_pixels(xi, intrinsics[i])
            px = np.hypot(ui - u[ok], vi - v[ok])
            rel_all.append(rel)
            px_all.append(px)
            base = np.linalg.norm(c2w[i, :3, 3] - c2w[j, :3, 3])
            baseline_ratio.append(base / float(np.median(z)))
            per_pair.append(
                {
                    "pair": [int(i), int(j)],
                    "n": int(ok.sum()),
                    "depth_error": float(np.median(rel)),
                    "pixel_error": float(np.median(px)),
                }
            )
    if not rel_all:
        return {
            "depth_error": float("nan"),
            "pixel_error": float("nan"),
            "n_points": 0,
            "coverage": 0.0,
            "baseline_ratio": 0.0,
            "per_pair": per_pair,
        }
    rel = np.concatenate(rel_all)
    px = np.concatenate(px_all)
    return {
        "depth_error": float(np.median(rel)),
        "pixel_error": float(np.median(px)),
        "n_points": int(rel.size),
        "coverage": float(rel.size / max(n_sampled, 1)),
        "baseline_ratio": float(np.max(baseline_ratio)),
        "per_pair": per_pair,
    }


def track_drift(tracks: np.ndarray, visible: np.ndarray, static: np.ndarray | None = None) -> dict:
    """3D drift of static tracks: per track the median distance of its visible positions from
    their median position (metres); the median over tracks is reported."""
    tr = np.asarray(tracks, np.float64)
    vis = np.asarray(visible, bool) & np.all(np.isfinite(tr), axis=-1)
    if static is not None:
        vis &= np.asarray(static, bool)[None, :]
    use = vis.sum(axis=0) >= 2
    if not np.any(use):
        return {"track_drift_m": float("nan"), "n_tracks": 0}
    pts = np.where(vis[..., None], tr, np.nan)[:, use]
    centre = np.nanmedian(pts, axis=0)
    dist = np.linalg.norm(pts - centre[None], axis=-1)
    per_track = np.nanmedian(dist, axis=0)
    return {"track_drift_m": float(np.median(per_track)), "n_tracks": int(use.sum())}


def track_depth_error(
    tracks: np.ndarray,
    visible: np.ndarray,
    depth: np.ndarray,
    valid: np.ndarray,
    intrinsics: np.ndarray,
    c2w: np.ndarray,
) -> dict:
    """Median relative disagreement between tracked points' camera depth and the depth map."""
    tr = np.asarray(tracks, np.float64)
    errs = []
    for f in range(tr.shape[0]):
        ok = np.asarray(visible[f], bool) & np.all(np.isfinite(tr[f]), axis=-1)
        if not np.any(ok):
            continue
        uv, z = geo.project(tr[f][ok], intrinsics[f], c2w[f])
        d, good = sample_bilinear(depth[f], uv[:, 0], uv[:, 1], valid[f])
        good &= z > 0
        if np.any(good):
            errs.append(np.abs(z[good] - d[good]) / d[good])
    if not errs:
        return {"track_depth_error": float("nan"), "n": 0}
    e = np.concatenate(errs)
    return {"track_depth_error": float(np.median(e)), "n": int(e.size)}


@dataclass
class ConsistencyResult:
    depth_error: float
    pixel_error: float
    n_points: int
    coverage: float
    baseline_ratio: float
    track_drift_m: float | None = None
    track_depth_error: float | None = None
    scale_factor: float | None = None  # best multiplier of the translations (1 = consistent)
    scale_observability: float | None = None
    flagged: bool = False
    reasons: list[str] = field(default_factory=list)
    per_pair: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "depth_error": self.depth_error,
            "pixel_error": self.pixel_error,
            "n_points": self.n_points,
            "coverage": self.coverage,
            "baseline_ratio": self.baseline_ratio,
            "track_drift_m": self.track_drift_m,
            "track_depth_error": self.track_depth_error,
            "scale_factor": self.scale_factor,
            "scale_observability": self.scale_observability,
            "flagged": self.flagged,
            "reasons": list(self.reasons),
        }


def check_consistency(
    depth: np.ndarray,
    valid: np.ndarray,
    intrinsics: np.ndarray,
    c2w: np.ndarray,
    *,
    dynamic_mask: np.ndarray | None = None,
    tracks: np.ndarray | None = None,
    track_visible: np.ndarray | None = None,
    static_tracks: np.ndarray | None = None,
    max_depth_error: float = 0.05,
    max_pixel_error: float = 2.0,
    max_track_depth_error: float = 0.1,
    pairs: list[tuple[int, int]] | None = None,
    rgb: np.ndarray | None = None,
    scale_check: bool = True,
    max_scale_factor: float = 1.1,
    min_observability: float = 0.05,
    max_points: int = 4000,
    seed: int = 0,
) -> ConsistencyResult:
    """Reprojection consistency of a clip; ``flagged`` with reasons where a threshold is exceeded.

    Besides the median errors, with ``scale_check`` the translation multiplier ``k`` in [1/4, 4]
    minimising :class:`ReprojectionCost` (depth, and colour when ``rgb`` is given) is found: a
    clip whose poses and depth agree has ``k ~= 1``; ``max(k, 1/k) > max_scale_factor`` flags it.
    Depth-only residuals are blind to motion parallel to planar surfaces, so pass ``rgb``.
    The check is skipped (not flagged) when the cost barely depends on ``k`` (tiny baseline).
    """
    r = depth_reprojection_error(
        depth, valid, intrinsics, c2w, dynamic_mask=dynamic_mask, pairs=pairs, max_points=max_points, seed=seed
    )
    out = ConsistencyResult(
        depth_error=r["depth_error"],
        pixel_error=r["pixel_error"],
        n_points=r["n_points"],
        coverage=r["coverage"],
        baseline_ratio=r["baseline_ratio"],
        per_pair=r["per_pair"],
    )
    if r["n_points"] == 0:
        out.reasons.append("no reprojected point landed on valid depth")
    else:
        if r["depth_error"] > max_depth_error:
            out.reasons.append(f"depth reprojection error {r['depth_error']:.3f} > {max_depth_error}")
        if r["pixel_error"] > max_pixel_error:
            out.reasons.append(f"pixel reprojection error {r['pixel_error']:.2f} px > {max_pixel_error}")
    if scale_check and r["n_points"] > 0:
        cost = ReprojectionCost(
            depth,
            valid,
            intrinsics,
            c2w,
            rgb=rgb,
            exclude=dynamic_mask,
            pairs=default_pairs(depth.shape[0], 8) if pairs is None else pairs,
            max_points=min(max_points, 800),
            seed=seed,
        )
        k, best, _ = cost.search(0.25, 4.0, grid=29, tol=1e-3)
        zero = cost(0.0)
        obs = float((zero - best) / max(zero, 1e-12))
        out.scale_observability = obs
        if obs >= min_observability:
            out.scale_factor = k
            if max(k, 1.0 / k) > max_scale_factor:
                out.reasons.append(
                    f"poses and depth disagree in scale: translations fit best x{k:.3f} (> x{max_scale_factor} off)"
                )
    if tracks is not None and track_visible is not None:
        out.track_drift_m = track_drift(tracks, track_visible, static_tracks)["track_drift_m"]
        e = track_depth_error(tracks, track_visible, depth, valid, intrinsics, c2w)["track_depth_error"]
        out.track_depth_error = e
        if np.isfinite(e) and e > max_track_depth_error:
            out.reasons.append(f"track depth error {e:.3f} > {max_track_depth_error}")
    out.flagged = bool(out.reasons)
    return out
