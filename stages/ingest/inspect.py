"""``d4s inspect DATASET PATH``: read one scene with its adapter and list every problem found.

``PATH`` may be a scene folder, a dataset root holding one or more scenes (then the result is a
list with one report per scene, up to ``max_scenes``), or (for datasets whose adapter supports
it, e.g. RealEstate10K) a single camera file, or a RealEstate10K pixelSplat chunk (a list with
one report per example). ``dataset_cfg`` (a build config's ``datasets.<name>``) gives the adapter
the options and depth range the build would use. The scene is read in
chunks; a chunk that fails is re-read frame by frame so each problem names its frame and file.
"""

from __future__ import annotations

import os
import posixpath

import numpy as np

from pipeline.clip import ClipError, ClipMeta
from pipeline.config import QCConfig
from stages.ingest import adapter_class, get_adapter
from stages.ingest.base import DatasetAdapter, SceneRef
from stages.qc import geometric_qc
from stages.selfcheck import gt_self_check

CHUNK = 32


def _find_scene(dataset: str, path: str, dataset_cfg=None) -> tuple[DatasetAdapter, list[SceneRef]]:
    """Discover from PATH itself, else from its parents, keeping the scenes under PATH."""
    cls = adapter_class(dataset)
    target = os.path.abspath(path)
    root = target
    for _ in range(5):
        if dataset_cfg is None:
            adapter = cls(root)
        else:
            adapter = get_adapter(
                dataset, root, dataset_cfg.options, (dataset_cfg.min_depth_m, dataset_cfg.max_depth_m)
            )
        scenes = adapter.discover()
        if root == target and scenes:
            return adapter, scenes
        rel = os.path.relpath(target, root)
        hits = [s for s in scenes if s.scene == rel or s.scene.startswith(rel + "/")]
        if hits:
            return adapter, hits
        root = os.path.dirname(root)
    raise FileNotFoundError(f"no {dataset} scene found at {path} (see docs/DATASETS.md for the layout)")


def inspect_path(dataset: str, path: str, dataset_cfg=None, max_scenes: int = 50) -> dict | list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isfile(path):
        if dataset == "realestate10k" and path.endswith(".torch"):
            from stages.ingest.inspect_file import inspect_chunk

            return inspect_chunk(path)  # a list: one report per example
        if dataset == "realestate10k":
            from stages.ingest.inspect_file import inspect_camera_file

            return inspect_camera_file(path)
        raise FileNotFoundError(f"{dataset}: give a scene folder, not a file")
    adapter, scenes = _find_scene(dataset, path, dataset_cfg)
    if len(scenes) == 1:
        return inspect_scene(adapter, scenes[0])
    reps = [inspect_scene(adapter, s) for s in scenes[:max_scenes]]
    if len(scenes) > max_scenes:
        reps[-1]["not_inspected"] = [s.scene for s in scenes[max_scenes:]]
    return reps


def inspect_scene(adapter: DatasetAdapter, scene: SceneRef) -> dict:
    problems: list[str] = [f"{scene.problem[1]}: {scene.problem[0]}"] if scene.problem else []
    c2w, intr, size, has_depth, has_tracks = {}, {}, None, False, False
    valid: list[float] = []
    agreements: list[float] = []

    def load(frames):
        meta = ClipMeta(
            adapter.name, scene.scene, "inspect", list(frames), adapter.capabilities.dynamic, adapter.capabilities.real
        )
        return adapter.load_clip(scene, list(frames), meta)

    for s in range(0, scene.num_frames, CHUNK):
        frames = list(range(s, min(s + CHUNK, scene.num_frames)))
        try:
            clips = [(frames, load(frames))]
        except ClipError:
            clips = []
            for i in frames:
                try:
                    clips.append(([i], load([i])))
                except ClipError as exc:
                    problems.append(f"frame {i}: {exc}")
        for fr, clip in clips:
            size = list(clip.rgb.shape[1:3][::-1])
            has_depth |= clip.depth is not None
            if clip.depth_valid is not None:
                valid.append(float(clip.depth_valid.mean()))
            has_tracks |= clip.tracks is not None
            for j, i in enumerate(fr):
                c2w[i], intr[i] = clip.c2w[j], clip.intrinsics[j]
            if clip.depth is not None and len(fr) > 1 and adapter.capabilities.metric_poses:
                try:  # the build's ground-truth self-check (stages/selfcheck.py), per chunk of frames
                    res = gt_self_check(clip, QCConfig())
                    if res["agreement"] is not None:
                        agreements.append(float(res["agreement"]))
                except ClipError as exc:
                    problems.append(f"frames {fr[0]}-{fr[-1]}: {exc.reason}")
    order = sorted(c2w)
    if order and len(order) > 1:
        from pipeline.clip import Clip

        poses = np.stack([c2w[i] for i in order])
        dummy = Clip(
            ClipMeta(adapter.name, scene.scene, "inspect", order, False, False),
            np.zeros((len(order), 1, 1, 3), np.uint8),
            np.stack([intr[i] for i in order]),
            poses,
        )
        try:
            geometric_qc(dummy, QCConfig(), metric_poses=adapter.capabilities.metric_poses)
        except ClipError as exc:
            problems.append(exc.reason)
    steps = [float(np.linalg.norm(c2w[b][:3, 3] - c2w[a][:3, 3])) for a, b in zip(order, order[1:])]
    return {
        "dataset": adapter.name,
        "scene": scene.scene,
        "num_frames": scene.num_frames,
        "frames_read": len(order),
        "image_size": size,
        "intrinsics": [list(map(float, intr[i])) for i in order],
        "intrinsics_normalized": False,
        "c2w": [np.asarray(c2w[i]).tolist() for i in order],
        "path_length": float(sum(steps)),
        "has_depth": has_depth,
        # share of pixels whose depth lies in the adapter's valid range (the config's, with --config)
        "valid_depth_fraction": float(np.mean(valid)) if valid else None,
        "has_tracks": has_tracks,
        "selfcheck_min_agreement": min(agreements) if agreements else None,
        "problems": problems,
        "root": adapter.store.display(""),
        "scene_path": posixpath.join(adapter.store.display(""), scene.scene),
    }
