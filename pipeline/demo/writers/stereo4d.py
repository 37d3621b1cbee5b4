"""Encode a rendered scene in Stereo4D's layout (see stages/ingest/stereo4d.py).

Writes the released annotation ``<split>/<clip>.npz`` with the release's keys — ``name``,
``video_id``, ``timestamps`` (microseconds), ``camera2world`` (T,3,4), the packed 3D tracks
``track_lengths``/``track_indices``/``track_coordinates``, ``rectified2rig`` (2,3,3) and
``fov_bounds`` (4,) — and the left video that the authors' ``rectify.py`` produces from it,
``<clip>-left_rectified.mp4`` (H.264 yuv420p at 30 fps, lossy), beside the npz or in
rectify.py's per-clip folder ``<split>/<clip>/``.

The world is metric and, as for a bundle-adjusted clip, anchored at the first camera.
Tracks are stored only where the rendered point is visible (as the release keeps only points
that passed the authors' visibility/depth filtering); tracks never visible are dropped.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene
from pipeline.demo.writers.common import WrittenScene

HFOV_DEG = 60.0
FIRST_TIMESTAMP_US = 130_030_030
FRAME_PERIOD_US = 1e6 * 1001 / 30000


def write(scene: RenderedScene, root: Path, scene_id: str | None = None, video_layout: str = "beside",
          with_video: bool = True, crf: int = 18) -> WrittenScene:
    t_count, h, w = scene.rgb.shape[:3]
    f = geo.fov_to_focal(np.deg2rad(HFOV_DEG), w)
    if not (np.allclose(scene.intrinsics[:, 0], f) and np.allclose(scene.intrinsics[:, 1], f)
            and np.allclose(scene.intrinsics[:, 2:], [w / 2.0, h / 2.0])):
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
        root / split / f"{clip}.npz",
        name=np.array(clip),
        video_id=np.array(video_id),
        timestamps=stamps,
        camera2world=c2w[:, :3, :].astype(np.float32),
        track_lengths=lengths,
        track_indices=np.concatenate(indices).astype(np.int64) if indices else np.zeros(0, np.int64),
        track_coordinates=(np.concatenate(coords) if coords else np.zeros((0, 3))).astype(np.float32),
        rectified2rig=np.tile(np.eye(3, dtype=np.float32), (2, 1, 1)),
        fov_bounds=np.array([-90.0, 90.0, -90.0, 90.0], dtype=np.float32),
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
    return WrittenScene(dataset="stereo4d", scene_id=scene_id, world_from_render=world_from_render,
                        frame_ids=stamps.tolist(), pose_scale=1.0,
                        notes=f"tracks kept (render track ids, file order): {kept.tolist()}")


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


def default_scene_id(index: int) -> str:
    split = "test" if index % 4 == 3 else "train"
    return f"{split}/{_video_id(f'stereo4d_{index}')}_{FIRST_TIMESTAMP_US + 1001 * index}"
