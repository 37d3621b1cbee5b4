"""Robust scale+shift alignment (stages/align/fit.py) on rendered truth with known distortions."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from pipeline.clip import ClipError
from pipeline.demo.render import random_scene, render
from stages.align.fit import AlignmentError, FitOptions, fit_alignment

A, C = 2.5, 0.3  # relative disparity = A / depth + C  ->  metric disparity = x / A - C / A
S_TRUE, B_TRUE = 1 / A, -C / A


@functools.lru_cache(maxsize=None)
def scene():
    return render(random_scene("align_fit", seed=0, dynamic=False, num_frames=8, height=48, width=64))


def corrupted(seed=1, pred_noise=0.005, ref_noise=0.01, outliers=0.2):
    """Prediction with the known affine disparity distortion, noisy reference; 20 % gross outliers
    in *both* (random pixels; in the prediction they are high-leverage values)."""
    d = scene().depth.astype(np.float64)
    rng = np.random.default_rng(seed)
    x = (A / d + C) * (1 + pred_noise * rng.standard_normal(d.shape))
    ref = d * (1 + ref_noise * rng.standard_normal(d.shape))
    bad_x = rng.random(d.shape) < outliers
    bad_r = rng.random(d.shape) < outliers
    x = np.where(bad_x, rng.uniform(0.0, 2 * x.max(), d.shape), x)
    ref = np.where(bad_r, rng.uniform(0.3, 20.0, d.shape), ref)
    return d, x, ref, bad_x


def abs_rel(depth, valid, truth, mask=None):
    m = valid if mask is None else valid & mask
    return float(np.mean(np.abs(depth[m] - truth[m]) / truth[m]))


def test_scale_shift_recovered_with_outliers():
    d, x, ref, bad_x = corrupted()
    res = fit_alignment(x, ref)  # defaults: disparity, one pair per clip, RANSAC + Tukey IRLS
    assert isinstance(res.scale, float)
    assert abs(res.scale / S_TRUE - 1) < 0.01
    assert abs(res.shift / B_TRUE - 1) < 0.01
    # Aligned depth vs truth on pixels whose prediction is not a gross outlier.
    err = abs_rel(res.depth, res.valid, d, ~bad_x)
    assert err < 0.02
    assert res.depth.shape == d.shape and res.depth.dtype == np.float32
    assert 0.55 < res.inlier_ratio < 0.75  # ~0.8 * 0.8 of the points are clean
    assert res.residual < 0.03
    # prediction outliers that the fit puts beyond the depth limits leave it (second pass)
    assert 0.9 * d.size < res.n_points <= d.size


def test_huber_alone_is_pulled_by_leverage_outliers_tukey_is_not():
    d, x, ref, _ = corrupted()
    huber = fit_alignment(x, ref, options=FitOptions(robust="huber"))
    tukey = fit_alignment(x, ref, options=FitOptions(robust="tukey", ransac_iters=0))
    plain = fit_alignment(x, ref, options=FitOptions(robust="none"))
    ransac = fit_alignment(x, ref)
    assert abs(ransac.scale / S_TRUE - 1) < 0.01
    assert abs(plain.scale / S_TRUE - 1) > 0.2
    assert abs(huber.scale / S_TRUE - 1) > 0.2  # documented: use the default (RANSAC + Tukey)
    assert tukey.scale is not None


def test_outliers_in_reference_only():
    d, x, ref, _ = corrupted(pred_noise=0.005, outliers=0.0)
    rng = np.random.default_rng(5)
    bad = rng.random(d.shape) < 0.2
    ref = np.where(bad, rng.uniform(0.3, 20.0, d.shape), d * (1 + 0.01 * rng.standard_normal(d.shape)))
    for robust in ("tukey", "huber"):
        res = fit_alignment(x, ref, options=FitOptions(robust=robust))
        assert abs(res.scale / S_TRUE - 1) < 0.01, robust
        assert abs_rel(res.depth, res.valid, d) < 0.02, robust
        assert res.abs_rel > 0.1  # measured against the corrupted reference, outliers included


def test_per_frame_recovers_flickering_predictions():
    d = scene().depth.astype(np.float64)
    rng = np.random.default_rng(2)
    t = d.shape[0]
    a_t = rng.uniform(1.5, 3.5, t)[:, None, None]
    c_t = rng.uniform(0.1, 0.6, t)[:, None, None]
    x = (a_t / d + c_t) * (1 + 0.005 * rng.standard_normal(d.shape))
    ref = d * (1 + 0.01 * rng.standard_normal(d.shape))
    res = fit_alignment(x, ref, options=FitOptions(per_frame=True))
    assert res.scale.shape == (t,) and res.shift.shape == (t,)
    np.testing.assert_allclose(res.scale, 1 / a_t.ravel(), rtol=0.01)
    np.testing.assert_allclose(res.shift, -(c_t / a_t).ravel(), rtol=0.02)
    assert abs_rel(res.depth, res.valid, d) < 0.02
    clip_fit = fit_alignment(x, ref)  # one pair for the clip cannot follow the flicker
    assert clip_fit.abs_rel > 3 * res.abs_rel


def test_depth_space_and_scale_only():
    d = scene().depth.astype(np.float64)
    rng = np.random.default_rng(3)
    pred_depth = (0.5 * d + 0.8) * (1 + 0.005 * rng.standard_normal(d.shape))
    bad = rng.random(d.shape) < 0.2
    ref = np.where(bad, rng.uniform(0.3, 20.0, d.shape), d)
    res = fit_alignment(pred_depth, ref, prediction_kind="depth", options=FitOptions(space="depth"))
    assert abs(res.scale / 2.0 - 1) < 0.01 and abs(res.shift / -1.6 - 1) < 0.01
    assert abs_rel(res.depth, res.valid, d) < 0.02

    # Scale only: a prediction that is metric up to one factor (e.g. MegaSaM, metric VDA).
    pred = 0.3 * d * (1 + 0.005 * rng.standard_normal(d.shape))
    for space in ("disparity", "depth"):
        r = fit_alignment(pred, ref, prediction_kind="depth", options=FitOptions(space=space, scale_only=True))
        factor = r.scale if space == "depth" else 1 / r.scale
        assert abs(factor / (1 / 0.3) - 1) < 0.01, space
        assert r.shift == 0.0
        assert abs_rel(r.depth, r.valid, d) < 0.02


def test_masks_exclude_sky_and_far():
    d, x, ref, _ = corrupted(outliers=0.0)
    sky = np.zeros(d.shape, bool)
    sky[:, :10] = True
    ref_far = np.where(sky, 5000.0, ref)  # "sky" at 5 km in the reference
    res = fit_alignment(x, ref_far, exclude=sky, options=FitOptions(max_depth=100.0))
    assert not res.valid[sky].any()
    assert abs(res.scale / S_TRUE - 1) < 0.01
    res2 = fit_alignment(x, ref_far, options=FitOptions(max_depth=100.0))  # far reference dropped
    assert abs(res2.scale / S_TRUE - 1) < 0.01


def test_sparse_reference():
    d, x, _, _ = corrupted(outliers=0.0)
    rng = np.random.default_rng(4)
    valid = rng.random(d.shape) < 0.01  # ~30 points per frame, ~245 in the clip
    res = fit_alignment(x, np.where(valid, d, 0.0), valid)
    assert res.n_points == valid.sum()
    assert abs_rel(res.depth, res.valid, d) < 0.02
    assert res.valid.mean() > 0.99  # dense output from a sparse reference


@pytest.mark.parametrize(
    "case,match",
    [
        ("few", "too few valid points"),
        ("constant", "near-constant prediction"),
        ("negative", "non-positive scale"),
        ("nan", "too few valid points"),
        ("frame_few", "in frame 3"),
    ],
)
def test_degenerate_inputs_rejected(case, match):
    d, x, ref, _ = corrupted(outliers=0.0)
    opts = FitOptions()
    valid = None
    if case == "few":
        valid = np.zeros(d.shape, bool)
        valid[0, :3, :3] = True
    elif case == "constant":
        x = np.full(d.shape, 0.7) + 1e-6 * np.random.default_rng(0).standard_normal(d.shape)
    elif case == "negative":
        x = -x  # anti-correlated: e.g. a depth map passed as disparity
        opts = FitOptions(ransac_iters=0)
    elif case == "nan":
        x = np.full(d.shape, np.nan)
    elif case == "frame_few":
        valid = np.ones(d.shape, bool)
        valid[3] = False
        opts = FitOptions(per_frame=True)
    with pytest.raises(AlignmentError, match=match) as e:
        fit_alignment(x, ref, valid, options=opts)
    assert isinstance(e.value, ClipError) and e.value.reason


def test_shape_mismatch_rejected():
    d, x, ref, _ = corrupted(outliers=0.0)
    with pytest.raises(AlignmentError, match="does not match"):
        fit_alignment(x, ref[:, :-1])
