"""Shared fixtures: a local Ray for the session and miniature TartanAir datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def s3_env():
    """moto's S3 server with one bucket, its endpoint and fake credentials in this process's
    environment for the module (restored after)."""
    import logging

    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from s3_server import LocalS3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    srv = LocalS3().start()
    try:
        srv.create_bucket()
        srv.apply_env()
        yield srv
    finally:
        srv.restore_env()
        srv.stop()


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


def realestate10k_vda_config(tmp: Path, n_scenes: int, **over):
    """A RealEstate10K build of ``n_scenes`` rendered demo scenes with the tiny VDA as its depth
    (8-frame clips, no tracks, alignment QC kept): the model-stage builds of the fault tests.
    ``over`` sets or replaces top-level keys; ``depth`` (a dict) goes to ``tiny_vda``."""
    from pipeline.config import BuildConfig
    from pipeline.demo.render import render
    from pipeline.demo.writers import realestate10k as w

    data = tmp / "data"
    for i in range(n_scenes):
        w.write(render(w.demo_spec(i, seed=40 + i)), data, w.default_scene_id(i))
    raw = {
        "output": str(tmp / "out"),
        "shard_size": 2,
        "datasets": {
            "realestate10k": {
                "root": str(data),
                "clip_length": 8,
                "clip_stride": 2,
                "frame_stride": 1,
                "depth_source": "vda_metric",
                "track_source": "none",
            }
        },
        "stages": {"depth": tiny_vda(**over.pop("depth", {})), "align": {"drop_on_qc": False}},
        "ray": {"num_cpus": 2},
    }
    raw.update(over)
    return BuildConfig.model_validate(raw)


@pytest.fixture()
def tartan_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tartan")
    scenes = write_tartanair(root)
    return root, scenes


TINY_STAGE = dict(name="dynamic", steps=2, resolution=16, num_frames=5, scenes="any", max_frame_stride=1)


def write_tiny_use_inputs(root: Path, step: int, moving: bool = False):
    """What `d4s eval`/`generate` read, at the smallest size: shards of 3 synthetic clips (1 and 2
    held out, index.parquet), a tiny model's checkpoint at ``step`` and a 16x16 image. ``moving``
    gives the deformation head weights that move things, so time shows in the renders.
    Returns (config, model)."""
    import numpy as np
    import torch
    from PIL import Image

    from training.config import make_config
    from training.model import Diff4Splat
    from training.synthetic import write_shards

    write_shards(
        str(root / "data"),
        n_clips=3,
        per_shard=3,
        t=5,
        size=16,
        datasets=("synth",),
        dynamic=lambda ds, i: True,
        val=lambda ds, i: i in (1, 2),
    )
    cfg = make_config("tiny", stages=[TINY_STAGE])
    torch.manual_seed(0)
    model = Diff4Splat(cfg)
    if moving:
        with torch.no_grad():
            model.ldrm.deform_head.weight.normal_(0, 0.05)
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "step": step}, root / "ckpt.pt")
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(root / "img.png")
    return cfg, model


@pytest.fixture
def s3_traffic(s3_env, monkeypatch):
    """Requests made and object bytes fetched (every GET's body, ranged or whole) by s3fs in this
    process."""
    import s3fs.core as core

    stats = {"requests": 0, "bytes": 0}
    call = core.S3FileSystem._call_s3

    async def counting_call(self, method, *args, **kwargs):
        stats["requests"] += 1
        out = await call(self, method, *args, **kwargs)
        if (method if isinstance(method, str) else getattr(method, "__name__", "")) == "get_object":
            stats["bytes"] += int(out.get("ContentLength") or 0)
        return out

    monkeypatch.setattr(core.S3FileSystem, "_call_s3", counting_call)
    return stats
