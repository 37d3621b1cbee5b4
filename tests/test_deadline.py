"""The per-shard deadline: a shard pipeline with a stage that hangs is cancelled and recorded failed
with the reason; the rest of the build goes on; ``resume`` redoes it (the hang happens once)."""

from __future__ import annotations

import pytest
from conftest import realestate10k_vda_config, tartanair_config

from manifests.store import ManifestStore
from pipeline.runner import build, resume
from pipeline.storage import Store
from pipeline.verify import verify


def _failed(out) -> dict[str, str]:
    return {sid: e["error"] for sid, e in ManifestStore(Store(str(out))).ledger().items() if e["state"] == "failed"}


def test_hung_ingest_task_is_cancelled_at_the_deadline_and_resume_redoes_it(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    cfg = tartanair_config(
        tmp_path,
        data,
        shard_deadline_s=8.0,
        fault={"hang_stage": "ingest", "hang_on_clip": 0, "marker_dir": str(tmp_path / "faults")},
    )
    s = build(cfg, show_progress=False)
    out = tmp_path / "out"
    failed = _failed(out)
    assert "tartanair-000000" in failed and s.shards_failed == len(failed) < s.shards_total
    assert "deadline" in failed["tartanair-000000"] and "shard_deadline_s = 8 s" in failed["tartanair-000000"]
    assert (tmp_path / "faults" / "hang_ingest_0").exists()
    assert not verify(str(out)).ok
    r = resume(str(out), show_progress=False)
    assert r.ok and r.shards_done == len(failed) and r.clips_written == 2 * len(failed)
    assert verify(str(out)).ok


@pytest.mark.slow
def test_hung_model_actor_is_replaced_and_its_shards_redone(tmp_path, ray_local):
    """A depth actor that never returns: its shard is cancelled, the actor replaced (a hung model
    never frees it), other shards waiting on it cancelled with that reason; resume completes."""
    cfg = realestate10k_vda_config(
        tmp_path,
        3,
        shard_deadline_s=25.0,
        max_inflight_shards=3,
        fault={"hang_stage": "depth", "hang_on_clip": 0, "marker_dir": str(tmp_path / "faults")},
    )
    s = build(cfg, show_progress=False)
    failed = _failed(tmp_path / "out")
    assert "deadline" in failed["realestate10k-000000"]
    assert all("deadline" in e or "model actor was replaced" in e for e in failed.values())
    assert s.shards_failed == len(failed)
    r = resume(str(tmp_path / "out"), show_progress=False)
    assert r.ok and r.shards_done == len(failed)
    assert verify(str(tmp_path / "out")).ok


def test_a_wall_clock_step_does_not_expire_shards(ray_local, monkeypatch):
    """The deadline was measured on the wall clock: an NTP step or a resumed VM 7 h ahead cancelled
    healthy in-flight shards (and killed the actors they waited on). It is the monotonic clock's."""
    import time
    from types import SimpleNamespace

    import ray

    from pipeline.dag import ShardDAG, _Inflight

    cancelled = []
    dag = SimpleNamespace(_cancel=cancelled.append, _replace_actor=lambda *a: False)
    rec = _Inflight({"shard_id": "s-0"}, time.monotonic(), tasks=[ray.put(1)])
    inflight = {"k": rec}
    assert list(ShardDAG._expire(dag, inflight, 3600.0)) == []  # progress noted now
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 7 * 3600)
    assert list(ShardDAG._expire(dag, inflight, 3600.0)) == [] and not cancelled and "k" in inflight


def test_the_loop_looks_at_progress_at_least_every_tenth_of_the_deadline():
    """Progress is noted when the loop looks; it waited up to a whole deadline for a finished
    shard, so a stall was seen only up to two deadlines after the last progress."""
    from pipeline.dag import _deadline_wait

    assert _deadline_wait(None, progressed=0.0, deadline=100.0, now=0.0) == 10.0
    assert _deadline_wait(None, progressed=0.0, deadline=21600.0, now=0.0) == 60.0
    assert _deadline_wait(None, progressed=0.0, deadline=100.0, now=95.0) == 5.0
    assert _deadline_wait(2.0, progressed=0.0, deadline=100.0, now=0.0) == 2.0  # a retry due sooner
    assert _deadline_wait(None, progressed=0.0, deadline=100.0, now=150.0) == 0.0
