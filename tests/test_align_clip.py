"""align_clip end to end per reference kind, the references, and the QC decision."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipMeta
from pipeline.demo.render import random_scene, render
from stages.align.align_clip import AlignClipOptions, align_clip
from stages.align.fit import AlignmentError, FitOptions
from stages.align.qc import AlignQCThresholds
from stages.align.references import (
    reference_from_gt,
    reference_from_megasam,
    reference_from_metric_depth,
    reference_from_tracks,
)

K_SFM = 0.37  # RealEstate10K-like poses: metric translations times an unknown factor


@functools.lru_cache(maxsize=None)
def scene():
    return render(random_scene("align_clip", seed=5, dynamic=False, num_frames=8, height=48, width=64, num_tracks=300))


def make_clip(dataset="realestate10k", k=K_SFM, with_tracks=False):
    r = scene()
    c2w = r.c2w.copy()
    c2w[:, :3, 3] *= k
    meta = ClipMeta(
        dataset=dataset, scene="s", clip_id=f"{dataset}/s/0", frame_indices=list(range(8)), dynamic=False, real=True
    )
    clip = Clip(meta=meta, rgb=r.rgb, intrinsics=r.intrinsics.copy(), c2w=c2w)
    if with_tracks:
        clip.tracks = r.tracks_world.astype(np.float32)
        clip.track_visible = r.tracks_visible.copy()
    return clip.validate()


def relative_disparity(seed=0, outliers=0.03):
    """A VDA-like relative disparity: affine-distorted, 0.5 % noise, a few gross errors (the 20 %
    outlier stress test is in test_align_fit.py; here the clip-level QC must pass)."""
    d = scene().depth.astype(np.float64)
    rng = np.random.default_rng(seed)
    x = (2.5 / d + 0.3) * (1 + 0.005 * rng.standard_normal(d.shape))
    bad = rng.random(d.shape) < outliers
    return np.where(bad, rng.uniform(0, 2 * x.max(), d.shape), x), bad


def abs_rel(depth, valid, mask=None):
    d = scene().depth
    m = valid if mask is None else valid & mask
    return float(np.mean(np.abs(depth[m] - d[m]) / d[m]))


def megasam_npz(tmp_path, static=False):
    """A MegaSaM-like result: 2 % depth noise, half resolution, metric poses in its own world frame."""
    r = scene()
    rng = np.random.default_rng(7)
    g = geo.make_pose(geo.quat_xyzw_to_matrix(np.array([0.1, 0.7, -0.2, 0.6])), np.array([3.0, 0.0, -1.0]))
    c2w = g @ r.c2w
    if static:
        c2w = np.repeat(c2w[:1], 8, axis=0)
    depth = (r.depth * (1 + 0.02 * rng.standard_normal(r.depth.shape)))[:, ::2, ::2].astype(np.float32)
    k = geo.intrinsics_matrix(r.intrinsics[0] / 2)
    path = tmp_path / "clip_sgd_cvd_hr.npz"
    np.savez(path, images=r.rgb[:, ::2, ::2], depths=depth, intrinsic=k, cam_c2w=c2w)
    return path


def test_realestate_with_megasam_reference(tmp_path):
    clip = make_clip()
    pred, bad = relative_disparity()
    ref = reference_from_megasam(megasam_npz(tmp_path), 48, 64, expected_frames=8)
    out = align_clip(clip, pred, ref)
    qc = out.meta.qc["align"]
    json.dumps(qc)  # serialisable
    assert out.meta.depth_source == "aligned" and out.depth.dtype == np.float32
    assert qc["keep"], qc["reason"]
    assert qc["pose_scale_method"] == "trajectory"
    assert abs(qc["pose_scale"] * K_SFM - 1) < 0.01
    np.testing.assert_allclose(out.c2w[:, :3, 3], scene().c2w[:, :3, 3], atol=0.01)
    assert abs_rel(out.depth, out.depth_valid, ~bad) < 0.02
    assert out.meta.extra["metric_poses"] is True
    assert clip.meta.depth_source == "none"  # the input clip is untouched


def test_realestate_with_metric_vda_reference():
    clip = make_clip()
    pred, bad = relative_disparity()
    rng = np.random.default_rng(3)
    vda = scene().depth * (1 + 0.03 * rng.standard_normal(scene().depth.shape))
    out = align_clip(clip, pred, reference_from_metric_depth(vda))
    qc = out.meta.qc["align"]
    assert qc["keep"], qc["reason"]
    assert qc["pose_scale_method"].startswith("reprojection")
    assert abs(qc["pose_scale"] * K_SFM - 1) < 0.02
    assert abs_rel(out.depth, out.depth_valid, ~bad) < 0.02
    assert abs(qc["consistency_scale_factor"] - 1) < 0.05


def test_static_reference_trajectory_falls_back_to_depth(tmp_path):
    clip = make_clip()
    pred, _ = relative_disparity()
    ref = reference_from_megasam(megasam_npz(tmp_path, static=True), 48, 64)
    out = align_clip(clip, pred, ref)
    qc = out.meta.qc["align"]
    assert "near-static" in qc["pose_scale_fallback"]
    assert abs(qc["pose_scale"] * K_SFM - 1) < 0.02


def test_stereo4d_sparse_track_reference():
    r = scene()
    clip = make_clip(dataset="stereo4d", k=1.0)
    tracks = r.tracks_world.copy()
    tracks[~r.tracks_visible] = np.nan  # untracked
    ref = reference_from_tracks(tracks, clip.intrinsics, clip.c2w, 48, 64)
    assert 100 < ref.valid.sum() < 0.2 * ref.valid.size and ref.sparse
    pred, bad = relative_disparity()
    out = align_clip(clip, pred, ref)
    qc = out.meta.qc["align"]
    assert qc["keep"], qc["reason"]
    assert qc["pose_scale"] is None  # metric poses are left alone
    np.testing.assert_array_equal(out.c2w, clip.c2w)
    assert abs_rel(out.depth, out.depth_valid, ~bad) < 0.02


def test_reference_from_tracks_geometry():
    k = np.array([[10.0, 10.0, 5.0, 5.0]])
    c2w = np.eye(4)[None]
    pts = np.array(
        [
            [
                [0.0, 0.0, 2.0],  # centre pixel (5,5), z=2
                [0.0, 0.0, 1.0],  # same pixel, nearer: wins
                [0.0, 0.0, -1.0],  # behind the camera
                [100.0, 0.0, 1.0],  # outside the image
                [np.nan, 0.0, 1.0],  # untracked
                [-0.45, -0.45, 1.0],
            ]
        ]
    )  # u = 0.5 -> pixel (0, 0)
    ref = reference_from_tracks(pts, k, c2w, 10, 10)
    assert ref.valid.sum() == 2
    assert ref.depth[0, 5, 5] == 1.0 and ref.depth[0, 0, 0] == 1.0


def test_synthetic_gt_reference_and_metric_poses():
    clip = make_clip(dataset="tartanair", k=1.0)
    pred, bad = relative_disparity()
    out = align_clip(clip, pred, reference_from_gt(scene().depth))
    assert out.meta.qc["align"]["keep"]
    assert abs_rel(out.depth, out.depth_valid, ~bad) < 0.02
    np.testing.assert_array_equal(out.c2w, clip.c2w)


def test_qc_drops_inconsistent_clip():
    # Metric poses claimed, but the dataset's translations are actually 1.6x too long.
    clip = make_clip(dataset="tartanair", k=1.6)
    pred, _ = relative_disparity()
    out = align_clip(clip, pred, reference_from_gt(scene().depth))
    qc = out.meta.qc["align"]
    assert not qc["keep"] and "disagree in scale" in qc["reason"]
    with pytest.raises(AlignmentError, match="QC failed"):
        align_clip(clip, pred, reference_from_gt(scene().depth), AlignClipOptions(raise_on_drop=True))


def test_qc_drops_poor_fit_and_bad_inputs():
    clip = make_clip(dataset="tartanair", k=1.0)
    rng = np.random.default_rng(0)
    noise = rng.uniform(0.1, 1.0, scene().depth.shape)  # unrelated to the scene
    opts = AlignClipOptions(consistency=False, fit=FitOptions(min_rel_spread=0.0))
    out = align_clip(clip, noise, reference_from_gt(scene().depth), opts)
    qc = out.meta.qc["align"]
    assert not qc["keep"] and qc["reason"]
    with pytest.raises(AlignmentError, match="does not match"):
        align_clip(clip, noise[:, :-1], reference_from_gt(scene().depth))
    strict = AlignClipOptions(thresholds=AlignQCThresholds(max_abs_rel=1e-6))
    pred, _ = relative_disparity()
    assert "abs_rel" in align_clip(clip, pred, reference_from_gt(scene().depth), strict).meta.qc["align"]["reason"]


# ------------------------------------------------------------------------------------------------
# Stereo references (issue #20 item 1): noise about constant in disparity must not fail the QC.

STEREO_DISPARITY_SIGMA = 0.5 / (300.0 * 0.063)  # 0.5 px on a f=300 px, 6.3 cm baseline rig, in 1/m


@functools.lru_cache(maxsize=None)
def long_scene():
    """A 12 x 24 m hall seen from one end: depth 2.4-22 m."""
    spec = random_scene(
        "stereo_hall", seed=1, dynamic=False, num_frames=8, height=48, width=64, num_tracks=3000, num_boxes=5
    )
    spec.room_half = (6.0, 2.0, 12.0)
    spec.camera_path = np.stack(
        [
            geo.look_at_c2w(np.array([0.1 * t - 0.4, -0.3, -10.5 + 0.05 * t]), np.array([0.0, 0.3, 5.0]))
            for t in range(8)
        ]
    )
    return render(spec)


def stereo_clip_and_reference(seed=0, max_depth=20.0):
    r = long_scene()
    meta = ClipMeta(
        dataset="stereo4d",
        scene="hall",
        clip_id="stereo4d/hall/0",
        frame_indices=list(range(8)),
        dynamic=False,
        real=True,
    )
    clip = Clip(meta=meta, rgb=r.rgb, intrinsics=r.intrinsics.copy(), c2w=r.c2w.copy()).validate()
    tracks = r.tracks_world.copy()
    tracks[~r.tracks_visible] = np.nan
    ref = reference_from_tracks(tracks, clip.intrinsics, clip.c2w, 48, 64, max_depth=max_depth)
    rng = np.random.default_rng(seed)
    disp = 1.0 / ref.depth[ref.valid] + STEREO_DISPARITY_SIGMA * rng.standard_normal(int(ref.valid.sum()))
    depth = ref.depth.copy()
    depth[ref.valid] = np.where(disp > 0, 1.0 / np.maximum(disp, 1e-9), 0.0)
    ref.valid &= (depth > 0) & (depth <= max_depth)
    ref.depth = np.where(ref.valid, depth, 0.0).astype(np.float32)
    return clip, ref


def hall_disparity(seed=0, power=1.0):
    d = long_scene().depth.astype(np.float64)
    rng = np.random.default_rng(seed)
    return (2.5 / d**power + 0.3) * (1 + 0.005 * rng.standard_normal(d.shape))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stereo_noise_does_not_drop_a_good_clip(seed):
    clip, ref = stereo_clip_and_reference(seed)
    out = align_clip(clip, hall_disparity(seed), ref)
    qc = out.meta.qc["align"]
    truth = long_scene().depth
    m = out.depth_valid
    assert np.mean(np.abs(out.depth[m] - truth[m]) / truth[m]) < 0.03
    assert qc["keep"], qc["reason"]


def test_stereo_reference_still_catches_a_prediction_that_is_not_affine():
    clip, ref = stereo_clip_and_reference(0)
    out = align_clip(clip, hall_disparity(0, power=0.5), ref)  # disparity ~ 1/sqrt(depth): wrong shape
    qc = out.meta.qc["align"]
    assert not qc["keep"] and "residual" in qc["reason"]


# ------------------------------------------------------------------------------------------------
# MegaSaM's own focal length (issue #20 item 5)


def megasam_with_focal(tmp_path, focal_ratio):
    """MegaSaM's solution for a camera it believes has focal ``focal_ratio`` x the true one: its
    depth is anchored by its metric depth prior (true depth, 2 % noise), so to explain the same
    image motion its baselines shrink by that ratio (parallax = f B / z)."""
    r = scene()
    rng = np.random.default_rng(8)
    g = geo.make_pose(geo.quat_xyzw_to_matrix(np.array([0.1, 0.7, -0.2, 0.6])), np.array([3.0, 0.0, -1.0]))
    c2w = g @ r.c2w
    c2w[:, :3, 3] /= focal_ratio
    depth = (r.depth * (1 + 0.02 * rng.standard_normal(r.depth.shape))).astype(np.float32)
    k = r.intrinsics[0].copy()
    k[:2] *= focal_ratio
    path = tmp_path / f"focal{focal_ratio}_sgd_cvd_hr.npz"
    np.savez(path, images=r.rgb, depths=depth, intrinsic=geo.intrinsics_matrix(k), cam_c2w=c2w)
    return path


def test_megasam_focal_mismatch_is_corrected():
    import tempfile
    from pathlib import Path

    clip = make_clip()
    pred, bad = relative_disparity()
    with tempfile.TemporaryDirectory() as tmp:
        path = megasam_with_focal(Path(tmp), 1.12)
        ref = reference_from_megasam(path, 48, 64, expected_frames=8, clip_intrinsics=clip.intrinsics)
        blind = reference_from_megasam(path, 48, 64, expected_frames=8)  # focal never compared
    qc_blind = align_clip(clip, pred, blind).meta.qc["align"]
    assert not qc_blind["keep"] and "disagree in scale" in qc_blind["reason"]
    assert abs(ref.meta["focal_ratio"] - 1.12) < 1e-6
    out = align_clip(clip, pred, ref)
    qc = out.meta.qc["align"]
    assert qc["keep"], qc["reason"]
    assert abs(qc["megasam_focal_ratio"] - 1.12) < 1e-6
    assert abs(qc["pose_scale"] * K_SFM - 1) < 0.01
    assert abs(qc["consistency_scale_factor"] - 1) < 0.05


def test_megasam_focal_far_off_is_refused(tmp_path):
    clip = make_clip()
    with pytest.raises(AlignmentError, match="focal length"):
        reference_from_megasam(megasam_with_focal(tmp_path, 1.3), 48, 64, clip_intrinsics=clip.intrinsics)
