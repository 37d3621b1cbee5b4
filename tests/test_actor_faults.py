"""Model actors that fail for good: a dead actor is replaced, never sent more shards; a GPU fault
is the GPU's, not the clips' (the shard is re-run, the actor restarts)."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import pytest
from conftest import tiny_vda

from pipeline.config import BuildConfig
from pipeline.demo.render import render
from pipeline.demo.writers import realestate10k as re10k
from pipeline.runner import build
from pipeline.verify import verify

pytestmark = pytest.mark.slow


def _re10k(tmp_path, **ray):
    data = tmp_path / "data"
    for i in range(4):
        re10k.write(render(re10k.demo_spec(i, seed=40 + i)), data, re10k.default_scene_id(i))
    return BuildConfig.model_validate(
        {
            "output": str(tmp_path / "out"),
            "shard_size": 2,
            "max_inflight_shards": 2,
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
            "stages": {"depth": tiny_vda(actors=2), "align": {"drop_on_qc": False}},
            "ray": {"num_cpus": 2, "shard_retries": 2, "retry_backoff_s": 1.0, **ray},
            "fault": {"trace_dir": str(tmp_path / "trace")},
        }
    )


def test_an_actor_dead_for_good_is_replaced(tmp_path, ray_local):
    """With its restarts spent (actor_restarts 0: the first death), a killed actor had nothing
    outstanding and won every pick: every shard sent to it failed while the other actor idled."""
    cfg = _re10k(tmp_path, actor_restarts=0)
    trace = tmp_path / "trace"

    def kill_one_after_its_first_call():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if len(glob.glob(f"{trace}/actors/depth.*")) == 2 and (done := glob.glob(f"{trace}/tasks/depth.*")):
                os.kill(int(done[0].rsplit(".", 1)[1]), signal.SIGKILL)
                return
            time.sleep(0.05)

    threading.Thread(target=kill_one_after_its_first_call, daemon=True).start()
    s = build(cfg, show_progress=False)
    assert s.shards_done == s.shards_total == 4 and s.shards_failed == 0
    assert len(glob.glob(f"{trace}/actors/depth.*")) >= 3  # the dead one was replaced
    assert verify(cfg.output).ok
