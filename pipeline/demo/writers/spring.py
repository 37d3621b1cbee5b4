"""Encode a rendered scene in Spring's release layout (see stages/ingest/spring.py).

``<split>/<NNNN>/frame_left/frame_left_NNNN.png`` (frames from 0001);
``disp1_left/disp1_left_NNNN.dsp5``: HDF5 with the dataset ``"disparity"`` (float32, gzip level 9
as ``writeDsp5File`` in cv-stuttgart/flow_library), rendered at twice the resolution per axis,
values in pixels of the image resolution, sky = 0; ``cam_data/intrinsics.txt`` (``fx fy cx cy``
per frame), ``cam_data/extrinsics.txt`` (16 numbers per frame, world-to-camera, row-major) and
``cam_data/focaldistance.txt`` (one metric focus distance per frame; not read by d4s). Right
camera, flow and scene-flow files are not written (d4s does not read them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import geometry as geo
from pipeline.demo.render import RenderedScene, render
from pipeline.demo.writers.common import WrittenScene

BASELINE_M = 0.065
# Spring's world is Blender's (z up). The renderer's world has y down:
# x_w = x_r, y_w = z_r, z_w = -y_r (a proper rotation).
WORLD_FROM_RENDER = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def render_2x(scene: RenderedScene) -> RenderedScene:
    """The same views at twice the resolution per axis (the ground-truth grid of the release)."""
    spec = dataclasses.replace(
        scene.spec, height=2 * scene.spec.height, width=2 * scene.spec.width, camera_path=scene.c2w
    )
    return render(spec)


def write(
    scene: RenderedScene, root: Path, scene_id: str | None = None, hires: RenderedScene | None = None
) -> WrittenScene:
    scene_id = scene_id or default_scene_id(0)
    out = Path(root) / scene_id
    for sub in ("frame_left", "disp1_left", "cam_data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    import h5py

    hires = hires if hires is not None else render_2x(scene)
    t_count = scene.spec.num_frames
    intr_lines, ext_lines, focus_lines = [], [], []
    for t in range(t_count):
        num = t + 1
        Image.fromarray(scene.rgb[t]).save(out / "frame_left" / f"frame_left_{num:04d}.png")
        fx = scene.intrinsics[t, 0]  # disparity in pixels of the image resolution
        z = hires.depth[t].astype(np.float64)
        disp = np.where(np.isfinite(z) & (z > 0), fx * BASELINE_M / np.where(z > 0, z, 1.0), 0.0).astype(np.float32)
        with h5py.File(out / "disp1_left" / f"disp1_left_{num:04d}.dsp5", "w") as f:
            f.create_dataset("disparity", data=disp, compression="gzip", compression_opts=9)
        intr_lines.append(" ".join(f"{v:.9g}" for v in scene.intrinsics[t]))
        w2c = geo.invert_pose(WORLD_FROM_RENDER @ scene.c2w[t])
        ext_lines.append(" ".join(f"{v:.9g}" for v in w2c.reshape(-1)))
        focus_lines.append(f"{float(np.median(scene.depth[t])):.6f}")
    (out / "cam_data" / "intrinsics.txt").write_text("\n".join(intr_lines) + "\n")
    (out / "cam_data" / "extrinsics.txt").write_text("\n".join(ext_lines) + "\n")
    (out / "cam_data" / "focaldistance.txt").write_text("\n".join(focus_lines) + "\n")
    return WrittenScene(
        dataset="spring",
        scene_id=scene_id,
        world_from_render=WORLD_FROM_RENDER,
        frame_ids=list(range(1, t_count + 1)),
        notes="disparity rendered at 2x resolution; values relative to the image resolution",
    )


def demo_spec(index: int, seed: int):
    """Dynamic scene, 16:9 like the 1920x1080 release, moderate field of view."""
    from pipeline.demo.render import random_scene

    spec = random_scene(f"spring_{index}", seed=seed, dynamic=True, num_frames=10, height=36, width=64)
    spec.fov_x_deg = 65.0
    return spec


def default_scene_id(index: int) -> str:
    return f"train/{index + 1:04d}"
