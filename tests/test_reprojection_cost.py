"""The alignment's CPU hot spots give what the plain formulas give.

The scale search evaluates :class:`ReprojectionCost` ~50 times per check, over every frame pair at
once, sampling only the frames points land in; ``sample_bilinear`` widens only the gathered
neighbours to float64; ``depth_metrics`` sums frame chunk by frame chunk. Each is checked here
against a direct implementation of its definition (per pair, whole float64 copies, whole arrays).
"""

from __future__ import annotations

import numpy as np
import pytest

from stages.align.consistency import (
    ReprojectionCost,
    default_pairs,
    grey,
    lift,
    relative_pose,
    sample_bilinear,
    sample_pixels,
    to_pixels,
)
from stages.align.fit import depth_metrics


def _scene(t=9, h=30, w=40, seed=0):
    """A camera moving sideways over a slanted plane; random colour; some invalid depth."""
    rng = np.random.default_rng(seed)
    k = np.tile([30.0, 30.0, w / 2, h / 2], (t, 1))
    c2w = np.tile(np.eye(4), (t, 1, 1))
    c2w[:, 0, 3] = np.linspace(0, 0.4, t)
    rows = np.arange(h)[:, None] + 0.5
    depth = np.broadcast_to(2.0 + 0.02 * rows + 0.0 * np.arange(w)[None], (t, h, w)).astype(np.float32)
    depth = depth * rng.uniform(0.98, 1.02, depth.shape).astype(np.float32)
    valid = rng.random((t, h, w)) > 0.05
    rgb = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    return depth, valid, k, c2w, rgb


def _cost_by_definition(depth, valid, k, c2w, rgb, s, *, max_points, seed=0, dt=0.2, pt=0.15, pw=3.0):
    """The cost, pair by pair, on float64 copies of the whole video (its docstring's formula)."""
    d64 = np.asarray(depth, np.float64)
    img = grey(rgb)
    rng = np.random.default_rng(seed)
    total, landed, n = 0.0, 0, 0
    for i0, j0 in default_pairs(depth.shape[0]):
        for i, j in ((i0, j0), (j0, i0)):
            rows, cols = sample_pixels(valid[i], max_points, rng)
            r_ji, t_ji = relative_pose(c2w[i], c2w[j])
            a = lift(cols + 0.5, rows + 0.5, d64[i, rows, cols], k[i]) @ r_ji.T
            uj, vj, zj = to_pixels(a + s * t_ji, k[j])
            dj, ok = sample_bilinear(d64[j], uj, vj, valid[j])
            ok &= zj > 0
            ij, _ = sample_bilinear(img[j], uj, vj)
            n += rows.size
            landed += int(ok.sum())
            with np.errstate(divide="ignore", invalid="ignore"):
                total += np.where(ok, np.minimum(np.abs(zj - dj) / dj, dt), 0.0).sum() / dt
            total += pw * np.where(ok, np.minimum(np.abs(ij - img[i, rows, cols]), pt), 0.0).sum() / pt
    return total / landed, n


@pytest.mark.parametrize("s", [0.0, 0.5, 1.0, 1.7])
def test_the_cost_over_all_pairs_at_once_is_the_sum_over_pairs(s):
    depth, valid, k, c2w, rgb = _scene()
    cost = ReprojectionCost(depth, valid, k, c2w, rgb=rgb, max_points=50)
    want, n = _cost_by_definition(depth, valid, k, c2w, rgb, s, max_points=50)
    assert cost.n_points == n
    assert cost(s) == pytest.approx(want, rel=1e-12)


def test_sampling_a_stack_by_frame_index_is_sampling_each_frame():
    depth, valid, *_ = _scene(t=5)
    rng = np.random.default_rng(1)
    f = rng.integers(0, 5, 300)
    u, v = rng.uniform(-2, 42, 300), rng.uniform(-2, 32, 300)
    got, ok = sample_bilinear(depth, u, v, valid, frame=f)
    for j in range(5):
        sel = f == j
        want, want_ok = sample_bilinear(np.asarray(depth[j], np.float64), u[sel], v[sel], valid[j])
        np.testing.assert_array_equal(ok[sel], want_ok)
        np.testing.assert_array_equal(got[sel], want)  # the same numbers, not merely close


def test_sampling_float32_gives_the_numbers_of_a_float64_copy():
    depth, *_ = _scene(t=1)
    rng = np.random.default_rng(2)
    u, v = rng.uniform(0, 40, 500), rng.uniform(0, 30, 500)
    a, _ = sample_bilinear(depth[0], u, v)
    b, _ = sample_bilinear(depth[0].astype(np.float64), u, v)
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, b)


def test_depth_metrics_in_frame_chunks_match_the_whole_array_formula():
    rng = np.random.default_rng(3)
    shape = (7, 300, 400)  # more pixels than one chunk: several chunks are summed
    ref = rng.uniform(1, 10, shape).astype(np.float32)
    ref[0, :5] = np.nan
    ref[1, :5] = 0.0
    depth = (ref * rng.uniform(0.7, 1.4, shape)).astype(np.float32)
    valid, ref_valid = rng.random(shape) > 0.1, rng.random(shape) > 0.2
    m = depth_metrics(depth, valid, ref, ref_valid)
    with np.errstate(invalid="ignore"):
        cmp = valid & ref_valid & np.isfinite(ref) & (ref > 0)
    d, r = depth[cmp].astype(np.float64), ref[cmp].astype(np.float64)
    assert m["n"] == int(cmp.sum())
    assert m["abs_rel"] == pytest.approx(np.mean(np.abs(d - r) / r), rel=1e-12)
    assert m["delta_1_25"] == pytest.approx(np.mean(np.maximum(d / r, r / d) < 1.25), rel=1e-12)
    none = depth_metrics(depth, np.zeros(shape, bool), ref, ref_valid)
    assert none["n"] == 0 and np.isnan(none["abs_rel"])
