"""TartanAir v1: ``<env>/<Easy|Hard>/P<NNN>/`` with PNG frames, .npy metric depth, NED poses.

Facts (``../shared/datasets/FORMATS.md`` §1; docs/DATASETS.md for sources): images
``image_left/NNNNNN_left.png``; depth ``depth_left/NNNNNN_left_depth.npy`` float32 metres;
``pose_left.txt`` one ``tx ty tz qx qy qz qw`` camera-to-world line per frame in NED (camera
body x forward, y right, z down; world NED). Intrinsics are fixed at fx = fy = cx = 320,
cy = 240 for 640x480, i.e. a 90-degree horizontal field of view; we derive them from the image
size (fx = fy = W/2, cx = W/2, cy = H/2), which gives exactly the official numbers at 640x480
and stays right for downscaled copies. The world frame is kept as the dataset's NED world;
only the camera axes are converted to OpenCV.
"""

from __future__ import annotations

import posixpath

import numpy as np

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from stages.ingest.base import AdapterDefaults, Capabilities, DatasetAdapter, SceneRef

DIFFICULTIES = ("Easy", "Hard")


def _scene_of(rel: str) -> str | None:
    """The trajectory a path that discovery could not read belongs to (None: a folder above them)."""
    parts = rel.split("/")
    if parts[-1] == "pose_left.txt" and len(parts) >= 3 and parts[-3] in DIFFICULTIES:
        return "/".join(parts[:-1])
    return None


class TartanAirAdapter(DatasetAdapter):
    name = "tartanair"
    version = "1"
    capabilities = Capabilities(dynamic=False, has_depth=True, has_tracks=False, real=False)
    # 49 = 1 + 4*12 frames, what CogVideoX-based trainers consume; trajectories have thousands.
    defaults = AdapterDefaults(
        clip_length=49,
        frame_stride=1,
        clip_stride=49,
        depth_source="gt",
        track_source="depth_static",
        max_depth_m=1000.0,
    )

    def discover(self) -> list[SceneRef]:
        scenes, errors = [], []
        # Releases unpack as <env>/<Easy|Hard>/P<NNN> or with the env folder doubled. Listed one
        # folder level at a time down to the trajectories, each looked up for its pose_left.txt:
        # never a frame folder (a release holds millions of frame files).
        for depth in ("*", "*/*"):
            for difficulty in DIFFICULTIES:
                for p in self.store.glob(f"{depth}/{difficulty}/*/pose_left.txt", errors):
                    rel = posixpath.relpath(posixpath.dirname(p), self.store.root)
                    pose_rel = posixpath.join(rel, "pose_left.txt")
                    try:  # bad bytes still count as a line: loading the scene names it (read_table)
                        text = self.read(pose_rel).decode("utf-8", errors="replace")
                    except ClipError as exc:  # bad content: this scene fails with it, no other
                        scenes.append(self.unreadable_scene(rel, exc, pose_rel))
                        continue
                    scenes.append(SceneRef(self.name, rel, sum(1 for line in text.splitlines() if line.strip())))
        scenes = self.listing_problems(scenes, errors, _scene_of)
        return sorted(set(scenes), key=lambda s: s.scene)

    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        self.frame_window(scene, frames)
        pose_rel = posixpath.join(scene.scene, "pose_left.txt")
        poses = self.read_table(pose_rel, ncols=7)
        if len(poses) != scene.num_frames:
            raise ClipError(f"{len(poses)} pose lines, expected {scene.num_frames}", self.where(pose_rel))
        sel = poses[frames]
        self.finite_or_fail(sel, "pose", pose_rel)
        qnorm = np.linalg.norm(sel[:, 3:], axis=1)
        if np.any(np.abs(qnorm - 1.0) > 1e-3):
            raise ClipError(f"quaternion norm {qnorm.min():.4f}..{qnorm.max():.4f} is not 1", self.where(pose_rel))
        c2w_ned = geo.make_pose(geo.quat_xyzw_to_matrix(sel[:, 3:]), sel[:, :3])
        c2w = geo.ned_c2w_to_opencv(c2w_ned)
        rgb, depth = [], []
        for i in frames:
            img_rel = posixpath.join(scene.scene, "image_left", f"{i:06d}_left.png")
            img = self.read_image(img_rel, expect_hw=rgb[0].shape[:2] if rgb else None)
            d_rel = posixpath.join(scene.scene, "depth_left", f"{i:06d}_left_depth.npy")
            d = self.read_npy(d_rel)
            if not np.issubdtype(d.dtype, np.floating):  # the release's depth is float32 metres
                raise ClipError(f"depth must be floating-point metres, got {d.dtype}", self.where(d_rel))
            if d.shape != img.shape[:2]:
                raise ClipError(f"depth shape {d.shape} does not match image {img.shape[:2]}", self.where(d_rel))
            rgb.append(img)
            depth.append(d.astype(np.float32))
        h, w = rgb[0].shape[:2]
        k = np.tile([w / 2.0, w / 2.0, w / 2.0, h / 2.0], (len(frames), 1))
        depth = np.stack(depth)
        return Clip(
            meta=meta, rgb=np.stack(rgb), intrinsics=k, c2w=c2w, depth=depth, depth_valid=self.depth_validity(depth)
        ).validate()
