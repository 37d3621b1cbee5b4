"""Robust least-squares alignment of a relative depth prediction to a metric reference.

Model (default): in disparity (inverse depth) space the metric disparity ``y = 1/d_ref`` is an
affine function of the predicted relative disparity ``x``::

    y ~= s * x + b          (one (s, b) per clip: temporally consistent)

``s`` and ``b`` minimise ``sum_i w_i * rho(s x_i + b - y_i)`` where the weights ``w_i`` come from
iteratively re-weighted least squares (IRLS) with a Huber or Tukey biweight function of the
residual divided by a robust scale (1.4826 * median |r|). Each IRLS step is the closed-form
solution of the weighted normal equations (centred form, so it is well conditioned):

    s = sum w (x - xm)(y - ym) / sum w (x - xm)^2,     b = ym - s xm     (xm, ym weighted means)

Options: per-frame pairs (``per_frame``), depth space (``space="depth"``: ``d_ref ~= s x + b``
with ``x`` the predicted depth), scale only (``b = 0``), and a RANSAC initialisation over random
two-point (one-point for scale-only) minimal subsets. Tukey IRLS is started from the Huber
solution (Tukey is not convex and needs a good start). Everything is vectorised over frames;
the fit sees at most ``max_fit_points`` random valid pixels per group, the result is applied to
every pixel.

Depth limits (``min_depth``, ``max_depth``: the dataset's) act on the reference through the
prediction: after a first fit, reference points the fit places beyond them leave it and the fit
is repeated (cutting on the reference's own noisy values would select its errors). The output
keeps depth only up to ``far_factor`` times the reference's 99th percentile (and ``max_depth``):
beyond is extrapolation, typically sky. Any number of frames: masks and output are built in
chunks of whole frames and the fit sees a uniform subsample.

The quality numbers of :class:`AlignResult` are measured in the space the reference's noise
lives in (a stereo reference's noise is about constant in disparity): the systematic error per
prediction bin, the disagreement beyond the reference's own noise, a noise-aware delta<1.25 and
the correlation of the fit with the reference (docs/ALIGNMENT.md section 1).

Degenerate inputs raise :class:`AlignmentError` (a :class:`pipeline.clip.ClipError`) with the
reason: too few valid points, a near-constant prediction, a singular system, a non-positive or
non-finite scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.clip import ClipError

_MAD = 1.4826  # median |r| -> standard deviation for Gaussian residuals


class AlignmentError(ClipError):
    """Alignment of one clip failed; ``reason`` says why. The runner records it and moves on."""


class FitOptions(BaseModel):
    """How :func:`fit_alignment` fits. Defaults: one disparity scale+shift per clip, Tukey IRLS."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    space: Literal["disparity", "depth"] = "disparity"
    per_frame: bool = False
    scale_only: bool = False
    robust: Literal["tukey", "huber", "none"] = "tukey"
    huber_c: float = Field(1.345, gt=0)  # in units of the robust sigma
    tukey_c: float = Field(4.685, gt=0)
    relative: bool = False  # residuals divided by |y| (weights 1/y^2): fit relative error
    iters: int = Field(30, ge=1)
    tol: float = 1e-8
    ransac_iters: int = Field(64, ge=0)  # 0 disables the RANSAC initialisation
    ransac_points: int = Field(4096, ge=16)  # points scored per hypothesis
    ransac_thresh: float = Field(0.05, gt=0)  # relative residual |r|/|y| counted as inlier
    residual_bins: int = Field(8, ge=1)  # prediction bins of the systematic residual (AlignResult)
    inlier_k: float = Field(3.0, gt=0)  # final inlier: |r| <= inlier_k * sigma
    sigma_floor: float = Field(1e-3, gt=0)  # robust sigma >= sigma_floor * median |y|
    max_fit_points: int = Field(200_000, ge=16)  # random subsample per group for the fit
    max_total_points: int = Field(2_000_000, ge=16)  # over all groups (per-frame fits of long scenes)
    far_factor: float = Field(2.0, ge=1)  # output depth <= far_factor * the reference's 99th percentile
    min_points: int = Field(64, ge=2)
    min_rel_spread: float = Field(0.02, ge=0)  # std(x)/mean|x| below this: near-constant
    min_depth: float = Field(1e-3, gt=0)  # metres; reference and output outside are invalid
    max_depth: float = Field(1e3, gt=0)
    seed: int = 0


@dataclass
class AlignResult:
    """What :func:`fit_alignment` found, and the aligned metric depth.

    ``scale``/``shift`` are floats for a per-clip fit and ``(T,)`` arrays for a per-frame fit
    (in the fitting space: disparity ``1/m`` or depth ``m``). ``inlier_ratio`` is over the fitted
    points; ``residual`` is the fit's *systematic* relative error: the largest over bins of the
    prediction of ``|mean(s x + b - y) / mean(s x + b)|`` over the bin's inliers (reference noise
    averages out, a prediction that is not affine to the reference does not); ``scatter`` is the RMS
    inlier residual in the noise space of the fit (absolute: divided by median ``|y|``; relative
    fit: of ``r / y``), reported, not gated: it is mostly the reference's own noise;
    ``noise_abs_rel`` is the aligned-vs-reference error in the fit's space and noise model,
    ``sum |s x + b - y| / sum |y|`` (``mean |s x + b - y| / |y|`` for a relative fit) over the
    pixels valid in both: with disparity noise (stereo) the depth AbsRel is dominated by the
    farthest, noisiest reference points, this is not; ``excess_abs_rel`` is what remains of it
    beyond the reference's own noise (``noise_abs_rel - sqrt(2/pi) * sigma``, ``sigma`` the fit's
    robust residual scale made relative): the part of the disagreement that is the alignment's;
    ``noise_delta_1_25`` counts a pixel as agreeing when within 25 % of the reference *or* within
    ``inlier_k`` sigmas of it in the fit's noise model (a stereo point at 18 m is +-50 %);
    ``correlation`` is that of the fitted values with the reference over the inliers (the
    noise-aware numbers trust the fit's sigma; an unrelated prediction inflates it, not this);
    ``abs_rel`` and ``delta_1_25`` compare the aligned depth with the reference on every pixel
    valid in both (outliers of the reference included). ``depth`` (T,H,W) float32 metres is
    valid where ``valid``; elsewhere it is 0.
    """

    scale: float | np.ndarray
    shift: float | np.ndarray
    inlier_ratio: float
    residual: float
    abs_rel: float
    delta_1_25: float
    n_points: int
    depth: np.ndarray
    valid: np.ndarray
    space: str = "disparity"
    per_frame: bool = False
    sigma: float | np.ndarray = 0.0
    valid_ratio: float = 1.0  # output-valid pixels / prediction-valid pixels
    abs_rel_per_frame: np.ndarray = field(default_factory=lambda: np.zeros(0))
    iterations: int = 0
    scatter: float = 0.0
    far_limit_m: float = float("inf")  # aligned depth beyond this is not kept (far-field rule)
    far_field_ratio: float = 0.0  # prediction-valid pixels beyond the reference's far end, left without depth
    noise_abs_rel: float = 0.0  # abs_rel in the fit's space and noise model (see above)
    excess_abs_rel: float = 0.0  # noise_abs_rel beyond what the reference's noise explains (QC gate)
    noise_delta_1_25: float = 1.0  # share within 25 % of the reference or within its noise (QC gate)
    correlation: float = 1.0  # fitted values vs reference over the inliers (QC gate)

    def scale_per_frame(self, num_frames: int) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.scale, dtype=np.float64), (num_frames,)).copy()

    def shift_per_frame(self, num_frames: int) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.shift, dtype=np.float64), (num_frames,)).copy()

    def summary(self) -> dict:
        """JSON-serialisable numbers (no arrays of pixels)."""

        def num(v):
            a = np.asarray(v, dtype=np.float64)
            return float(a) if a.ndim == 0 else [float(x) for x in a]

        return {
            "scale": num(self.scale),
            "shift": num(self.shift),
            "space": self.space,
            "per_frame": self.per_frame,
            "inlier_ratio": float(self.inlier_ratio),
            "residual": float(self.residual),
            "scatter": float(self.scatter),
            "abs_rel": float(self.abs_rel),
            "noise_abs_rel": float(self.noise_abs_rel),
            "excess_abs_rel": float(self.excess_abs_rel),
            "noise_delta_1_25": float(self.noise_delta_1_25),
            "correlation": float(self.correlation),
            "delta_1_25": float(self.delta_1_25),
            "n_points": int(self.n_points),
            "valid_ratio": float(self.valid_ratio),
            "iterations": int(self.iterations),
            "far_limit_m": float(self.far_limit_m),
            "far_field_ratio": float(self.far_field_ratio),
        }


# ----------------------------------------------------------------------------------------------
# Helpers


def _to_space(values: np.ndarray, kind: str, space: str) -> np.ndarray:
    """Express a depth or disparity array in the fitting space (1/v where the kinds differ)."""
    v = np.asarray(values, dtype=np.float64)
    if kind == space:
        return v
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(v > 0, 1.0 / v, np.nan)


def _frame_chunks(num_frames: int, pixels_per_frame: int, max_pixels: int = 262_144):
    """Slices of whole frames holding at most ``max_pixels`` pixels (at least one frame)."""
    step = max(1, max_pixels // max(pixels_per_frame, 1))
    return [slice(i, min(i + step, num_frames)) for i in range(0, num_frames, step)]


def _sample_true(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices of ``n`` random True entries of ``mask`` (F, P) (all if fewer),
    uniformly without replacement: how many come from each frame is one multivariate
    hypergeometric draw, then each frame is sampled on its own, so no index array over every
    valid pixel of a long video is ever built."""
    per_frame = mask.sum(axis=1)
    if int(per_frame.sum()) <= n:
        return np.flatnonzero(mask)
    take = rng.multivariate_hypergeometric(per_frame, n, method="marginals")
    parts = []
    for f in np.flatnonzero(take):
        pos = np.flatnonzero(mask[f])
        parts.append(f * mask.shape[1] + np.sort(rng.choice(pos, int(take[f]), replace=False)))
    return np.concatenate(parts)


def _masked_median(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Median of ``a`` over ``m`` along axis 1 for (G, N) arrays."""
    return np.nanmedian(np.where(m, a, np.nan), axis=1)


def _solve(x, y, w, scale_only: bool):
    """Weighted LS per group (rows). Returns s, b, sxx (the centred weighted spread)."""
    sw = w.sum(axis=1)
    if scale_only:
        sxx = (w * x * x).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (w * x * y).sum(axis=1) / sxx
        return s, np.zeros_like(s), sxx
    with np.errstate(divide="ignore", invalid="ignore"):
        xm = (w * x).sum(axis=1) / sw
        ym = (w * y).sum(axis=1) / sw
        dx = x - xm[:, None]
        sxx = (w * dx * dx).sum(axis=1)
        s = (w * dx * (y - ym[:, None])).sum(axis=1) / sxx
        b = ym - s * xm
    return s, b, sxx


def _weights(u: np.ndarray, kind: str) -> np.ndarray:
    au = np.abs(u)
    if kind == "huber":
        with np.errstate(divide="ignore"):
            return np.where(au <= 1.0, 1.0, 1.0 / np.maximum(au, 1e-300))
    if kind == "tukey":
        return np.where(au < 1.0, (1.0 - u * u) ** 2, 0.0)
    return np.ones_like(u)


def _systematic_error(x, y, raw, inl, bins: int, min_bin: int = 32) -> float:
    """Largest relative error of the fitted line against the reference over prediction bins.

    Per group, the inliers are split into up to ``bins`` equal-count bins (at least ``min_bin``
    points each) of the prediction ``x``; in each bin ``|mean(s x + b - y) / mean(s x + b)|`` is
    the relative error of the fit there (to first order the relative depth error of that depth
    band, in either fitting space; a bin whose fitted value is not positive counts as infinite).
    Zero-mean noise of the reference averages out within a bin, a prediction that is not
    affine to the reference does not. Binning on ``x``, not on the noisy ``y``, keeps
    regression to the mean out of it.
    """
    worst = 0.0
    for g in range(x.shape[0]):
        idx = np.flatnonzero(inl[g])
        if idx.size == 0:
            return float("inf")
        k = max(1, min(bins, idx.size // min_bin))
        order = idx[np.argsort(x[g, idx], kind="stable")]
        for part in np.array_split(order, k):
            fitted = (raw[g, part] + y[g, part]).mean()
            err = abs(raw[g, part].mean() / fitted) if fitted > 0 else float("inf")
            worst = max(worst, err)
    return float(worst)


def _correlation(f, y, inl) -> float:
    """Pearson correlation of the fitted values with the reference over the inliers (all groups).

    The noise-aware checks measure the residuals against the fit's own robust sigma; a
    prediction unrelated to the reference gives a flat fit whose sigma is the reference's whole
    spread, and passes them. It does not pass this: the fit must reproduce the reference's
    variation (with zero-mean reference noise the correlation is the share of the spread that
    is signal, 0.96 for Stereo4D-like noise over 2-20 m)."""
    fv, yv = f[inl], y[inl]
    if fv.size < 3 or not (fv.std() > 0 and yv.std() > 0):
        return 0.0
    return float(np.corrcoef(fv, yv)[0, 1])


def _scatter(y, raw, inl, relative: bool) -> float:
    """RMS inlier residual in the space the fit assumes the noise lives in: relative to ``y``
    for a relative fit, else absolute, divided by the median ``|y|`` to make it dimensionless."""
    if not np.any(inl):
        return float("inf")
    if relative:
        return float(np.sqrt(np.mean((raw[inl] / y[inl]) ** 2)))
    return float(np.sqrt(np.mean(raw[inl] ** 2)) / np.median(np.abs(y[inl])))


def _where(g: int, per_frame: bool) -> str:
    return f" in frame {g}" if per_frame else ""


def _ransac_init(x, y, m, opts: FitOptions, rng) -> np.ndarray:
    """Inlier masks (G, N) of the best minimal-subset hypothesis per group."""
    g_count, n = x.shape
    init = m.copy()
    k = opts.ransac_iters
    for g in range(g_count):
        idx = np.flatnonzero(m[g])
        if idx.size < 2:
            continue
        i1 = rng.choice(idx, size=k)
        if opts.scale_only:
            with np.errstate(divide="ignore", invalid="ignore"):
                s_h = y[g, i1] / x[g, i1]
            b_h = np.zeros_like(s_h)
        else:
            i2 = rng.choice(idx, size=k)
            with np.errstate(divide="ignore", invalid="ignore"):
                s_h = (y[g, i1] - y[g, i2]) / (x[g, i1] - x[g, i2])
                b_h = y[g, i1] - s_h * x[g, i1]
        ok = np.isfinite(s_h) & np.isfinite(b_h) & (s_h > 0)
        if not np.any(ok):
            continue
        s_h, b_h = s_h[ok], b_h[ok]
        score_idx = idx if idx.size <= opts.ransac_points else rng.choice(idx, opts.ransac_points, replace=False)
        xs, ys = x[g, score_idx], y[g, score_idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(s_h[:, None] * xs[None] + b_h[:, None] - ys[None]) / np.abs(ys[None])
        count = (rel < opts.ransac_thresh).sum(axis=1)
        best = int(np.argmax(count))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel_all = np.abs(s_h[best] * x[g] + b_h[best] - y[g]) / np.abs(y[g])
        inl = m[g] & (rel_all < opts.ransac_thresh)
        if inl.sum() >= max(opts.min_points, 2):
            init[g] = inl
    return init


# ----------------------------------------------------------------------------------------------
# The fit


def _robust_fit(x, y, wb, m, opts: FitOptions, rng):
    """RANSAC start + IRLS on the (G, N) samples; returns s, b, sxx, r, sig, iterations, mx."""
    groups = x.shape[0]
    # Degeneracy: the prediction must vary (scale+shift) and be non-zero (scale only).
    mx = _masked_median(np.abs(x), m)
    spread = np.sqrt(
        np.nanmean(np.where(m, (x - np.nanmean(np.where(m, x, np.nan), axis=1)[:, None]) ** 2, np.nan), axis=1)
    )
    for g in range(groups):
        if not mx[g] > 0:
            raise AlignmentError(f"prediction is zero on all valid points{_where(g, opts.per_frame)}")
        if not opts.scale_only and spread[g] < opts.min_rel_spread * mx[g]:
            raise AlignmentError(
                f"near-constant prediction{_where(g, opts.per_frame)}: relative spread "
                f"{spread[g] / mx[g]:.2e} < {opts.min_rel_spread}; scale and shift are not identifiable"
            )

    y_abs = np.abs(y)
    rnorm = np.where(m, 1.0 / np.maximum(y_abs, 1e-12), 0.0) if opts.relative else np.ones_like(y)
    floor = opts.sigma_floor * (1.0 if opts.relative else _masked_median(y_abs, m))
    floor = np.broadcast_to(floor, (groups,))

    def step(weight_rows):
        s_, b_, sxx_ = _solve(x, y, weight_rows * wb * rnorm**2, opts.scale_only)
        r_ = (s_[:, None] * x + b_[:, None] - y) * rnorm
        sig_ = np.maximum(_MAD * _masked_median(np.abs(r_), m), floor)
        return s_, b_, sxx_, r_, sig_

    # Huber is convex: from any start it reaches the same optimum, which high-leverage outliers
    # (gross errors in the prediction) can still pull. Tukey is not convex: it needs a good start,
    # the RANSAC consensus set when there is one, else the Huber optimum.
    use_ransac = opts.ransac_iters > 0 and opts.robust != "none"
    schedule = []
    if opts.robust == "huber":
        schedule = [("huber", opts.huber_c)] * opts.iters
    elif opts.robust == "tukey":
        schedule = ([] if use_ransac else [("huber", opts.huber_c)] * opts.iters) + [
            ("tukey", opts.tukey_c)
        ] * opts.iters
    wt = (_ransac_init(x, y, m, opts, rng) if use_ransac else m).astype(np.float64)
    s, b, sxx, r, sig = step(wt)
    it_done = 0
    prev_kind = None
    for kind, c in schedule:
        if kind != prev_kind:
            prev_kind, converged = kind, False
        elif converged:
            continue
        new_w = _weights(r / (c * sig[:, None]), kind) * m
        if np.any((new_w > 0).sum(axis=1) < opts.min_points):
            break  # keep the last well-posed solution
        s_new, b_new, sxx, r, sig = step(new_w)
        it_done += 1
        ds = np.abs(s_new - s) / np.maximum(np.abs(s), 1e-300)
        db = np.abs(b_new - b) / np.maximum(np.abs(s) * mx, 1e-300)
        s, b, wt = s_new, b_new, new_w
        converged = bool(np.all(ds < opts.tol) and np.all(db < opts.tol))

    for g in range(groups):
        if not np.isfinite(s[g]) or not np.isfinite(b[g]):
            raise AlignmentError(f"singular alignment system{_where(g, opts.per_frame)}: non-finite scale/shift")
        if not sxx[g] > 0:
            raise AlignmentError(f"singular alignment system{_where(g, opts.per_frame)}")
        if s[g] <= 0:
            raise AlignmentError(
                f"non-positive scale {s[g]:.3g}{_where(g, opts.per_frame)}: the prediction is "
                f"anti-correlated with the reference (wrong disparity/depth flag?)"
            )

    return s, b, sxx, r, sig, it_done, mx


def fit_alignment(
    prediction: np.ndarray,
    ref_depth: np.ndarray,
    ref_valid: np.ndarray | None = None,
    *,
    prediction_kind: Literal["disparity", "depth"] = "disparity",
    prediction_valid: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    options: FitOptions | None = None,
) -> AlignResult:
    """Align a relative ``prediction`` (T,H,W) to metric ``ref_depth`` (T,H,W, metres).

    ``prediction_kind`` says whether the prediction is a (relative) disparity or depth.
    ``ref_valid`` marks usable reference pixels (sparse references: few True); non-finite or
    ``<= min_depth`` reference values are ignored too, and reference points that the fit places
    beyond ``max_depth`` leave it (module docstring). Any number of frames. ``prediction_valid``
    marks usable prediction pixels; ``exclude`` (sky, dynamic, ...) removes pixels from both the
    fit and the output. ``weights`` are optional per-pixel confidences of the reference.
    """
    opts = options or FitOptions()
    pred = np.asarray(prediction)
    ref = np.asarray(ref_depth)
    if pred.ndim != 3:
        raise AlignmentError(f"prediction must be (T,H,W), got {pred.shape}")
    if ref.shape != pred.shape:
        raise AlignmentError(f"reference depth {ref.shape} does not match prediction {pred.shape}")
    t, h, w = pred.shape
    shape = pred.shape

    def mask(a, name):
        if a is None:
            return None
        a = np.asarray(a, dtype=bool)
        if a.shape != shape:
            raise AlignmentError(f"{name} {a.shape} does not match prediction {shape}")
        return a

    pv, ex, rv = mask(prediction_valid, "prediction_valid"), mask(exclude, "exclude"), mask(ref_valid, "ref_valid")
    base_w = None if weights is None else np.asarray(weights)
    if base_w is not None and base_w.shape != shape:
        raise AlignmentError(f"weights {base_w.shape} do not match prediction {shape}")

    # Masks in frame chunks: no full-size float64 copy of a scene-length video is ever made.
    pred_ok = np.empty(shape, bool)
    ref_ok = np.empty(shape, bool)
    for sl in _frame_chunks(t, h * w):
        xs = _to_space(pred[sl], prediction_kind, opts.space)
        ok = np.isfinite(xs)
        if pv is not None:
            ok &= pv[sl]
        if ex is not None:
            ok &= ~ex[sl]
        if opts.space == "depth" or prediction_kind == "depth":
            ok &= xs > 0
        pred_ok[sl] = ok
        r = ref[sl].astype(np.float64)
        with np.errstate(invalid="ignore"):
            rok = np.isfinite(r) & (r > opts.min_depth)  # max_depth acts through the prediction (below)
        ref_ok[sl] = rok if rv is None else rok & rv[sl]
    fit_ok = pred_ok & ref_ok
    if base_w is not None:
        with np.errstate(invalid="ignore"):
            fit_ok &= np.isfinite(base_w) & (base_w > 0)

    # Gather at most max_fit_points random valid points per group into (G, N) arrays (and at most
    # max_total_points over all groups: a per-frame fit of a long scene stays small).
    groups = t if opts.per_frame else 1
    rng = np.random.default_rng(opts.seed)
    group_size = (t // groups) * h * w
    counts = fit_ok.reshape(groups, -1).sum(axis=1)
    for g in range(groups):
        if counts[g] < opts.min_points:
            raise AlignmentError(
                f"too few valid points{_where(g, opts.per_frame)}: {int(counts[g])} < {opts.min_points}"
            )
    per_group_cap = max(opts.min_points, opts.max_total_points // groups)
    n_max = int(min(counts.max(), opts.max_fit_points, per_group_cap))
    x = np.zeros((groups, n_max))
    y = np.ones((groups, n_max))
    wb = np.zeros((groups, n_max))
    m = np.zeros((groups, n_max), bool)
    pred_flat, ref_flat = pred.reshape(-1), ref.reshape(-1)
    for g in range(groups):
        idx = _sample_true(fit_ok.reshape(groups, t // groups, h * w)[g], n_max, rng)
        k = idx.size
        gidx = g * group_size + idx
        x[g, :k] = _to_space(pred_flat[gidx], prediction_kind, opts.space)
        y[g, :k] = _to_space(ref_flat[gidx], "depth", opts.space)
        wb[g, :k] = 1.0 if base_w is None else base_w.reshape(-1)[gidx]
        m[g, :k] = True
    s, b, _, r, sig, it_done, _ = _robust_fit(x, y, wb, m, opts, rng)
    # The dataset's depth limits act on the reference through the prediction: points the fit puts
    # outside [min_depth, max_depth] leave it, and it is repeated. Cutting on the reference's own
    # noisy value instead would select its errors (with stereo noise, constant in disparity,
    # points near the limit survive only when their noise made them nearer: aligned depth 10 %
    # short at 12-20 m for Stereo4D's 20 m limit).
    with np.errstate(divide="ignore", invalid="ignore"):
        fitted_pts = s[:, None] * x + b[:, None]
        fd = 1.0 / fitted_pts if opts.space == "disparity" else fitted_pts
        in_range = m & np.isfinite(fd) & (fd > opts.min_depth) & (fd <= opts.max_depth)
    if np.any(in_range != m) and np.all(in_range.sum(axis=1) >= opts.min_points):
        m = in_range
        s, b, _, r, sig, it_done2, _ = _robust_fit(x, y, wb, m, opts, rng)
        it_done += it_done2
    n_points = int(m.sum())

    inl = m & (np.abs(r) <= opts.inlier_k * sig[:, None])
    inlier_ratio = float(inl.sum() / max(n_points, 1))
    raw = s[:, None] * x + b[:, None] - y
    residual = _systematic_error(x, y, raw, inl, opts.residual_bins)
    scatter = _scatter(y, raw, inl, opts.relative)
    correlation = _correlation(s[:, None] * x + b[:, None], y, inl)

    # The far field: the reference supports depths up to its 99th percentile (inliers); aligned
    # depth beyond far_factor times that, or beyond max_depth, is extrapolation (sky, a shift a
    # hair too large) and is not kept. Pixels whose prediction lies beyond the fitted far end
    # and get no depth are "far field" and do not count against valid_ratio.
    y_inl = y[inl]
    ref_depth_inl = 1.0 / y_inl if opts.space == "disparity" else y_inl
    far_limit = (
        float(min(opts.max_depth, opts.far_factor * np.percentile(ref_depth_inl, 99))) if y_inl.size else opts.max_depth
    )
    x_inl = x[inl]
    far_is_low_x = opts.space == "disparity"
    x_edge = (
        float(np.percentile(x_inl, 1 if far_is_low_x else 99)) if x_inl.size else (-np.inf if far_is_low_x else np.inf)
    )

    # Apply to every pixel, frame chunk by frame chunk.
    frames_per_group = t // groups
    depth = np.zeros(shape, np.float32)
    valid = np.zeros(shape, bool)
    rel_sum_t = np.zeros(t)
    cnt_t = np.zeros(t, np.int64)
    delta_cnt = 0
    far_count = 0
    noise_num = noise_den = 0.0
    noise_delta_cnt = 0
    for sl in _frame_chunks(t, h * w):
        frames = np.arange(t)[sl]
        s_t = s[frames // frames_per_group][:, None, None]
        b_t = b[frames // frames_per_group][:, None, None]
        xs = _to_space(pred[sl], prediction_kind, opts.space)
        ok = pred_ok[sl]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            fitted = s_t * np.where(ok, xs, 0.0) + b_t
            d = 1.0 / fitted if opts.space == "disparity" else fitted
            v = ok & np.isfinite(d) & (d > opts.min_depth) & (d <= far_limit)
            beyond = (xs < x_edge) if far_is_low_x else (xs > x_edge)
        far_count += int((ok & ~v & beyond).sum())
        d32 = np.where(v, d, 0.0).astype(np.float32)
        depth[sl], valid[sl] = d32, v
        cmp = v & ref_ok[sl]
        ref_c = np.where(cmp, ref[sl].astype(np.float64), 1.0)
        d64 = d32.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(cmp, np.abs(d64 - ref_c) / ref_c, 0.0)
            ratio = np.where(cmp, np.maximum(d64 / ref_c, ref_c / np.where(cmp, d64, 1.0)), np.inf)
        rel_sum_t[sl] = rel.sum(axis=(1, 2))
        cnt_t[sl] = cmp.sum(axis=(1, 2))
        delta_cnt += int(((ratio < 1.25) & cmp).sum())
        # The same comparison in the fit's space and noise model (see AlignResult.noise_abs_rel).
        with np.errstate(divide="ignore", invalid="ignore"):
            f_sp = np.where(cmp, fitted, 0.0)
            y_sp = np.where(cmp, 1.0 / ref_c if opts.space == "disparity" else ref_c, 1.0)
            dev = np.where(cmp, np.abs(f_sp - y_sp), 0.0)
        sig_t = sig[frames // frames_per_group][:, None, None]
        tol = opts.inlier_k * sig_t * (np.abs(y_sp) if opts.relative else 1.0)
        noise_delta_cnt += int((((ratio < 1.25) | (dev <= tol)) & cmp).sum())
        if opts.relative:
            noise_num += float((dev / np.abs(y_sp)).sum())
            noise_den += float(cmp.sum())
        else:
            noise_num += float(dev.sum())
            noise_den += float(np.where(cmp, np.abs(y_sp), 0.0).sum())
    n_pred = int(pred_ok.sum())
    far_field_ratio = far_count / max(n_pred, 1)
    valid_ratio = float(valid.sum() / max(n_pred - far_count, 1))

    if cnt_t.sum() == 0:
        raise AlignmentError("no pixel is valid in both the aligned depth and the reference")
    abs_rel_t = np.where(cnt_t > 0, rel_sum_t / np.maximum(cnt_t, 1), np.nan)
    abs_rel = float(rel_sum_t.sum() / cnt_t.sum())
    delta = float(delta_cnt / cnt_t.sum())
    noise_abs_rel = noise_num / noise_den if noise_den > 0 else float("inf")
    # What the reference's own noise alone would give: E|n| = sqrt(2/pi) sigma for Gaussian noise,
    # sigma the fit's robust residual scale (relative fit: already relative; else over mean |y|).
    sigma_rel = float(np.mean(sig)) if opts.relative else float(np.mean(sig) / max(np.abs(y[inl]).mean(), 1e-300))
    excess_abs_rel = max(0.0, noise_abs_rel - np.sqrt(2 / np.pi) * sigma_rel)
    noise_delta = float(noise_delta_cnt / cnt_t.sum())

    if opts.per_frame:
        scale_out, shift_out, sigma_out = s.copy(), b.copy(), sig.copy()
    else:
        scale_out, shift_out, sigma_out = float(s[0]), float(b[0]), float(sig[0])
    return AlignResult(
        scale=scale_out,
        shift=shift_out,
        inlier_ratio=inlier_ratio,
        residual=residual,
        scatter=scatter,
        abs_rel=abs_rel,
        delta_1_25=delta,
        n_points=n_points,
        depth=depth,
        valid=valid,
        space=opts.space,
        per_frame=opts.per_frame,
        sigma=sigma_out,
        valid_ratio=valid_ratio,
        abs_rel_per_frame=abs_rel_t,
        iterations=it_done,
        far_limit_m=far_limit,
        noise_abs_rel=noise_abs_rel,
        excess_abs_rel=excess_abs_rel,
        noise_delta_1_25=noise_delta,
        correlation=correlation,
        far_field_ratio=far_field_ratio,
    )


def depth_metrics(depth: np.ndarray, valid: np.ndarray, ref: np.ndarray, ref_valid: np.ndarray) -> dict:
    """AbsRel and delta<1.25 of ``depth`` (T,H,W) against ``ref`` over pixels valid in both."""
    depth, valid, ref, ref_valid = (np.asarray(a) for a in (depth, valid, ref, ref_valid))
    # summed in frame chunks: no temporary of a clip's size (tens of millions of pixels) is made
    abs_rel, close, n = 0.0, 0, 0
    for sl in _frame_chunks(depth.shape[0], int(np.prod(depth.shape[1:]))):
        r = ref[sl]
        with np.errstate(invalid="ignore"):
            cmp = valid[sl].astype(bool) & ref_valid[sl].astype(bool) & np.isfinite(r) & (r > 0)
        d, r = depth[sl][cmp].astype(np.float64), r[cmp].astype(np.float64)
        abs_rel += float(np.sum(np.abs(d - r) / r))
        close += int(np.count_nonzero(np.maximum(d / r, r / d) < 1.25))
        n += int(d.size)
    if not n:
        return {"abs_rel": float("nan"), "delta_1_25": float("nan"), "n": 0}
    return {"abs_rel": abs_rel / n, "delta_1_25": close / n, "n": n}
