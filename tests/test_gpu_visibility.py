"""A Ray task or actor uses only the GPUs Ray assigned to it.

Ray >= 2.60 no longer sets ``CUDA_VISIBLE_DEVICES`` for a task given no GPU (Ray issue 54868:
``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` now defaults to off), so such a task sees every GPU of its
node. d4s therefore decides from ``ray.get_gpu_ids()`` inside a Ray worker: the MegaSaM command
gets ``CUDA_VISIBLE_DEVICES=""`` when its task was given no GPU, and ingest's ``decoder: auto``
and the VR180 rectifier stay on the CPU. Outside Ray (``d4s inspect``, tests) CUDA visibility
decides, as before. The Ray worker is faked here (its mode and ``ray.get_gpu_ids``), and so is
CUDA (``torch.cuda.is_available``); one test checks the detection in real Ray workers.
"""

from __future__ import annotations

import shlex
import sys

import pytest
import ray
import ray._private.worker as ray_worker
import torch
from test_scene_passes import STAND_IN, clip

from pipeline.config import BuildConfig


@pytest.fixture()
def fake_cuda(monkeypatch):
    """This process "sees" a CUDA device, and torchcodec "imports"."""
    from stages.ingest import video_decoders

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(video_decoders, "torchcodec_problem", lambda: None)


@pytest.fixture()
def in_ray_worker(monkeypatch):
    """Make this process look like a Ray worker running a task that Ray gave ``ids`` GPUs."""

    def given(ids):
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray_worker.global_worker, "mode", ray_worker.WORKER_MODE, raising=False)
        monkeypatch.setattr(ray, "get_gpu_ids", lambda: list(ids))

    return given


# -- MegaSaM's command ---------------------------------------------------------------------------


def _megasam_env_seen(tmp_path, name: str, **kw) -> str:
    """Run ``megasam_pass`` with a stand-in command; what CUDA_VISIBLE_DEVICES it saw ("-": unset)."""
    from stages.align.megasam_stage import SceneReference, megasam_pass

    script, counter = tmp_path / "stand_in.py", tmp_path / f"{name}.txt"
    script.write_text(STAND_IN)
    cmd = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} --frames {{frames_dir}} --out {{out_npz}} "
        f"--clip {{clip_id}} --count {shlex.quote(str(counter))}"
    )
    cfg = BuildConfig.model_validate(
        {
            "output": str(tmp_path / name),  # its own cache: the command really runs
            "datasets": {"realestate10k": {"root": "/x"}},
            "stages": {"align": {"megasam_command": cmd, "megasam_retries": 0}},
        }
    )
    clips = [clip("s", [0, 2, 4])]
    ref = megasam_pass(clips, clips[0].key, cfg, **kw)
    assert isinstance(ref, SceneReference), ref
    (line,) = counter.read_text().splitlines()
    return line.partition(" ")[2]


def test_megasam_given_no_gpu_by_ray_runs_with_no_gpu_visible(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # as Ray >= 2.60 leaves a 0-GPU task
    assert _megasam_env_seen(tmp_path, "none", gpu_ids=[]) == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # the node's, inherited by the worker
    assert _megasam_env_seen(tmp_path, "none_node", gpu_ids=[]) == ""
    assert _megasam_env_seen(tmp_path, "two", gpu_ids=[2, 5]) == "2,5"


def test_megasam_asks_ray_for_its_gpus_when_not_told(tmp_path, monkeypatch, in_ray_worker):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    in_ray_worker([])
    assert _megasam_env_seen(tmp_path, "worker_none") == ""
    in_ray_worker([3])
    assert _megasam_env_seen(tmp_path, "worker_one") == "3"


def test_megasam_outside_ray_keeps_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert _megasam_env_seen(tmp_path, "outside") == "1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _megasam_env_seen(tmp_path, "outside_unset") == "-"


# -- ingest: decoder choice and the VR180 rectifier ----------------------------------------------


def test_auto_decoder_follows_the_gpus_ray_assigned(fake_cuda, in_ray_worker):
    from stages.ingest.video_decoders import cuda_available, resolve

    assert resolve("auto", "auto") == ("torchcodec", "cuda")  # outside Ray: CUDA visibility decides
    in_ray_worker([])
    assert not cuda_available()
    assert resolve("auto", "auto") == ("pyav", "cpu")  # a CPU task does not take a GPU it was not given
    in_ray_worker(["1"])
    assert resolve("auto", "auto") == ("torchcodec", "cuda")  # a task with a GPU share decodes on it
    in_ray_worker([])
    assert resolve("pyav", "cuda") == ("pyav", "cuda")  # an explicit device is obeyed


def test_vr180_rectifier_auto_device_follows_ray(fake_cuda, in_ray_worker):
    from stages.ingest import vr180

    assert vr180._device("auto").type == "cuda"  # outside Ray, as before
    in_ray_worker([])
    assert vr180._device("auto").type == "cpu"
    in_ray_worker([0])
    assert vr180._device("auto").type == "cuda"


def test_cached_rectifier_is_keyed_by_the_resolved_device(monkeypatch, in_ray_worker):
    """A worker process runs GPU tasks and CPU tasks in turn: a rectifier made on the GPU for one
    must not be handed to the next, which was given no GPU."""
    from stages.ingest import vr180

    made = []
    monkeypatch.setattr(vr180, "Rectifier", lambda spec, device: made.append(device) or device)
    vr180._rectifier.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        in_ray_worker([0])
        assert vr180.rectifier("spec", "auto") == "cuda"
        in_ray_worker([])
        assert vr180.rectifier("spec", "auto") == "cpu"
        assert made == ["cuda", "cpu"]
    finally:
        vr180._rectifier.cache_clear()


# -- the detection in real Ray workers -----------------------------------------------------------


def test_a_real_ray_task_given_no_gpu_decodes_on_the_cpu_though_cuda_shows_one(ray_local):
    """In a real Ray worker (the session's Ray has no GPU; a task given none is what matters), with
    CUDA faked as visible there: ``decoder: auto`` stays on the CPU. In the driver, which is no Ray
    worker, CUDA visibility still decides."""
    from stages.gpus import ray_gpu_ids

    @ray.remote(num_cpus=1, num_gpus=0)
    def probe():
        import torch

        from stages.gpus import ray_gpu_ids
        from stages.ingest import video_decoders

        saved = torch.cuda.is_available, video_decoders.torchcodec_problem
        torch.cuda.is_available, video_decoders.torchcodec_problem = (lambda: True), (lambda: None)
        try:  # the worker process is reused by later tasks: put everything back
            return ray_gpu_ids(), video_decoders.resolve("auto", "auto")
        finally:
            torch.cuda.is_available, video_decoders.torchcodec_problem = saved

    assert ray.get(probe.remote()) == ([], ("pyav", "cpu"))
    assert ray_gpu_ids() is None  # the driver: not a Ray worker


# -- the launcher file --------------------------------------------------------------------------


def test_cluster_starts_ray_with_the_zero_gpu_override_the_installed_ray_has():
    """Every node's ``ray start`` sets Ray's documented switch, which this Ray really reads; and no
    setup command pretends to forward the launching shell's environment (they run on the nodes)."""
    from pathlib import Path

    import yaml
    from ray._private.accelerators import RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO_ENV_VAR as switch

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "ray_cluster.yaml").read_text())
    starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in raw[k] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith(f"{switch}=1 ray start") for c in starts)
    assert not any("${" in c for c in raw["setup_commands"])
