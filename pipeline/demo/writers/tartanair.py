"""Encode a rendered scene in TartanAir v1's raw layout (see stages/ingest/tartanair.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene
from pipeline.demo.writers.common import WrittenScene

# The renderer's world is OpenCV-like (x right, y down, z forward); TartanAir's is NED.
# p_ned = A p_render with x_ned = z, y_ned = x, z_ned = y.
WORLD_FROM_RENDER = geo.NED_TO_CV.copy()


def write(scene: RenderedScene, root: Path, scene_id: str = "demoenv/Easy/P000") -> WrittenScene:
    if not np.isclose(scene.spec.width / 2.0, scene.intrinsics[0, 0]):
        raise ValueError("TartanAir fixtures need a 90-degree horizontal FOV (fx = W/2)")
    out = Path(root) / scene_id
    (out / "image_left").mkdir(parents=True, exist_ok=True)
    (out / "depth_left").mkdir(parents=True, exist_ok=True)
    lines = []
    for t in range(scene.spec.num_frames):
        Image.fromarray(scene.rgb[t]).save(out / "image_left" / f"{t:06d}_left.png")
        np.save(out / "depth_left" / f"{t:06d}_left_depth.npy", scene.depth[t].astype(np.float32))
        c2w_ned = geo.opencv_c2w_to_ned(WORLD_FROM_RENDER @ scene.c2w[t])
        q = geo.matrix_to_quat_xyzw(c2w_ned[:3, :3])
        tx, ty, tz = c2w_ned[:3, 3]
        lines.append(" ".join(f"{v:.9e}" for v in (tx, ty, tz, *q)))
    (out / "pose_left.txt").write_text("\n".join(lines) + "\n")
    return WrittenScene(
        dataset="tartanair",
        scene_id=scene_id,
        world_from_render=WORLD_FROM_RENDER,
        frame_ids=list(range(scene.spec.num_frames)),
    )


def demo_spec(index: int, seed: int):
    """TartanAir scenes are static with a 90-degree FOV."""
    from pipeline.demo.render import random_scene

    return random_scene(f"tartanair_{index}", seed=seed, dynamic=False, num_frames=12, height=48, width=64)


def default_scene_id(index: int) -> str:
    return f"demoenv{index // 2}/{'Easy' if index % 2 == 0 else 'Hard'}/P{index:03d}"
