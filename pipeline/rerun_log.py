"""One clip into a Rerun recording (https://rerun.io), under an entity prefix of the caller's choice.

Entities under ``PREFIX`` (``gt`` for ``d4s show``; an evaluation can log its renders under another
prefix beside the ground truth, same timeline):

====================================  ===============================================================
``PREFIX``                            static: world up (``ViewCoordinates``) when the cameras' up is an axis
``PREFIX/camera_path``                static: ``LineStrips3D``, every camera centre in order
``PREFIX/camera``                     per frame: ``Transform3D`` = the clip's c2w (camera to world)
``PREFIX/camera/image``               per frame: ``Pinhole`` (fx fy cx cy, W x H, OpenCV axes = RDF)
``PREFIX/camera/image/rgb``           per frame: the frame (the shard's JPEG bytes when given)
``PREFIX/camera/image/depth``         per frame: ``DepthImage`` in metres (``meter=1``), 0 = invalid
``PREFIX/camera/image/tracks``        per frame: ``Points2D``, visible tracks projected into the frame
``PREFIX/tracks``                     per frame: ``Points3D`` of the visible tracks (world metres),
                                      with a ``track_id`` column (index into the clip's N tracks)
``PREFIX/tracks/trails``              per frame: ``LineStrips3D``, each visible track's last positions
====================================  ===============================================================

Frames are on the sequence timeline ``frame`` (0..T-1) and ``source_frame`` (the scene's frame
index). Colours per track are the gallery's (:func:`pipeline.gallery.track_colours`), so a
track looks the same in the report and in the viewer. :func:`send_clip_properties` puts the
clip's metadata and every scalar QC value into the recording's properties.
"""

from __future__ import annotations

import numpy as np

from pipeline.clip import Clip
from pipeline.geometry import project, world_up_from_cameras

TRAIL_FRAMES = 8


class RerunMissing(RuntimeError):
    pass


def import_rerun():
    """``rerun`` (the rerun-sdk package), or a clear error saying how to install it."""
    try:
        import rerun as rr
    except ImportError as exc:
        raise RerunMissing(
            "Rerun export needs the rerun-sdk package: pip install 'd4s[viz]' (or pip install rerun-sdk)"
        ) from exc
    return rr


def world_view_coordinates(c2w: np.ndarray):
    """``rr.ViewCoordinates`` for a right-handed world whose up axis is a coordinate axis, else None.

    Datasets keep their own world frames (NED, y-up, z-up): the viewer's default (no up) would
    show a NED scene upside down. Only a clear axis (|component| > 0.9) is claimed.
    """
    rr = import_rerun()
    up = world_up_from_cameras(c2w)
    axis = int(np.argmax(np.abs(up)))
    if abs(up[axis]) < 0.9:
        return None
    name = f"RIGHT_HAND_{'XYZ'[axis]}_{'UP' if up[axis] > 0 else 'DOWN'}"
    return getattr(rr.ViewCoordinates, name)


def qc_properties(qc: dict, prefix: str = "") -> dict:
    """``meta.qc`` flattened to ``{"align.residual": 0.01, ...}``: scalars, strings and numeric lists."""
    out: dict = {}
    for k in sorted(qc):
        v, name = qc[k], f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(qc_properties(v, name + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[name] = v
        elif (
            isinstance(v, (list, tuple))
            and v
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        ):
            out[name] = np.asarray(v, dtype=np.float64)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            out[name] = "; ".join(v)
    return out


def send_clip_properties(rec, clip: Clip) -> None:
    """The clip's identity and provenance (``clip``) and its QC values (``qc``) as recording properties."""
    rr = import_rerun()
    m = clip.meta
    rec.send_property(
        "clip",
        rr.AnyValues(
            clip_id=m.clip_id,
            dataset=m.dataset,
            scene=m.scene,
            num_frames=clip.num_frames,
            first_source_frame=int(m.frame_indices[0]) if m.frame_indices else -1,
            depth_source=m.depth_source,
            track_source=m.track_source,
            dynamic=bool(m.dynamic),
            real=bool(m.real),
            untrained_models=", ".join(m.untrained_models) or "none",
            config_hash=m.config_hash or "-",
            adapter_version=m.adapter_version,
            d4s_version=m.d4s_version or "-",
        ),
    )
    qc = qc_properties(m.qc)
    if qc:
        rec.send_property("qc", rr.AnyValues(**qc))


def _colours_u8(n: int) -> np.ndarray:
    from pipeline.gallery import track_colours

    return (track_colours(n) * 255).round().astype(np.uint8)


def _track_ids(rr, ids: np.ndarray) -> list:
    """The ``track_id`` column beside a frame's points (none when no track is visible: Rerun
    rejects an empty AnyValues batch; the empty point list already says nothing is seen)."""
    return [rr.AnyValues(track_id=ids.astype(np.int64))] if ids.size else []


def log_clip(rec, clip: Clip, prefix: str = "gt", rgb_jpeg: list[bytes] | None = None, timeline: str = "frame") -> None:
    """Log ``clip`` into the recording ``rec`` under ``prefix`` (see the module's table).

    ``rgb_jpeg``: the frames' encoded JPEG bytes (a shard's ``rgb.NNN.jpg``); logged as they are,
    so the viewer shows exactly what the shard holds, without a second compression.
    """
    rr = import_rerun()
    t_count = clip.num_frames
    h, w = clip.rgb.shape[1:3]
    c2w = np.asarray(clip.c2w, dtype=np.float64)
    view = world_view_coordinates(c2w)
    if view is not None:
        rec.log(prefix, view, static=True)
    rec.log(f"{prefix}/camera_path", rr.LineStrips3D([c2w[:, :3, 3]], colors=[[200, 200, 200]]), static=True)
    tracks = vis = colours = None
    if clip.tracks is not None and clip.track_visible is not None:
        tracks = np.asarray(clip.tracks, dtype=np.float64)
        vis = np.asarray(clip.track_visible, dtype=bool) & np.all(np.isfinite(tracks), axis=-1)
        colours = _colours_u8(tracks.shape[1])
    for t in range(t_count):
        rec.set_time(timeline, sequence=t)
        if clip.meta.frame_indices:
            rec.set_time("source_frame", sequence=int(clip.meta.frame_indices[t]))
        fx, fy, cx, cy = (float(v) for v in clip.intrinsics[t])
        rec.log(f"{prefix}/camera", rr.Transform3D(translation=c2w[t, :3, 3], mat3x3=c2w[t, :3, :3]))
        rec.log(
            f"{prefix}/camera/image",
            rr.Pinhole(
                focal_length=[fx, fy], principal_point=[cx, cy], resolution=[w, h], camera_xyz=rr.ViewCoordinates.RDF
            ),
        )
        if rgb_jpeg is not None:
            rec.log(f"{prefix}/camera/image/rgb", rr.EncodedImage(contents=rgb_jpeg[t], media_type="image/jpeg"))
        else:
            rec.log(f"{prefix}/camera/image/rgb", rr.Image(clip.rgb[t]))
        if clip.depth is not None:
            d = np.where(clip.depth_valid[t], clip.depth[t], 0.0).astype(np.float32)
            rec.log(f"{prefix}/camera/image/depth", rr.DepthImage(d, meter=1.0))
        if tracks is not None:
            ids = np.flatnonzero(vis[t])
            pts = tracks[t, ids]
            rec.log(
                f"{prefix}/tracks",
                rr.Points3D(pts, colors=colours[ids], radii=rr.Radius.ui_points(3.0)),
                *_track_ids(rr, ids),
            )
            uv, z = project(pts, clip.intrinsics[t], c2w[t])
            front = z > 0
            rec.log(
                f"{prefix}/camera/image/tracks",
                rr.Points2D(uv[front], colors=colours[ids[front]], radii=rr.Radius.ui_points(3.0)),
                *_track_ids(rr, ids[front]),
            )
            strips, strip_colours = [], []
            for j in ids:
                past = tracks[max(0, t - TRAIL_FRAMES) : t + 1, j]
                past = past[vis[max(0, t - TRAIL_FRAMES) : t + 1, j]]
                if len(past) > 1:
                    strips.append(past)
                    strip_colours.append(colours[j])
            rec.log(f"{prefix}/tracks/trails", rr.LineStrips3D(strips, colors=strip_colours or None))
