"""Encode a rendered scene in MatrixCity's raw layout (see stages/ingest/matrixcity.py).

Writes one block::

    <root>/<city>/<view>/<split>/<block>/transforms.json, transforms_origin.json, NNNN.png
    <root>/<city>_depth/<view>/<split>/<block>_depth/NNNN.exr   (half-float R=G=B, centimetres)

``transforms.json`` holds ``camera_angle_x`` and ``frames[] = {frame_index, rot_mat}`` with
``rot_mat`` the Blender/NeRF-axes camera-to-world whose rotation block is scaled by 0.01 and
whose translation is in metres, as the release's Blender export writes it. Depth values at or
beyond the float16 range are written as 65504, the release's invalid marker.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene
from pipeline.demo.writers.common import WrittenScene

# Renderer world (y down) -> a z-up city frame, shifted to city-scale coordinates (metres).
WORLD_FROM_RENDER = np.array(
    [[1.0, 0.0, 0.0, -512.25], [0.0, 0.0, 1.0, 231.5], [0.0, -1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1.0]]
)


def write_exr_depth(path: Path, depth_cm: np.ndarray) -> None:
    import OpenEXR

    half = np.minimum(depth_cm, 65504.0).astype(np.float16)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {"R": half, "G": half, "B": half}) as f:
        f.write(str(path))


def write(scene: RenderedScene, root: Path, scene_id: str | None = None) -> WrittenScene:
    scene_id = scene_id or default_scene_id(0)
    city, view, split, block = scene_id.split("/")
    out = Path(root) / scene_id
    dout = Path(root) / f"{city}_depth" / view / split / f"{block}_depth"
    out.mkdir(parents=True, exist_ok=True)
    dout.mkdir(parents=True, exist_ok=True)
    k = scene.intrinsics[0]
    w = scene.spec.width
    if not (np.isclose(k[0], k[1]) and np.isclose(k[2], w / 2.0) and np.isclose(k[3], scene.spec.height / 2.0)):
        raise ValueError("MatrixCity fixtures need a centred square-pixel pinhole")
    frames = []
    for t in range(scene.spec.num_frames):
        Image.fromarray(scene.rgb[t]).save(out / f"{t:04d}.png")
        write_exr_depth(dout / f"{t:04d}.exr", scene.depth[t].astype(np.float64) * 100.0)
        c2w_gl = geo.opencv_c2w_to_opengl(WORLD_FROM_RENDER @ scene.c2w[t])
        rot_mat = c2w_gl.copy()
        rot_mat[:3, :3] *= 0.01
        frames.append({"frame_index": t, "rot_mat": rot_mat.tolist()})
    tj = {"camera_angle_x": float(2.0 * np.arctan(0.5 * w / k[0])), "frames": frames}
    (out / "transforms.json").write_text(json.dumps(tj, indent=2))
    (out / "transforms_origin.json").write_text(json.dumps(tj, indent=2))
    return WrittenScene(
        dataset="matrixcity",
        scene_id=scene_id,
        world_from_render=WORLD_FROM_RENDER,
        frame_ids=list(range(scene.spec.num_frames)),
    )


def demo_spec(index: int, seed: int):
    """Static city blocks; street views are square (1000x1000 in the release), aerial 16:9."""
    from pipeline.demo.render import random_scene

    if index % 2 == 0:
        return random_scene(f"matrixcity_{index}", seed=seed, dynamic=False, num_frames=10, height=48, width=48)
    return random_scene(f"matrixcity_{index}", seed=seed, dynamic=False, num_frames=10, height=36, width=64)


def default_scene_id(index: int) -> str:
    view = "street" if index % 2 == 0 else "aerial"
    return f"small_city/{view}/train/demo_block_{index}"
