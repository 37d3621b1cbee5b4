"""Glue between the build and :func:`align_clip`: one metric fit per scene, cut into clips.

The align stage receives the clips of one pass (a scene, or a clip with
``stages.scene.granularity: clip``), each carrying its rows of the pass's relative depth, and:

1. assembles the scene (``stages/scene/sequence.py``): frames, cameras, relative depth;
2. builds the scene's metric reference from ``depth_source``:

   * ``megasam``: the MegaSaM stage's result for the scene (:mod:`stages.align.megasam_stage`);
   * ``sparse``: the clips' own metric 3D tracks projected into each frame (Stereo4D); a frame
     takes the projection from the first clip holding it (it only depends on the frame);
   * ``vda_metric``: the metric Video Depth Anything prediction itself;
   * ``gt``: never reaches here (the clip already has depth);

3. aligns the whole scene once with :func:`align_clip` (the robust fit, the pose scale of
   up-to-scale trajectories, the consistency check, QC): every clip of a scene carries the same
   ``qc.align.scale`` and ``extra.pose_scale``;
4. cuts the scene's metric depth and (scaled) cameras into its clips and checks each clip too
   (:func:`clip_qc`): ``meta.qc.align`` holds the scene's fit and QC numbers (identical in every
   clip of the scene), ``qc.align.scene`` its size and verdict, ``qc.align.clip`` the clip's own
   checks; a clip is kept only when both pass. A scene whose fit fails fails its clips.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

from pipeline.clip import Clip, ClipFailure, ClipMeta
from pipeline.config import BuildConfig, ConfigError
from stages.align.align_clip import AlignClipOptions, align_clip
from stages.align.consistency import check_consistency
from stages.align.fit import AlignmentError, FitOptions, depth_metrics
from stages.align.qc import AlignQCThresholds
from stages.align.references import (
    MetricReference,
    reference_from_megasam,
    reference_from_metric_depth,
    reference_from_tracks,
)
from stages.model_stage import add_stats
from stages.scene.sequence import SceneSequence, group_key

#: a clip's own numbers (``qc.align.clip``); the rest of ``qc.align`` is its scene's fit and QC
CLIP_QC_FIELDS = (
    "abs_rel",
    "delta_1_25",
    "valid_ratio",
    "consistency_error",
    "pixel_error",
    "consistency_scale_factor",
)


def depth_limits(cfg: BuildConfig, dataset: str) -> tuple[float, float]:
    """The dataset's (min_depth_m, max_depth_m): its config, else its adapter's defaults."""
    from stages.ingest import adapter_class

    ds = cfg.datasets[dataset]
    d = adapter_class(dataset).defaults
    lo = ds.min_depth_m if ds.min_depth_m is not None else d.min_depth_m
    hi = ds.max_depth_m if ds.max_depth_m is not None else d.max_depth_m
    return float(lo), float(hi)


def options_for(cfg: BuildConfig, relative_kind: str, *, dataset: str | None = None) -> AlignClipOptions:
    """Fit options from the config; with ``dataset`` its depth limits bound the fit and output."""
    a = cfg.stages.align
    space = "depth" if a.model == "depth_affine" else "disparity"
    limits = {} if dataset is None else dict(zip(("min_depth", "max_depth"), depth_limits(cfg, dataset)))
    fit = FitOptions(space=space, per_frame=a.per_frame, scale_only=a.model == "scale_only", robust=a.robust, **limits)
    return AlignClipOptions(
        prediction_kind="depth" if relative_kind == "metric_depth" else "disparity", fit=fit, thresholds=a.thresholds
    )


def reference_for(
    seq: SceneSequence, members: list[Clip], relative: np.ndarray, cfg: BuildConfig, megasam=None
) -> MetricReference:
    """The scene's metric reference (see the module docstring)."""
    src = cfg.datasets[seq.dataset].depth_source
    t, h, w = relative.shape
    # The maximum depth is applied by the fit (options_for), through the prediction: cutting a
    # noisy reference on its own values would select its errors (stages/align/fit.py).
    lo, hi = depth_limits(cfg, seq.dataset)
    if src == "megasam":
        if megasam is None:
            raise AlignmentError("depth_source 'megasam' but the MegaSaM stage gave no result", seq.key)
        out = megasam.for_frames(seq.frames, seq.subset_positions(megasam.frames))
        return reference_from_megasam(
            out, h, w, expected_frames=t, min_depth=lo, clip_intrinsics=seq.gather(lambda c: c.intrinsics)
        )
    if src == "sparse":
        refs = {}
        for c in members:
            if c.tracks is None:
                raise AlignmentError(
                    "depth_source 'sparse' needs the dataset's metric 3D tracks; this clip has none", c.key
                )
            refs[c.key] = reference_from_tracks(
                c.tracks, c.intrinsics, c.c2w, h, w, visible=c.track_visible, min_depth=lo
            )
        depth = seq.gather(lambda c: refs[c.key].depth)
        valid = seq.gather(lambda c: refs[c.key].valid)
        return MetricReference(depth=depth, valid=valid, kind="tracks", meta={"n_projected": int(valid.sum())})
    if src == "vda_metric":
        if members[0].aux.get("relative_kind") != "metric_depth":
            raise ConfigError("depth_source 'vda_metric' needs stages.depth.metric: true")
        return reference_from_metric_depth(relative, min_depth=lo, max_depth=min(hi, 80.0))
    raise ConfigError(f"dataset {seq.dataset}: depth_source {src!r} has no alignment reference")


def scene_clip(seq: SceneSequence, members: list[Clip]) -> Clip:
    """The scene as one clip (its frames, cameras), for :func:`align_clip`."""
    m0 = members[0].meta
    meta = ClipMeta(
        dataset=m0.dataset,
        scene=m0.scene,
        clip_id=seq.key,
        frame_indices=seq.frames.tolist(),
        dynamic=m0.dynamic,
        real=m0.real,
        depth_source="none",
        track_source="none",
        extra={k: m0.extra[k] for k in ("metric_poses",) if k in m0.extra},
    )
    return Clip(
        meta=meta, rgb=seq.rgb(), intrinsics=seq.gather(lambda c: c.intrinsics), c2w=seq.gather(lambda c: c.c2w)
    )


def align_pass(members: list[Clip], cfg: BuildConfig, megasam=None) -> dict[str, Clip | ClipFailure]:
    """Align the clips of one pass (module docstring); returns each clip's result by clip id."""
    seq = SceneSequence.from_clips(group_key(members[0], cfg.stages.scene.granularity), members)
    kind = members[0].aux.get("relative_kind", "disparity")
    relative = seq.gather(lambda c: c.aux["relative_depth"])
    opts = options_for(cfg, kind, dataset=seq.dataset)
    ref = reference_for(seq, members, relative, cfg, megasam)
    if len(members) == 1:  # the pass is one clip (or a scene of one clip): its fit is the scene's
        return {members[0].key: _single(members[0], relative, ref, opts, cfg)}
    scene = align_clip(scene_clip(seq, members), relative, ref, opts)
    sq = scene.meta.qc["align"]
    pose_scale = scene.meta.extra.get("pose_scale")
    out: dict[str, Clip | ClipFailure] = {}
    for c in members:
        try:
            out[c.key] = _cut(c, seq, scene, ref, relative, sq, pose_scale, cfg, opts, len(members))
        except Exception as exc:  # noqa: BLE001 - this clip's failure only
            out[c.key] = ClipFailure.from_exception(c.key, "align", exc)
    return out


def _single(c: Clip, relative: np.ndarray, ref: MetricReference, opts: AlignClipOptions, cfg: BuildConfig) -> Clip:
    out = align_clip(c, relative, ref, opts)
    qc = out.meta.qc["align"]
    qc["scene"] = {"frames": c.num_frames, "clips": 1}
    qc["clip"] = {
        "frames": c.num_frames,
        **{k: qc.get(k) for k in CLIP_QC_FIELDS},
        "keep": qc["keep"],
        "reasons": list(qc.get("reasons", [])),
    }
    out.aux.pop("relative_depth", None)
    out.validate()
    if not qc["keep"] and cfg.stages.align.drop_on_qc:
        raise AlignmentError(f"align QC: {qc['reason']}", c.key)
    return out


def _cut(
    c: Clip,
    seq: SceneSequence,
    scene: Clip,
    ref: MetricReference,
    relative: np.ndarray,
    sq: dict,
    pose_scale,
    cfg: BuildConfig,
    opts: AlignClipOptions,
    n_clips: int,
) -> Clip:
    pos = seq.positions[c.key]
    depth, valid, c2w = scene.depth[pos], scene.depth_valid[pos], scene.c2w[pos]
    tracks = c.tracks
    if pose_scale is not None and tracks is not None:
        tracks = (tracks.astype(np.float64) * float(pose_scale)).astype(c.tracks.dtype)
    own = clip_qc(c, depth, valid, c2w, ref.depth[pos], ref.valid[pos], relative[pos], opts.thresholds)
    reasons = own["reasons"] + [f"scene {r}" for r in sq.get("reasons", [])]
    qc = {
        **copy.deepcopy(sq),
        "scene": {"frames": seq.num_frames, "clips": n_clips, "keep": sq.get("keep"), "reason": sq.get("reason")},
        "clip": own,
        "keep": not reasons,
        "reason": "; ".join(reasons) if reasons else None,
        "reasons": reasons,
    }
    meta = copy.deepcopy(c.meta)
    meta.depth_source = "aligned"
    meta.qc = {**meta.qc, "align": qc}
    if pose_scale is not None:
        meta.extra = {**meta.extra, "metric_poses": True, "pose_scale": float(pose_scale)}
    aux = {k: v for k, v in c.aux.items() if k not in ("relative_depth",)}
    clip = dataclasses.replace(c, meta=meta, depth=depth, depth_valid=valid, c2w=c2w, tracks=tracks, aux=aux)
    clip.validate()
    if not qc["keep"] and cfg.stages.align.drop_on_qc:
        raise AlignmentError(f"align QC: {qc['reason']}", c.key)
    return clip


def clip_qc(c: Clip, depth, valid, c2w, ref_depth, ref_valid, relative, thresholds: AlignQCThresholds) -> dict:
    """One clip's own checks on its rows of the scene's alignment: the share of its predicted
    pixels left with metric depth and its own reprojection consistency (the scene's thresholds),
    plus its agreement with the reference (reported; the fit's noise-aware gates belong to the
    scene's fit, ``align_qc``)."""
    th = thresholds
    m = depth_metrics(depth, valid, ref_depth, ref_valid)
    usable = int((np.isfinite(relative) & (relative > 0)).sum())
    out = {
        "frames": int(depth.shape[0]),
        "abs_rel": m["abs_rel"],
        "delta_1_25": m["delta_1_25"],
        "valid_ratio": float(valid.sum()) / max(usable, 1),
        "consistency_error": None,
        "pixel_error": None,
        "consistency_scale_factor": None,
    }
    reasons = []
    if not out["valid_ratio"] >= th.min_valid_ratio:
        reasons.append(f"clip valid_ratio {out['valid_ratio']:.3f} < {th.min_valid_ratio}")
    if depth.shape[0] > 1:
        cons = check_consistency(
            depth,
            valid,
            c.intrinsics,
            c2w,
            rgb=c.rgb,
            max_depth_error=th.max_consistency_error,
            max_pixel_error=th.max_pixel_error,
            max_scale_factor=th.max_scale_factor,
            max_points=AlignClipOptions().consistency_max_points,
        )
        ce, pe, k = cons.depth_error, cons.pixel_error, cons.scale_factor
        out.update(consistency_error=float(ce), pixel_error=float(pe), consistency_scale_factor=k)
        if cons.n_points == 0 or math.isnan(ce):
            reasons.append("clip consistency: no reprojected point landed on valid depth")
        else:
            if ce > th.max_consistency_error:
                reasons.append(f"clip consistency_error {ce:.3f} > {th.max_consistency_error}")
            if pe > th.max_pixel_error:
                reasons.append(f"clip pixel_error {pe:.2f} > {th.max_pixel_error}")
        if k is not None and max(k, 1 / k) > th.max_scale_factor:
            reasons.append(f"clip poses and depth disagree in scale: translations fit best x{k:.3f}")
    out.update(keep=not reasons, reasons=reasons)
    return out


def align_group(clips: list, cfg: BuildConfig, megasam=None) -> list:
    """The align stage on one pass's clips (failures pass through); see the module docstring."""
    from stages.align.megasam_stage import PassFailure

    members = [c for c in clips if isinstance(c, Clip) and "relative_depth" in c.aux]
    if not members:
        return clips
    if isinstance(megasam, PassFailure):
        res = {
            c.key: ClipFailure(
                c.key, megasam.stage, megasam.reason, megasam.path, transient=megasam.transient
            ).carrying(c)
            for c in members
        }
    else:
        try:
            res = align_pass(members, cfg, megasam)
        except Exception as exc:  # noqa: BLE001 - the scene's fit failed: each of its clips fails with it
            f = ClipFailure.from_exception(members[0].key, "align", exc)
            where = f" (scene {members[0].meta.scene}, {len(members)} clips)" if len(members) > 1 else ""
            res = {c.key: ClipFailure(c.key, "align", f.reason + where, f.path, transient=f.transient) for c in members}
        for c in members:
            if isinstance(res[c.key], ClipFailure):
                res[c.key].carrying(c)
        if megasam is not None:
            add_stats(res[members[0].key], megasam.stats)
    return [res.get(c.key, c) if isinstance(c, Clip) else c for c in clips]
