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


def test_consistency_pairs_of_a_long_scene_overlap():
    """Frame pairs for the reprojection checks of a scene-length video: gaps stay short enough to
    overlap (T/2 = 150 frames apart rarely see the same surfaces), and they span the scene."""
    from stages.align.consistency import default_pairs

    assert default_pairs(16) == default_pairs(16, max_gap=16)  # clips are unchanged
    pairs = default_pairs(300)
    gaps = {j - i for i, j in pairs}
    assert max(gaps) <= 16 and 1 in gaps and len(gaps) >= 3
    assert min(i for i, _ in pairs) == 0 and max(j for _, j in pairs) >= 280


def test_depth_based_pose_scale_of_a_long_walk():
    """A 40-frame walk of 12 m along a 3 m wide corridor, looking at its wall (depth ~1.5 m): the
    search range for the scale is set by the baselines of the frame pairs compared, not by the
    whole path (which is 8 median depths long and fell outside the range)."""
    from pipeline import geometry as geo
    from pipeline.demo.render import SceneSpec, render
    from stages.align.pose_scale import scale_from_depth

    frames = 40
    eyes = np.stack([np.zeros(frames), np.zeros(frames), np.linspace(-6, 6, frames)], axis=-1)
    c2w = np.stack([geo.look_at_c2w(e, e + np.array([1.0, 0.1, 0.3])) for e in eyes])
    r = render(
        SceneSpec(
            name="corridor",
            num_frames=frames,
            height=24,
            width=32,
            room_half=(1.5, 1.5, 9.0),
            camera_path=c2w,
            num_tracks=1,
            seed=4,
        )
    )
    k_sfm = 0.37
    sfm = c2w.copy()
    sfm[:, :3, 3] *= k_sfm
    res = scale_from_depth(r.depth, r.depth > 0, r.intrinsics, sfm, rgb=r.rgb)
    assert abs(res.scale * k_sfm - 1) < 0.03, res.scale * k_sfm
