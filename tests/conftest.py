"""Shared fixtures: a local Ray for the session and miniature TartanAir datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


def write_tartanair(root: Path, n_scenes: int = 2, frames: int = 10, seed: int = 0) -> list:
    from pipeline.demo.render import random_scene, render
    from pipeline.demo.writers import tartanair as w

    out = []
    for i in range(n_scenes):
        r = render(
            random_scene(f"s{i}", seed=seed + i, dynamic=False, num_frames=frames, height=24, width=32, num_tracks=16)
        )
        out.append((r, w.write(r, root, w.default_scene_id(i))))
    return out


def tiny_vda(num_gpus: float = 0, actors: int = 1) -> dict:
    """``stages.depth`` for tests: the smallest VDA (vits, metric head, input 56, fp32) with random
    weights, ``actors`` actors of ``num_gpus`` GPUs each (0: on the CPU)."""
    return {
        "encoder": "vits",
        "metric": True,
        "input_size": 56,
        "dtype": "fp32",
        "allow_random_weights": True,
        "resources": {"num_gpus": num_gpus, "actors": actors},
    }


def tartanair_config(tmp: Path, data: Path, out_name: str = "out", **over):
    from pipeline.config import BuildConfig

    raw = {
        "output": str(tmp / out_name),
        "shard_size": 2,
        "datasets": {"tartanair": {"root": str(data), "clip_length": 4, "clip_stride": 3, "track_source": "none"}},
        "ray": {"num_cpus": 2},
    }
    for k, v in over.items():
        raw[k] = v
    return BuildConfig.model_validate(raw)


@pytest.fixture()
def tartan_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tartan")
    scenes = write_tartanair(root)
    return root, scenes
