"""Encode a rendered scene in Virtual KITTI 2's release layout (see stages/ingest/vkitti2.py).

Per variation ``Scene<NN>/<variation>/``: ``frames/rgb/Camera_{0,1}/rgb_NNNNN.jpg``,
``frames/depth/Camera_{0,1}/depth_NNNNN.png`` (uint16 centimetres, 65535 = sky/far),
``intrinsic.txt`` and ``extrinsic.txt`` (header line, then one row per frame and camera, frames
interleaved camera 0 then 1; K with pixel centres at integer coordinates, world-to-camera 4x4
row-major). Camera_1 is the right camera of the stereo rig, 0.532725 m along the left camera's
x axis, rendered separately. With ``archives=True`` the modalities go into side-by-side
``vkitti_2.0.3_{rgb,depth,textgt}/`` folders, as when the three release archives are extracted
next to each other. Segmentation, flow, pose.txt and bbox.txt are not written (d4s does not read
them).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene, render
from pipeline.demo.writers.common import WrittenScene

BASELINE_M = 0.532725
JPEG_QUALITY = 95  # 4:4:4 chroma: tiny high-contrast fixtures lose too much at 4:2:0
# An arbitrary rigid world (the release's world is Unity-derived; only consistency matters).
_A = np.deg2rad(40.0)
WORLD_FROM_RENDER = geo.make_pose(
    np.array([[np.cos(_A), 0.0, np.sin(_A)], [0.0, 1.0, 0.0], [-np.sin(_A), 0.0, np.cos(_A)]]),
    np.array([12.5, -1.0, 30.0]),
)
SCENES = ("Scene01", "Scene02", "Scene06", "Scene18", "Scene20")
VARIATIONS = (
    "clone",
    "fog",
    "morning",
    "overcast",
    "rain",
    "sunset",
    "15-deg-left",
    "15-deg-right",
    "30-deg-left",
    "30-deg-right",
)


def _right_camera(scene: RenderedScene) -> RenderedScene:
    shift = geo.make_pose(np.eye(3), np.array([BASELINE_M, 0.0, 0.0]))
    spec = dataclasses.replace(scene.spec, camera_path=scene.c2w @ shift)
    return render(spec)


def write(
    scene: RenderedScene, root: Path, scene_id: str | None = None, cameras=(0, 1), archives: bool = False
) -> WrittenScene:
    scene_id = scene_id or default_scene_id(0)
    variation_dir = re.sub(r"/Camera_\d+$", "", scene_id)
    root = Path(root)
    text_root = root / "vkitti_2.0.3_textgt" if archives else root
    rgb_root = root / "vkitti_2.0.3_rgb" if archives else root
    depth_root = root / "vkitti_2.0.3_depth" if archives else root
    views = {0: scene}
    if 1 in cameras:
        views[1] = _right_camera(scene)
    t_count = scene.spec.num_frames
    int_lines = ["frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"]
    ext_lines = ["frame cameraID r1,1 r1,2 r1,3 t1 r2,1 r2,2 r2,3 t2 r3,1 r3,2 r3,3 t3 0 0 0 1"]
    for cam, view in views.items():
        rgb_dir = rgb_root / variation_dir / "frames" / "rgb" / f"Camera_{cam}"
        depth_dir = depth_root / variation_dir / "frames" / "depth" / f"Camera_{cam}"
        rgb_dir.mkdir(parents=True, exist_ok=True)
        depth_dir.mkdir(parents=True, exist_ok=True)
        for t in range(t_count):
            Image.fromarray(view.rgb[t]).save(rgb_dir / f"rgb_{t:05d}.jpg", quality=JPEG_QUALITY, subsampling=0)
            d = view.depth[t].astype(np.float64)
            cm = np.where(np.isfinite(d), np.clip(np.rint(d * 100.0), 0, 65535), 65535).astype(np.uint16)
            Image.fromarray(cm).save(depth_dir / f"depth_{t:05d}.png")
    for t in range(t_count):
        for cam, view in views.items():
            fx, fy, cx, cy = view.intrinsics[t]
            int_lines.append(f"{t} {cam} {fx:.9g} {fy:.9g} {cx - 0.5:.9g} {cy - 0.5:.9g}")
            w2c = geo.invert_pose(WORLD_FROM_RENDER @ view.c2w[t])
            ext_lines.append(f"{t} {cam} " + " ".join(f"{v:.9g}" for v in w2c.reshape(-1)))
    text_dir = text_root / variation_dir
    text_dir.mkdir(parents=True, exist_ok=True)
    (text_dir / "intrinsic.txt").write_text("\n".join(int_lines) + "\n")
    (text_dir / "extrinsic.txt").write_text("\n".join(ext_lines) + "\n")
    return WrittenScene(
        dataset="vkitti2",
        scene_id=f"{variation_dir}/Camera_0",
        world_from_render=WORLD_FROM_RENDER,
        frame_ids=list(range(t_count)),
        notes="Camera_1 is rendered BASELINE_M to the right of Camera_0",
    )


def driving_path(num_frames: int, seed: int) -> np.ndarray:
    """Forward motion along the room's z axis with a gentle weave, eye ~0.9 m above the floor."""
    rng = np.random.default_rng(seed)
    x0, phase = rng.uniform(-0.4, 0.4), rng.uniform(0, 2 * np.pi)
    poses = []
    for t in range(num_frames):
        eye = np.array([x0 + 0.1 * np.sin(phase + 0.3 * t), 0.55, -3.3 + 0.12 * t])
        target = eye + np.array([0.15 * np.sin(phase + 0.3 * t + 0.5), 0.08, 1.0])
        poses.append(geo.look_at_c2w(eye, target, up=(0.0, -1.0, 0.0)))
    return np.stack(poses)


def demo_spec(index: int, seed: int):
    """Dynamic driving-like scene: wide 3.3:1 frames, ~81 degree horizontal FOV as in 1242x375."""
    from pipeline.demo.render import random_scene

    spec = random_scene(f"vkitti2_{index}", seed=seed, dynamic=True, num_frames=10, height=24, width=80)
    spec.fov_x_deg = float(np.rad2deg(2 * np.arctan(621.0 / 725.0087)))
    spec.camera_path = driving_path(spec.num_frames, seed)
    return spec


def default_scene_id(index: int) -> str:
    return f"{SCENES[index % len(SCENES)]}/{VARIATIONS[(index // len(SCENES)) % len(VARIATIONS)]}/Camera_0"
