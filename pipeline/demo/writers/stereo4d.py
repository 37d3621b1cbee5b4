"""Encode a rendered scene in Stereo4D's layout (see stages/ingest/stereo4d.py).

Writes the released annotation ``<split>/<clip>.npz`` with the release's keys — ``name``,
``video_id``, ``timestamps`` (microseconds), ``camera2world`` (T,3,4), the packed 3D tracks
``track_lengths``/``track_indices``/``track_coordinates``, ``rectified2rig`` (2,3,3) and
``fov_bounds`` (4,) — and the left video that the authors' ``rectify.py`` produces from it,
``<clip>-left_rectified.mp4`` (H.264 yuv420p at 30 fps, lossy), beside the npz or in
rectify.py's per-clip folder ``<split>/<clip>/``.

``write_raw`` instead writes what a user downloads: the npz with a real rig calibration
(``rectified2rig`` rotations of a few degrees, ``fov_bounds`` +-90 degrees) and the side-by-side
equirectangular VR180 video ``raw/<video_id>.mp4`` (two square 180x180-degree eyes, 63 mm apart,
ray-cast from the scene, H.264 at 30000/1001 fps from time 0; the clip's frames at its
timestamps, grey lead-in before). Rectifying it with the npz gives back the rendered 60-degree
view up to resampling and compression.

The world is metric and, as for a bundle-adjusted clip, anchored at the first camera.
Tracks are stored only where the rendered point is visible (as the release keeps only points
that passed the authors' visibility/depth filtering); tracks never visible are dropped.
"""

from __future__ import annotations

import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene
from pipeline.demo.writers.common import WrittenScene

HFOV_DEG = 60.0
FIRST_TIMESTAMP_US = 130_030_030
FRAME_PERIOD_US = 1e6 * 1001 / 30000


def write(
    scene: RenderedScene,
    root: Path,
    scene_id: str | None = None,
    video_layout: str = "beside",
    with_video: bool = True,
    crf: int = 18,
) -> WrittenScene:
    t_count, h, w = scene.rgb.shape[:3]
    f = geo.fov_to_focal(np.deg2rad(HFOV_DEG), w)
    if not (
        np.allclose(scene.intrinsics[:, 0], f)
        and np.allclose(scene.intrinsics[:, 1], f)
        and np.allclose(scene.intrinsics[:, 2:], [w / 2.0, h / 2.0])
    ):
        raise ValueError("Stereo4D fixtures need a 60-degree horizontal FOV, square pixels, centred principal point")
    if scene_id is None:
        scene_id = f"train/{_video_id(scene.spec.name)}_{FIRST_TIMESTAMP_US}"
    split, clip = scene_id.rsplit("/", 1)
    # Clip ids are <video_id>_<first frame timestamp in microseconds>.
    video_id, _, first = clip.rpartition("_")
    start = int(first) if first.isdigit() else FIRST_TIMESTAMP_US
    video_id = video_id or clip
    stamps = np.array([int(round(start + i * FRAME_PERIOD_US)) for i in range(t_count)], dtype=np.int64)
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)

    world_from_render = _write_npz(
        scene, root, split, clip, video_id, stamps, DEFAULT_RECTIFIED2RIG, DEFAULT_FOV_BOUNDS
    )
    if with_video:
        from stages.ingest.video import write_mp4

        if video_layout == "beside":
            path = root / split / f"{clip}-left_rectified.mp4"
        elif video_layout == "subfolder":
            path = root / split / clip / f"{clip}-left_rectified.mp4"
        else:
            raise ValueError(f"unknown video_layout {video_layout!r}")
        write_mp4(path, scene.rgb, fps=30, crf=crf)
    return WrittenScene(
        dataset="stereo4d",
        scene_id=scene_id,
        world_from_render=world_from_render,
        frame_ids=stamps.tolist(),
        pose_scale=1.0,
        notes=f"tracks kept (render track ids, file order): {kept_tracks(scene).tolist()}",
    )


def _write_npz(scene, root, split, clip, video_id, stamps, rectified2rig, fov_bounds) -> np.ndarray:
    """The released annotation; returns world_from_render (the world is the first camera)."""
    world_from_render = geo.invert_pose(scene.c2w[0])
    c2w = world_from_render @ scene.c2w
    visible = scene.tracks_visible  # (T, N)
    kept = np.flatnonzero(visible.any(axis=0))
    lengths = visible[:, kept].sum(axis=0).astype(np.int64)
    indices, coords = [], []
    for n in kept:
        frames = np.flatnonzero(visible[:, n])
        indices.append(frames)
        pts = scene.tracks_world[frames, n]
        coords.append(pts @ world_from_render[:3, :3].T + world_from_render[:3, 3])
    np.savez_compressed(
        Path(root) / split / f"{clip}.npz",
        name=np.array(clip),
        video_id=np.array(video_id),
        timestamps=np.asarray(stamps, dtype=np.int64),
        camera2world=c2w[:, :3, :].astype(np.float32),
        track_lengths=lengths,
        track_indices=np.concatenate(indices).astype(np.int64) if indices else np.zeros(0, np.int64),
        track_coordinates=(np.concatenate(coords) if coords else np.zeros((0, 3))).astype(np.float32),
        rectified2rig=np.asarray(rectified2rig, dtype=np.float32),
        fov_bounds=np.asarray(fov_bounds, dtype=np.float32),
    )
    return world_from_render


# -- raw VR180 ------------------------------------------------------------------------------------

VIDEO_RATE = Fraction(30000, 1001)
BASELINE_M = 0.063
RAW_FIRST_FRAME = 45  # the clip starts 1.5 s into its raw video
TIMESTAMP_JITTER_US = 37  # release timestamps sit a little off the frame times; readers take the nearest frame


def rig_rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    y, p, r = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return ry @ rx @ rz


DEFAULT_RECTIFIED2RIG = np.stack([rig_rotation(3.0, -2.0, 1.0), rig_rotation(-1.5, 1.0, -0.5)])
DEFAULT_FOV_BOUNDS = np.array([-90.0, 90.0, -90.0, 90.0])


def equirect_sbs(
    scene: RenderedScene,
    eye_size: int,
    rectified2rig: np.ndarray = DEFAULT_RECTIFIED2RIG,
    fov_bounds: np.ndarray = DEFAULT_FOV_BOUNDS,
) -> np.ndarray:
    """(T, eye, 2 eye, 3) uint8: each eye's equirect, ray-cast like render() does the pinhole view.

    Pixel (row j, col i) looks along yaw ``y0 + i (y1 - y0) / (W - 1)``, tilt likewise (rectify.py's
    rule) in the raw rig frame; the rectified left camera is ``scene.c2w`` and a rig ray ``r`` is
    the world ray ``R_c2w @ rectified2rig[eye].T @ r``. Shading is render()'s, of the ray in the
    rectified camera, so the 60-degree view cut from this matches the pinhole render.
    """
    from pipeline.demo.render import _cast

    yaw0, yaw1, tilt0, tilt1 = np.deg2rad(np.asarray(fov_bounds, dtype=np.float64))
    idx = np.arange(eye_size, dtype=np.float64)
    lon = yaw0 + idx[None, :] * (yaw1 - yaw0) / (eye_size - 1)
    lat = tilt0 + idx[:, None] * (tilt1 - tilt0) / (eye_size - 1)
    rig = np.stack(np.broadcast_arrays(np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)), axis=-1)
    out = np.zeros((len(scene.c2w), eye_size, 2 * eye_size, 3), np.uint8)
    for t, pose in enumerate(scene.c2w):
        for eye in (0, 1):
            rect = rig @ np.asarray(rectified2rig[eye], dtype=np.float64)  # rows: R^T r, rectified-camera rays
            dirs = rect @ pose[:3, :3].T
            origin = pose[:3, 3] + pose[:3, :3] @ np.array([BASELINE_M * eye, 0.0, 0.0])
            dist, _, col = _cast(scene.spec, t, np.broadcast_to(origin, dirs.shape), dirs)
            shade = 0.75 + 0.25 * np.clip(-rect[..., 1] + 0.5, 0, 1)
            img = np.round(255 * np.clip(col * shade[..., None], 0, 1)).astype(np.uint8)
            out[t, :, eye * eye_size : (eye + 1) * eye_size] = np.where(np.isfinite(dist)[..., None], img, 0)
    return out


def write_raw(
    scene: RenderedScene,
    root: Path,
    video_id: str | None = None,
    split: str = "train",
    eye_size: int = 192,
    crf: int = 14,
    rectified2rig: np.ndarray = DEFAULT_RECTIFIED2RIG,
    fov_bounds: np.ndarray = DEFAULT_FOV_BOUNDS,
    first_frame: int = RAW_FIRST_FRAME,
) -> WrittenScene:
    """The release npz ``<split>/<video_id>_<first timestamp>.npz`` plus the raw side-by-side
    VR180 video ``raw/<video_id>.mp4``; the scene id is in the returned WrittenScene."""
    from stages.ingest.video import write_mp4

    t_count = len(scene.rgb)
    period = 1e6 / VIDEO_RATE
    stamps = np.array([round((first_frame + i) * period) + TIMESTAMP_JITTER_US for i in range(t_count)], np.int64)
    video_id = video_id or _video_id(scene.spec.name)
    clip = f"{video_id}_{stamps[0]}"
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    world_from_render = _write_npz(scene, root, split, clip, video_id, stamps, rectified2rig, fov_bounds)
    sbs = equirect_sbs(scene, eye_size, rectified2rig, fov_bounds)
    video = np.full((first_frame + t_count + 8, eye_size, 2 * eye_size, 3), 96, np.uint8)
    video[first_frame : first_frame + t_count] = sbs
    write_mp4(root / "raw" / f"{video_id}.mp4", video, fps=VIDEO_RATE, crf=crf, gop=30)
    return WrittenScene(
        dataset="stereo4d",
        scene_id=f"{split}/{clip}",
        world_from_render=world_from_render,
        frame_ids=stamps.tolist(),
        pose_scale=1.0,
        notes=f"raw VR180 {2 * eye_size}x{eye_size}; tracks kept: {kept_tracks(scene).tolist()}",
    )


def kept_tracks(scene: RenderedScene) -> np.ndarray:
    """Render track ids in the order the writer stores them (those visible at least once)."""
    return np.flatnonzero(scene.tracks_visible.any(axis=0))


def _video_id(name: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    n = zlib.crc32(name.encode()) * 2654435761 + 12345
    return "".join(alphabet[(n >> (5 * i)) & 63] for i in range(11))


def demo_spec(index: int, seed: int):
    """Dynamic scene with moving boxes, square 60-degree-FOV frames (the rectified video's)."""
    from pipeline.demo.render import random_scene

    spec = random_scene(f"stereo4d_{index}", seed=seed, dynamic=True, num_frames=10, height=48, width=48)
    spec.fov_x_deg = HFOV_DEG
    return spec


DEMO_OPTIONS = {"output_size": 48, "min_vr180_height": 0}  # the demo's raw scene is a small VR180 video


def demo_write(scene: RenderedScene, root: Path, index: int) -> WrittenScene:
    """The demo's forms: odd scenes from the raw VR180 video, even ones from the rectified video."""
    if index % 2 == 1:
        split, clip = default_scene_id(index).split("/")
        return write_raw(scene, root, video_id=clip.rpartition("_")[0], split=split)
    return write(scene, root, default_scene_id(index))


def default_scene_id(index: int) -> str:
    split = "test" if index % 4 == 3 else "train"
    return f"{split}/{_video_id(f'stereo4d_{index}')}_{FIRST_TIMESTAMP_US + 1001 * index}"
