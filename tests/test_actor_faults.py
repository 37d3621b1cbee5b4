"""Model actors that fail for good: a dead actor is replaced, never sent more shards; a GPU fault
is the GPU's, not the clips' (the shard is re-run, the actor restarts)."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import pytest
from conftest import realestate10k_vda_config

from pipeline.runner import build
from pipeline.verify import verify

pytestmark = pytest.mark.slow


def _re10k(tmp_path, **ray):
    return realestate10k_vda_config(
        tmp_path,
        4,
        depth={"actors": 2},
        max_inflight_shards=2,
        ray={"num_cpus": 2, "shard_retries": 2, "retry_backoff_s": 1.0, **ray},
        fault={"trace_dir": str(tmp_path / "trace")},
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
