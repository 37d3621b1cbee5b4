"""Cheap geometric QC, always on, applied to every clip right after ingest.

Catches what a valid-looking file can still hide: non-orthonormal rotations, cameras that jump
between consecutive frames, nearly empty depth, 3D tracks that do not land in the image or
disagree with the depth map. Thresholds come from :class:`pipeline.config.QCConfig`; a failed
check raises :class:`ClipError` whose reason is recorded in the manifest.
"""

from __future__ import annotations

import numpy as np

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError
from pipeline.config import QCConfig
from stages.contract import StageContract

CONTRACT = StageContract(
    name="qc",
    inputs=("c2w", "intrinsics", "depth?", "tracks?"),
    outputs=("meta.qc",),
    runs_as="task (inside ingest)",
    acts_when="always",
    errors="rotation not orthonormal; camera step outlier; too little valid depth; tracks off-image or off-depth",
)


def geometric_qc(clip: Clip, cfg: QCConfig, metric_poses: bool = True) -> dict:
    where = f"{clip.meta.dataset}/{clip.meta.scene}/{clip.meta.clip_id}"
    rot_err = float(geo.rotation_error(clip.c2w[:, :3, :3]).max())
    if rot_err > cfg.max_rotation_error:
        raise ClipError(f"qc: rotation not orthonormal (error {rot_err:.2e} > {cfg.max_rotation_error:.0e})", where)
    rel = geo.invert_pose(clip.c2w[:-1]) @ clip.c2w[1:]
    step_t = np.linalg.norm(rel[:, :3, 3], axis=-1)
    cos = np.clip((np.trace(rel[:, :3, :3], axis1=-2, axis2=-1) - 1) / 2, -1, 1)
    step_r = np.degrees(np.arccos(cos))
    qc = {
        "rotation_error": rot_err,
        "max_step_m": float(step_t.max()) if len(step_t) else 0.0,
        "max_step_deg": float(step_r.max()) if len(step_r) else 0.0,
    }
    if metric_poses and qc["max_step_m"] > cfg.max_step_translation_m:
        raise ClipError(
            f"qc: camera moves {qc['max_step_m']:.2f} m between frames (> {cfg.max_step_translation_m})", where
        )
    if qc["max_step_deg"] > cfg.max_step_rotation_deg:
        raise ClipError(
            f"qc: camera turns {qc['max_step_deg']:.1f} deg between frames (> {cfg.max_step_rotation_deg})", where
        )
    if clip.depth is not None:
        frac = float(clip.depth_valid.mean())
        qc["valid_depth_fraction"] = frac
        if frac < cfg.min_valid_depth_fraction:
            raise ClipError(f"qc: only {frac:.1%} of depth pixels are valid", where)
        d = clip.depth[clip.depth_valid]
        qc["depth_min_m"], qc["depth_max_m"] = float(d.min()), float(d.max())
    if clip.tracks is not None:
        qc.update(track_qc(clip, cfg, where))
    return qc


def track_qc(clip: Clip, cfg: QCConfig, where: str) -> dict:
    """Visible 3D track points must project into the image, in front of the camera, and (where
    depth exists) at the depth the depth map has there."""
    t, n, _ = clip.tracks.shape
    h, w = clip.rgb.shape[1:3]
    off, total, depth_err = 0, 0, []
    for i in range(t):
        vis = clip.track_visible[i]
        if not vis.any():
            continue
        uv, z = geo.project(clip.tracks[i][vis], clip.intrinsics[i], clip.c2w[i])
        pad = cfg.max_track_reprojection_px
        inside = (z > 0) & (uv[:, 0] >= -pad) & (uv[:, 0] < w + pad) & (uv[:, 1] >= -pad) & (uv[:, 1] < h + pad)
        off += int((~inside).sum())
        total += int(vis.sum())
        if clip.depth is not None and inside.any():
            px = np.clip(np.floor(uv[inside]).astype(int), 0, [w - 1, h - 1])
            dm = clip.depth[i, px[:, 1], px[:, 0]]
            ok = clip.depth_valid[i, px[:, 1], px[:, 0]]
            depth_err.extend((np.abs(dm[ok] - z[inside][ok]) / z[inside][ok]).tolist())
    out = {
        "tracks_visible_fraction": float(clip.track_visible.mean()),
        "tracks_off_image_fraction": off / max(total, 1),
    }
    if out["tracks_off_image_fraction"] > 0.01:
        raise ClipError(
            f"qc: {out['tracks_off_image_fraction']:.1%} of visible track points project outside the image", where
        )
    if depth_err:
        out["tracks_depth_rel_error_median"] = float(np.median(depth_err))
        if out["tracks_depth_rel_error_median"] > 0.05:
            raise ClipError(
                f"qc: visible track points disagree with the depth map (median rel. error "
                f"{out['tracks_depth_rel_error_median']:.1%})",
                where,
            )
    return out
