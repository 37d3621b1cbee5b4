"""Encode a rendered scene in PointOdyssey's release layout (see stages/ingest/pointodyssey.py).

``<split>/<scene>/rgbs/rgb_NNNNN.jpg``, ``depths/depth_NNNNN.png`` (uint16 of depth * 65535 /
1000 after clipping to [0, 1000] m, truncated as the official exporter does), ``masks/
mask_NNNNN.png`` (RGB instance colours; not read by d4s), ``anno.npz`` (``np.savez``, not
compressed: trajs_2d, trajs_3d, valids, visibs, intrinsics, extrinsics world-to-camera) and
``info.npz`` (the shape of every annotation array, as some loaders read it). Normals are not
written (d4s does not read them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene
from pipeline.demo.writers.common import WrittenScene

# PointOdyssey's world comes from Blender via an OBJ export: y up. The renderer's world has y
# down, so rotate 180 degrees about x (a proper rotation): p_po = A p_render.
WORLD_FROM_RENDER = np.diag([1.0, -1.0, -1.0, 1.0])

JPEG_QUALITY = 95  # 4:4:4 chroma: tiny high-contrast fixtures lose too much at 4:2:0


def write(scene: RenderedScene, root: Path, scene_id: str | None = None) -> WrittenScene:
    scene_id = scene_id or default_scene_id(0)
    out = Path(root) / scene_id
    for sub in ("rgbs", "depths", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t_count = scene.spec.num_frames
    palette = np.random.default_rng(7).integers(0, 256, size=(int(scene.object_id.max()) + 1, 3)).astype(np.uint8)
    palette[0] = 0
    for t in range(t_count):
        Image.fromarray(scene.rgb[t]).save(out / "rgbs" / f"rgb_{t:05d}.jpg", quality=JPEG_QUALITY, subsampling=0)
        d = np.clip(scene.depth[t].astype(np.float64), 0.0, 1000.0)
        d[~np.isfinite(scene.depth[t])] = 1000.0
        Image.fromarray((d * 65535.0 / 1000.0).astype(np.uint16)).save(out / "depths" / f"depth_{t:05d}.png")
        Image.fromarray(palette[scene.object_id[t]]).save(out / "masks" / f"mask_{t:05d}.png")

    c2w = WORLD_FROM_RENDER @ scene.c2w
    w2c = geo.invert_pose(c2w)
    k = geo.intrinsics_matrix(scene.intrinsics)
    a = WORLD_FROM_RENDER
    trajs_3d = scene.tracks_world @ a[:3, :3].T + a[:3, 3]
    uv = np.stack([geo.project(trajs_3d[t], scene.intrinsics[t], c2w[t])[0] for t in range(t_count)])
    z = np.stack([geo.project(trajs_3d[t], scene.intrinsics[t], c2w[t])[1] for t in range(t_count)])
    valids = z > 0  # in front of the camera (the exporter's "visibility 2" marks the rest)
    visibs = scene.tracks_visible & valids
    anno = {
        "trajs_2d": uv.astype(np.float32),
        "trajs_3d": trajs_3d.astype(np.float32),
        "valids": valids,
        "visibs": visibs,
        "intrinsics": k.astype(np.float32),
        "extrinsics": w2c.astype(np.float32),
    }
    np.savez(out / "anno.npz", **anno)
    np.savez(out / "info.npz", **{key: np.asarray(v.shape, dtype=np.int64) for key, v in anno.items()})
    return WrittenScene(
        dataset="pointodyssey",
        scene_id=scene_id,
        world_from_render=WORLD_FROM_RENDER,
        frame_ids=list(range(t_count)),
        notes="anno arrays are float32; extrinsics world-to-camera (OpenCV axes)",
    )


def demo_spec(index: int, seed: int):
    """Dynamic scenes (moving objects, moving camera), 16:9 like the 960x540 release.

    16 frames so that a demo clip of 8 frames at the default frame stride of 2 fits.
    """
    from pipeline.demo.render import random_scene

    spec = random_scene(
        f"pointodyssey_{index}", seed=seed, dynamic=True, num_frames=16, height=36, width=64, num_tracks=96
    )
    spec.fov_x_deg = 70.0
    return spec


def default_scene_id(index: int) -> str:
    split = ("train", "val", "test")[index % 3]
    return f"{split}/demo_scene_{index:03d}"
