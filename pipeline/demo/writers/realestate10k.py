"""Encode a rendered scene in RealEstate10K's layout (see stages/ingest/realestate10k.py).

Writes ``<split>/<sequence_id>.txt`` exactly as the release does (URL line, then per frame
``timestamp_us fx fy cx cy k1 k2`` + a row-major 3x4 world-to-camera matrix, intrinsics
normalised by the image size, 9 decimals) and the frames a user would extract beside it,
``<split>/<sequence_id>/<timestamp_us>.png`` (or .jpg). Optionally also a clip video
``<split>/<sequence_id>.mp4`` with one frame per camera line.

RealEstate10K poses are up to scale and in an arbitrary SLAM world; the fixture mimics that
with a world whose origin is the first camera and a translation scale ``POSE_SCALE`` units/m.
"""
from __future__ import annotations

import zlib
from pathlib import Path

from PIL import Image

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene
from pipeline.demo.writers.common import WrittenScene

POSE_SCALE = 0.37  # dataset units per metre: an arbitrary SLAM scale, != 1 on purpose
FIRST_TIMESTAMP_US = 45_045_000
FRAME_PERIOD_US = 1e6 * 1001 / 30000  # NTSC 29.97 fps, as most YouTube walkthroughs


def timestamps_us(num_frames: int) -> list[int]:
    return [int(round(FIRST_TIMESTAMP_US + i * FRAME_PERIOD_US)) for i in range(num_frames)]


def write(scene: RenderedScene, root: Path, scene_id: str | None = None, image_ext: str = ".png",
          jpeg_quality: int = 95, with_frames: bool = True, with_video: bool = False) -> WrittenScene:
    scene_id = scene_id or default_scene_id(0)
    t_count, h, w = scene.rgb.shape[:3]
    root = Path(root)
    txt = root / f"{scene_id}.txt"
    txt.parent.mkdir(parents=True, exist_ok=True)
    world_from_render = geo.invert_pose(scene.c2w[0])
    stamps = timestamps_us(t_count)
    seq = Path(scene_id).name
    lines = [f"https://www.youtube.com/watch?v={_video_id(seq)}"]
    for t in range(t_count):
        c2w = world_from_render @ scene.c2w[t]
        c2w[:3, 3] *= POSE_SCALE
        w2c = geo.invert_pose(c2w)
        fx, fy, cx, cy = scene.intrinsics[t]
        nums = [fx / w, fy / h, cx / w, cy / h, 0.0, 0.0, *w2c[:3, :].reshape(-1)]
        lines.append(f"{stamps[t]} " + " ".join(f"{v:.9f}" for v in nums))
    txt.write_text("\n".join(lines) + "\n")
    if with_frames:
        folder = root / scene_id
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(t_count):
            img = Image.fromarray(scene.rgb[t])
            if image_ext in (".jpg", ".jpeg"):
                img.save(folder / f"{stamps[t]}{image_ext}", quality=jpeg_quality)
            else:
                img.save(folder / f"{stamps[t]}{image_ext}")
    if with_video:
        from stages.ingest.video import write_mp4

        write_mp4(root / f"{scene_id}.mp4", scene.rgb, fps=30)
    return WrittenScene(dataset="realestate10k", scene_id=scene_id, world_from_render=world_from_render,
                        frame_ids=stamps, pose_scale=POSE_SCALE,
                        notes="poses up to scale (POSE_SCALE units per metre); world = first camera")


def _video_id(seq: str) -> str:
    """A deterministic 11-character YouTube-like id for the URL line."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    n = int(seq, 16) if seq and all(c in "0123456789abcdef" for c in seq) else zlib.crc32(seq.encode()) * 2654435761
    return "".join(alphabet[(n >> (6 * i)) & 63] for i in range(11))


def demo_spec(index: int, seed: int):
    """Static real-estate walkthrough: 16:9 frames, ~90-degree horizontal FOV, no moving objects."""
    from pipeline.demo.render import random_scene

    spec = random_scene(f"realestate10k_{index}", seed=seed, dynamic=False, num_frames=10, height=36, width=64)
    spec.fov_x_deg = 90.0
    return spec


def default_scene_id(index: int) -> str:
    split = "test" if index % 4 == 3 else "train"
    seq = f"{(0x9E3779B97F4A7C15 * (index + 1)) & 0xFFFFFFFFFFFFFFFF:016x}"
    return f"{split}/{seq}"
