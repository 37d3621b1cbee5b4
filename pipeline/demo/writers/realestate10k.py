"""Encode a rendered scene in RealEstate10K's layouts (see stages/ingest/realestate10k.py).

Writes ``<split>/<sequence_id>.txt`` exactly as the release does (URL line, then per frame
``timestamp_us fx fy cx cy k1 k2`` + a row-major 3x4 world-to-camera matrix, intrinsics
normalised by the image size, 9 decimals) and, as chosen, the frames a user would have:

- ``with_frames``: extracted beside it, ``<split>/<sequence_id>/<timestamp_us>.png`` (or .jpg);
- ``with_video``: a clip video ``<split>/<sequence_id>.mp4`` with one frame per camera line;
- ``with_youtube_video``: the downloaded YouTube video ``videos/<video_id>.mp4``: H.264 at
  30000/1001 fps from time 0, the rendered frames at the frames whose times the camera file
  lists (frame ``FIRST_FRAME + i * video_step``), other frames distinguishable filler (grey
  before, colour-inverted neighbours between camera frames, a tail after), keyframes every
  ``GOP`` frames. A reader that picks the wrong frame gets an inverted or grey image.

``write_chunk`` writes scenes as a pixelSplat/MVSplat chunk ``<split>/<NNNNNN>.torch`` (a list of
examples: key, url, int64 timestamps, float32 (T,18) cameras, JPEG bytes as uint8 tensors, as
dcharatan/real_estate_10k_tools' convert.py makes them) and merges its keys into
``<split>/index.json``.

RealEstate10K poses are up to scale and in an arbitrary SLAM world; the fixture mimics that
with a world whose origin is the first camera and a translation scale ``POSE_SCALE`` units/m.
"""

from __future__ import annotations

import io
import json
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene
from pipeline.demo.writers.common import WrittenScene

POSE_SCALE = 0.37  # dataset units per metre: an arbitrary SLAM scale, != 1 on purpose
VIDEO_RATE = Fraction(30000, 1001)  # NTSC 29.97 fps, as most YouTube walkthroughs
FRAME_PERIOD_US = 1e6 / VIDEO_RATE
FIRST_FRAME = 1350  # the sequence starts 45.045 s into its video
FIRST_TIMESTAMP_US = round(FIRST_FRAME * FRAME_PERIOD_US)  # 45_045_000
GOP = 60  # keyframe interval of the "downloaded" video
TAIL_FRAMES = 12


def timestamps_us(num_frames: int, step: int = 1) -> list[int]:
    """Times of video frames FIRST_FRAME, FIRST_FRAME + step, ... rounded to microseconds."""
    return [int(round((FIRST_FRAME + i * step) * FRAME_PERIOD_US)) for i in range(num_frames)]


def camera_rows(scene: RenderedScene, world_from_render: np.ndarray) -> np.ndarray:
    """(T, 18) ``fx fy cx cy`` (normalised) ``0 0`` and the row-major 3x4 world-to-camera."""
    t_count, h, w = scene.rgb.shape[:3]
    rows = []
    for t in range(t_count):
        c2w = world_from_render @ scene.c2w[t]
        c2w[:3, 3] *= POSE_SCALE
        w2c = geo.invert_pose(c2w)
        fx, fy, cx, cy = scene.intrinsics[t]
        rows.append([fx / w, fy / h, cx / w, cy / h, 0.0, 0.0, *w2c[:3, :].reshape(-1)])
    return np.asarray(rows)


def write(
    scene: RenderedScene,
    root: Path,
    scene_id: str | None = None,
    image_ext: str = ".png",
    jpeg_quality: int = 95,
    with_frames: bool = True,
    with_video: bool = False,
    with_youtube_video: bool = False,
    video_step: int = 1,
) -> WrittenScene:
    scene_id = scene_id or default_scene_id(0)
    t_count, h, w = scene.rgb.shape[:3]
    root = Path(root)
    txt = root / f"{scene_id}.txt"
    txt.parent.mkdir(parents=True, exist_ok=True)
    world_from_render = geo.invert_pose(scene.c2w[0])
    stamps = timestamps_us(t_count, video_step)
    seq = Path(scene_id).name
    lines = [youtube_url(seq)]
    for t, nums in enumerate(camera_rows(scene, world_from_render)):
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
    if with_youtube_video:
        write_youtube_video(scene.rgb, root / "videos" / f"{_video_id(seq)}.mp4", video_step)
    return WrittenScene(
        dataset="realestate10k",
        scene_id=scene_id,
        world_from_render=world_from_render,
        frame_ids=stamps,
        pose_scale=POSE_SCALE,
        notes="poses up to scale (POSE_SCALE units per metre); world = first camera",
    )


def youtube_frames(rgb: np.ndarray, step: int = 1) -> np.ndarray:
    """The whole video's frames: grey lead-in, the rendered frames every ``step`` frames with
    colour-inverted copies between them, a grey tail."""
    t_count, h, w = rgb.shape[:3]
    total = FIRST_FRAME + (t_count - 1) * step + 1 + TAIL_FRAMES
    video = np.full((total, h, w, 3), 96, np.uint8)
    for i in range(t_count):
        k = FIRST_FRAME + i * step
        video[k] = rgb[i]
        for j in range(1, step):
            video[k + j] = 255 - rgb[i]
    return video


def write_youtube_video(rgb: np.ndarray, path: Path, step: int = 1, frame_times_s=None) -> None:
    from stages.ingest.video import write_mp4

    write_mp4(path, youtube_frames(rgb, step), fps=VIDEO_RATE, gop=GOP, frame_times_s=frame_times_s)


def write_chunk(
    scenes: list[tuple[RenderedScene, str]], root: Path, chunk_index: int = 0, jpeg_quality: int = 95
) -> list[WrittenScene]:
    """Scenes (all of one split) as one pixelSplat chunk ``<split>/<chunk_index:06d>.torch``."""
    import torch

    root = Path(root)
    splits = {Path(sid).parent.as_posix() for _, sid in scenes}
    if len(splits) != 1:
        raise ValueError(f"a chunk holds scenes of one split, got {sorted(splits)}")
    split = splits.pop()
    name = f"{chunk_index:06d}.torch"
    examples, written = [], []
    for scene, sid in scenes:
        seq = Path(sid).name
        world_from_render = geo.invert_pose(scene.c2w[0])
        stamps = timestamps_us(len(scene.rgb))
        images = []
        for frame in scene.rgb:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=jpeg_quality)
            images.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
        examples.append(
            {
                "url": youtube_url(seq),
                "timestamps": torch.tensor(stamps, dtype=torch.int64),
                "cameras": torch.tensor(camera_rows(scene, world_from_render), dtype=torch.float32),
                "images": images,
                "key": seq,
            }
        )
        written.append(
            WrittenScene(
                dataset="realestate10k",
                scene_id=sid,
                world_from_render=world_from_render,
                frame_ids=stamps,
                pose_scale=POSE_SCALE,
                notes=f"chunk {split}/{name}",
            )
        )
    (root / split).mkdir(parents=True, exist_ok=True)
    torch.save(examples, root / split / name)
    index_path = root / split / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    index.update({Path(sid).name: name for _, sid in scenes})
    index_path.write_text(json.dumps(index))
    return written


def youtube_url(seq: str) -> str:
    return f"https://www.youtube.com/watch?v={_video_id(seq)}"


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


def demo_write(scene: RenderedScene, root: Path, index: int) -> WrittenScene:
    """The demo's forms: scene 0 from its downloaded video, scene 1 from a chunk, others as frames."""
    sid = default_scene_id(index)
    if index == 0:
        return write(scene, root, sid, with_frames=False, with_youtube_video=True)
    if index == 1:
        return write_chunk([(scene, sid)], root, chunk_index=index)[0]
    return write(scene, root, sid)


def default_scene_id(index: int) -> str:
    split = "test" if index % 4 == 3 else "train"
    seq = f"{(0x9E3779B97F4A7C15 * (index + 1)) & 0xFFFFFFFFFFFFFFFF:016x}"
    return f"{split}/{seq}"
