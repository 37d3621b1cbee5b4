"""Depth limits reach the fit (issue #20 item 3): per-dataset min/max depth, MegaSaM's saturated
far field, and the far-field rule that keeps sky from becoming valid depth."""

from __future__ import annotations

import functools

import numpy as np

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipMeta
from pipeline.config import BuildConfig
from pipeline.demo.render import random_scene, render
from stages.align.align_clip import align_clip
from stages.align.fit import fit_alignment
from stages.align.pipeline_stage import align_pass, options_for, reference_for
from stages.align.references import reference_from_megasam
from stages.scene.sequence import SceneSequence

MEGASAM_MAX_DEPTH = 100.0  # cvd_opt/cvd_opt.py clips its depths to [1e-3, 1e2]


@functools.cache
def scene():
    return render(random_scene("limits", seed=8, dynamic=False, num_frames=8, height=48, width=64, num_tracks=400))


def with_sky(rows=12):
    """The scene with its top ``rows`` rows replaced by sky (no depth)."""
    r = scene()
    depth = r.depth.astype(np.float64).copy()
    depth[:, :rows] = np.inf
    return depth


def sky_prediction(depth, sky_offset=0.004, seed=0):
    """VDA-like relative disparity ``2.5/d + 0.3`` (true affine s = 0.4, b = -0.12): sky (d = inf)
    sits at 0.3, and a small offset there makes the aligned sky disparity slightly positive,
    i.e. hundreds of metres, as a fitted shift a hair too large does."""
    rng = np.random.default_rng(seed)
    x = (2.5 / depth + 0.3) * (1 + 0.003 * rng.standard_normal(depth.shape))
    return np.where(np.isinf(depth), 0.3 + sky_offset, x)


def clip_of(dataset, tracks=False):
    r = scene()
    meta = ClipMeta(
        dataset=dataset,
        scene="s",
        clip_id=f"{dataset}/s/0",
        frame_indices=list(range(8)),
        dynamic=False,
        real=True,
        extra={"metric_poses": True},
    )
    clip = Clip(meta=meta, rgb=r.rgb, intrinsics=r.intrinsics.copy(), c2w=r.c2w.copy())
    if tracks:
        clip.tracks = r.tracks_world.astype(np.float32)
        clip.track_visible = r.tracks_visible.copy()
    return clip.validate()


def megasam_npz(tmp_path, depth):
    """MegaSaM's output as cvd_opt.py writes it: depth clipped to [1e-3, 100] (sky saturates)."""
    r = scene()
    path = tmp_path / "s_sgd_cvd_hr.npz"
    np.savez(
        path,
        images=r.rgb,
        depths=np.clip(depth, 1e-3, MEGASAM_MAX_DEPTH).astype(np.float16),
        intrinsic=geo.intrinsics_matrix(r.intrinsics[0]),
        cam_c2w=r.c2w,
    )
    return path


def test_megasam_saturated_depth_is_not_a_reference(tmp_path):
    depth = with_sky()
    ref = reference_from_megasam(megasam_npz(tmp_path, depth), 48, 64)
    assert not ref.valid[:, :12].any(), "MegaSaM's clipped far field (100 m) was taken as metric depth"
    assert ref.valid[:, 12:].mean() > 0.99


def test_sky_does_not_become_valid_depth(tmp_path):
    depth = with_sky()
    ref = reference_from_megasam(megasam_npz(tmp_path, depth), 48, 64)
    out = align_clip(clip_of("tartanair"), sky_prediction(depth), ref)
    assert not out.depth_valid[:, :12].any(), f"sky aligned to {out.depth[:, :12].max():.0f} m"
    assert out.depth_valid[:, 12:].mean() > 0.95
    qc = out.meta.qc["align"]
    assert qc["keep"], qc["reason"]  # sky is not a failure of the clip
    assert abs(qc["far_field_ratio"] - 12 / 48) < 0.02


def test_far_field_rule_without_any_dataset_limit():
    """A dense metric reference that stops at 8 m, sky predicted at hundreds of metres: the
    output keeps nothing far beyond what the reference supports, even with max_depth 1000."""
    depth = with_sky()
    ref_depth = np.where(np.isinf(depth), 0.0, depth)
    res = fit_alignment(sky_prediction(depth), ref_depth, ref_depth > 0)
    assert not res.valid[:, :12].any()
    assert res.summary()["far_limit_m"] < 3 * float(ref_depth.max())


def config(tmp_path, dataset, **ds):
    return BuildConfig.model_validate(
        {"output": str(tmp_path / "out"), "datasets": {dataset: {"root": str(tmp_path), **ds}}}
    ).resolved()


def test_dataset_depth_limits_reach_reference_and_output(tmp_path):
    """Stereo4D's 20 m: reference points the fit places beyond it are ignored, and no aligned
    depth exceeds it (the fit used 1000 m before). The reference keeps its far points: cutting
    them on their own noisy depth would bias the fit (the fit cuts through the prediction)."""
    cfg = config(tmp_path, "stereo4d")
    assert cfg.datasets["stereo4d"].max_depth_m == 20.0
    clip = clip_of("stereo4d", tracks=True)
    clip.tracks = (clip.tracks.astype(np.float64) * 4.0).astype(np.float32)  # the room, 4x larger
    clip.c2w = clip.c2w.copy()
    clip.c2w[:, :3, 3] *= 4.0
    seq = SceneSequence.from_clips("stereo4d/s", [clip])  # the stage's reference for a pass of this one clip
    ref = reference_for(seq, [clip], np.zeros(clip.rgb.shape[:3]), cfg)
    assert ref.valid.any() and ref.depth[ref.valid].max() > 20.0
    opts = options_for(cfg, "disparity", dataset="stereo4d")
    assert opts.fit.max_depth == 20.0
    truth = scene().depth.astype(np.float64) * 4.0
    clip.aux["relative_depth"] = 2.5 / truth + 0.3
    fit = fit_alignment(clip.aux["relative_depth"], ref.depth, ref.valid, options=opts.fit)
    within = int((ref.valid & (ref.depth <= 20.0)).sum())  # exact data: the same points, but for the
    assert abs(fit.n_points - within) <= 0.01 * within  # few whose pixel straddles 20 m
    out = align_pass([clip], cfg)[clip.key]
    assert out.depth_valid.any() and out.depth[out.depth_valid].max() <= 20.0
    assert (truth > 20.5).any() and not np.any(out.depth_valid & (truth > 20.5))


def test_config_override_of_depth_limits(tmp_path):
    cfg = config(tmp_path, "stereo4d", max_depth_m=12.0, min_depth_m=0.5)
    fit = options_for(cfg, "disparity", dataset="stereo4d").fit
    assert (fit.min_depth, fit.max_depth) == (0.5, 12.0)
