"""Encode a rendered scene as a Kubric MOVi-F TFDS record (see stages/ingest/kubric.py).

Writes (or appends to) a TFRecord shard ``<root>/movi_f/<H>x<W>/1.0.0/movi_f-<split>.tfrecord-
NNNNN-of-MMMMM`` with real TFRecord framing (length, masked CRC32C, payload, masked CRC32C) and
one ``tf.train.Example`` per video whose keys follow TFDS's flattening of the MOVi-F
FeaturesDict: ``video`` (PNG frames), ``depth`` (16-bit PNGs of the camera-centre *distance*,
quantised over ``metadata/depth_range``), ``camera/{focal_length,sensor_width,field_of_view,
positions,quaternions}`` (quaternions w x y z; Blender camera axes), and ``metadata/{video_name,
width,height,num_frames,num_instances,depth_range,motion_blur}``, ``background``. Segmentations,
flow, normals, object coordinates, instances and events of the release are not written (d4s
does not read them).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene
from pipeline.demo.writers.common import WrittenScene
from stages.ingest.kubric import build_example, frame_record, iter_record_offsets

# Renderer world (y down) -> kubric's z-up world.
WORLD_FROM_RENDER = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
SENSOR_WIDTH_MM = 32.0  # kubric's default camera sensor width


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encode_example(scene: RenderedScene, video_name: str) -> bytes:
    t_count, h, w = scene.depth.shape
    k = scene.intrinsics[0]
    if not (np.isclose(k[0], k[1]) and np.isclose(k[2], w / 2) and np.isclose(k[3], h / 2)):
        raise ValueError("Kubric fixtures need a centred square-pixel pinhole")
    u, v = geo.pixel_grid(h, w)
    ray_norm = np.sqrt(((u - k[2]) / k[0]) ** 2 + ((v - k[3]) / k[1]) ** 2 + 1.0)
    dist = scene.depth.astype(np.float64) * ray_norm  # kubric stores distance to the camera centre
    dmin, dmax = float(np.float32(dist.min())), float(np.float32(dist.max()))
    q16 = np.round((dist - dmin) / (dmax - dmin) * 65535).astype(np.uint16)
    c2w_gl = geo.opencv_c2w_to_opengl(WORLD_FROM_RENDER @ scene.c2w)
    xyzw = geo.matrix_to_quat_xyzw(c2w_gl[:, :3, :3])
    wxyz = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    focal_mm = k[0] / w * SENSOR_WIDTH_MM
    fov = 2.0 * np.arctan(0.5 * w / k[0])
    feats = {
        "video": ("bytes", [_png(scene.rgb[t]) for t in range(t_count)]),
        "depth": ("bytes", [_png(q16[t]) for t in range(t_count)]),
        "camera/focal_length": ("float", [focal_mm]),
        "camera/sensor_width": ("float", [SENSOR_WIDTH_MM]),
        "camera/field_of_view": ("float", [fov]),
        "camera/positions": ("float", c2w_gl[:, :3, 3].reshape(-1).tolist()),
        "camera/quaternions": ("float", wxyz.reshape(-1).tolist()),
        "metadata/video_name": ("bytes", [video_name.encode()]),
        "metadata/width": ("int64", [w]),
        "metadata/height": ("int64", [h]),
        "metadata/num_frames": ("int64", [t_count]),
        "metadata/num_instances": ("int64", [len(scene.spec.boxes)]),
        "metadata/depth_range": ("float", [dmin, dmax]),
        "metadata/motion_blur": ("float", [0.0]),
        "background": ("bytes", [b"demo_room"]),
    }
    return build_example(feats)


def write(scene: RenderedScene, root: Path, scene_id: str | None = None) -> WrittenScene:
    h, w = scene.spec.height, scene.spec.width
    scene_id = scene_id or f"movi_f/{h}x{w}/1.0.0/movi_f-train.tfrecord-00000-of-00001/00000"
    shard_rel, k = scene_id.rsplit("/", 1)
    shard = Path(root) / shard_rel
    shard.parent.mkdir(parents=True, exist_ok=True)
    existing = 0
    if shard.exists():
        with open(shard, "rb") as f:
            existing = len(iter_record_offsets(f, str(shard)))
    if int(k) != existing:
        raise ValueError(f"{shard} holds {existing} records; the next one written is record {existing}, not {k}")
    with open(shard, "ab") as f:
        f.write(frame_record(encode_example(scene, video_name=f"{scene.spec.name}")))
    # Kubric's camera positions are stored as float32: poses are exact to ~1e-7 relative.
    return WrittenScene(
        dataset="kubric_movi_f",
        scene_id=scene_id,
        world_from_render=WORLD_FROM_RENDER,
        frame_ids=list(range(scene.spec.num_frames)),
    )


def demo_spec(index: int, seed: int):
    """Dynamic objects, square frames, kubric's default 35 mm / 32 mm camera (~49 deg FOV)."""
    from pipeline.demo.render import random_scene

    spec = random_scene(f"kubric_movi_f_{index}", seed=seed, dynamic=True, num_frames=12, height=48, width=48)
    spec.fov_x_deg = float(np.degrees(2.0 * np.arctan(0.5 * SENSOR_WIDTH_MM / 35.0)))
    return spec


def default_scene_id(index: int) -> str:
    return f"movi_f/48x48/1.0.0/movi_f-train.tfrecord-{index:05d}-of-01024/00000"
