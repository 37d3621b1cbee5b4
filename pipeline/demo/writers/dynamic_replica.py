"""Encode a rendered scene in Dynamic Replica's raw layout (see stages/ingest/dynamic_replica.py).

Writes, for one sequence's left view::

    <root>/<split>/frame_annotations_<split>.jgz   (appended to if it exists)
    <root>/<split>/<seq>_source_left/images/<seq>_source_left-NNNN.png
    <root>/<split>/<seq>_source_left/depths/<seq>_source_left_NNNN.geometric.png  (float16 bits)
    <root>/<split>/<seq>_source_left/masks/<seq>_source_left_NNNN.png            (moving objects, 0/255)
    <root>/<split>/<seq>_source_left/trajectories/NNNNNN.pth                     (torch.save dict)

Cameras are stored as in the release: PyTorch3D row-vector R, T (X_cam = X_world @ R + T, camera
x left / y up / z forward) and ``ndc_isotropic`` focal length / principal point. The right view,
optical flow and instance maps of the release are not written (nothing in d4s reads them).

``verts_inds_vis`` is written without the image bounds, as the release's flag behaves (the
authors' loaders clear it for points outside the image: co-tracker ``dr_dataset.py``, the
dataset's demo notebook): a point in front of the camera but outside the image is flagged
visible, so every demo build exercises the adapter's in-view rule.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene
from pipeline.demo.writers.common import WrittenScene

# Dataset world: y up (Replica-style); the renderer's world has y down. Rotate 180 deg about x.
WORLD_FROM_RENDER = np.diag([1.0, -1.0, -1.0, 1.0])
FPS = 30.0


def _viewpoint(k: np.ndarray, c2w_cv: np.ndarray, h: int, w: int) -> dict:
    c2w_p3d = c2w_cv @ np.linalg.inv(geo.P3D_TO_CV)
    w2c = geo.invert_pose(c2w_p3d)
    s = min(w, h) / 2.0
    fx, fy, cx, cy = (float(v) for v in k)
    return {
        "R": w2c[:3, :3].T.tolist(),  # row-vector convention: X_cam = X_world @ R + T
        "T": w2c[:3, 3].tolist(),
        "focal_length": [fx / s, fy / s],
        "principal_point": [(w / 2.0 - cx) / s, (h / 2.0 - cy) / s],
        "intrinsics_format": "ndc_isotropic",
    }


def _off_image_in_front(uv: np.ndarray, z: np.ndarray, h: int, w: int) -> np.ndarray:
    inside = (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
    return (z > 0) & ~inside


def write(scene: RenderedScene, root: Path, scene_id: str | None = None) -> WrittenScene:
    import torch

    scene_id = scene_id or default_scene_id(0)
    split, folder = scene_id.split("/", 1)
    if not folder.endswith("_source_left"):
        raise ValueError("Dynamic Replica scene ids look like <split>/<seq>_source_left")
    seq = folder[: -len("_source_left")]
    split_dir = Path(root) / split
    out = split_dir / folder
    for sub in ("images", "depths", "masks", "trajectories"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t_count, h, w = scene.depth.shape
    tracks = (scene.tracks_world @ WORLD_FROM_RENDER[:3, :3].T + WORLD_FROM_RENDER[:3, 3]).astype(np.float32)
    moving = np.array([False] + [b.dynamic for b in scene.spec.boxes])
    entries = []
    for t in range(t_count):
        img_rel = f"{folder}/images/{folder}-{t:04d}.png"
        depth_rel = f"{folder}/depths/{folder}_{t:04d}.geometric.png"
        mask_rel = f"{folder}/masks/{folder}_{t:04d}.png"
        traj_rel = f"{folder}/trajectories/{t:06d}.pth"
        Image.fromarray(scene.rgb[t]).save(split_dir / img_rel)
        bits = scene.depth[t].astype("<f2").view("<u2")
        Image.fromarray(bits).save(split_dir / depth_rel)  # 16-bit PNG of the float16 words
        mask = (scene.dynamic_mask[t] * 255).astype(np.uint8)
        Image.fromarray(mask).save(split_dir / mask_rel)
        c2w = WORLD_FROM_RENDER @ scene.c2w[t]
        uv, z = geo.project(tracks[t].astype(np.float64), scene.intrinsics[t], c2w)
        traj = {
            "traj_3d_world": torch.from_numpy(tracks[t].copy()),
            "traj_2d": torch.from_numpy(np.concatenate([uv, z[:, None]], axis=1).astype(np.float32)),
            "verts_inds_vis": torch.from_numpy(scene.tracks_visible[t] | _off_image_in_front(uv, z, h, w)),
            "img": torch.from_numpy(scene.rgb[t].copy()),
            "instances": torch.from_numpy(scene.tracks_object.astype(np.float32) * moving[scene.tracks_object]),
        }
        torch.save(traj, split_dir / traj_rel)
        entries.append(
            {
                "sequence_name": seq,
                "frame_number": t,
                "frame_timestamp": t / FPS,
                "image": {"path": img_rel, "size": [h, w]},
                "depth": {"path": depth_rel, "scale_adjustment": 1.0, "mask_path": None},
                "mask": {"path": mask_rel, "mass": float(scene.dynamic_mask[t].sum())},
                "viewpoint": _viewpoint(scene.intrinsics[t], c2w, h, w),
                "meta": None,
                "camera_name": "left",
                "trajectories": {"path": traj_rel},
            }
        )
    ann = split_dir / f"frame_annotations_{split}.jgz"
    existing = json.loads(gzip.decompress(ann.read_bytes()).decode("utf-8")) if ann.exists() else []
    existing = [e for e in existing if not (e["sequence_name"] == seq and e.get("camera_name") == "left")]
    ann.write_bytes(gzip.compress(json.dumps(existing + entries).encode("utf-8"), mtime=0))
    return WrittenScene(
        dataset="dynamic_replica",
        scene_id=scene_id,
        world_from_render=WORLD_FROM_RENDER,
        frame_ids=list(range(t_count)),
    )


def demo_spec(index: int, seed: int):
    """Dynamic indoor scenes (people/animals moving), 16:9 like the 1280x720 release."""
    from pipeline.demo.render import random_scene

    spec = random_scene(f"dynamic_replica_{index}", seed=seed, dynamic=True, num_frames=10, height=36, width=64)
    spec.fov_x_deg = 54.4  # fx ~ 1244 px at 1280 wide in the release
    return spec


def default_scene_id(index: int) -> str:
    return f"{'train' if index % 3 else 'valid'}/demo{index:03d}-3_obj_source_left"
