"""Alignment functions on scene-length inputs (hundreds of frames): the fit subsamples pixels and
works in frame chunks, so memory stays a small multiple of the input (issue #20, with #14)."""
from __future__ import annotations

import tracemalloc

import numpy as np

from stages.align.fit import FitOptions, fit_alignment


def video(frames=240, height=96, width=160):
    yy, xx = np.mgrid[0:height, 0:width]
    base = (2.0 + 4.0 * yy / height + xx / width).astype(np.float32)
    depth = base[None] * (1 + 0.5 * np.arange(frames, dtype=np.float32)[:, None, None] / frames)
    rng = np.random.default_rng(0)
    pred = ((2.5 / depth + 0.3) * (1 + 0.003 * rng.standard_normal(depth.shape))).astype(np.float32)
    return pred, depth


def test_scene_length_fit_is_accurate_and_bounded_in_memory():
    pred, depth = video()
    tracemalloc.start()
    try:
        res = fit_alignment(pred, depth)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert abs(res.scale - 0.4) < 1e-3 and abs(res.shift + 0.12) < 1e-3
    assert res.abs_rel < 0.01 and res.valid.all()
    assert res.n_points == 200_000  # the fit saw a subsample
    # output depth (float32) + valid + three masks are 2.6x the float32 input; the former version
    # held six full float64 copies (about 20x)
    assert peak < 6 * pred.nbytes, f"peak {peak / 1e6:.0f} MB for a {pred.nbytes / 1e6:.0f} MB input"


def test_per_frame_fit_of_a_long_scene_caps_its_points():
    pred, depth = video(frames=300, height=48, width=64)
    res = fit_alignment(pred, depth, options=FitOptions(per_frame=True, max_total_points=60_000))
    assert res.n_points <= 60_000 and len(res.scale) == 300
    np.testing.assert_allclose(res.scale, 0.4, atol=5e-3)
