"""Builds on a local multi-node Ray cluster (several raylets on loopback).

The cluster is a head node with no CPUs (it only hosts the GCS and the driver's object store) and
worker nodes of one CPU each, so every task runs on a worker node. ``fault.trace_dir`` makes every
ingest attempt leave a ``<clip ordinal>.<node id>.<pid>`` file: that shows where the work ran, and
that the clips of a node lost mid-build were run again on another node.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import tartanair_config, write_tartanair
from test_build import all_keys, planned_ids, shard_files

from manifests.store import ManifestStore
from pipeline.runner import build
from pipeline.storage import Store
from pipeline.verify import verify

# Quick death detection of a killed raylet (the defaults take ~15 s to declare a node dead).
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster():
    """A head (0 CPUs) and two worker nodes (1 CPU each); the session's local Ray is set aside and
    restarted as it was when the module ends."""
    import ray
    from ray.cluster_utils import Cluster

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM_CONFIG},
    )
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    _warm_workers(c)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if was_running:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


def _warm_workers(cluster) -> None:
    """Start a worker process on every worker node, with the stages' modules imported, before a
    build. A node's first worker takes seconds to start on a loaded 2-core machine and its first
    task seconds more to import the stages (torch among them: 3-4 s here); a build of a few seconds
    could otherwise run nearly every clip on the node that was ready first (CI once: 15 clips to 1),
    and the spread below would be luck."""
    import os

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def pid() -> int:
        import stages.align.megasam_stage  # noqa: F401  the modules the build's tasks import
        import stages.align.stage  # noqa: F401
        import stages.encode  # noqa: F401
        import stages.ingest.stage  # noqa: F401
        import stages.tracks.stage  # noqa: F401
        import stages.write  # noqa: F401

        return os.getpid()

    ray.get(
        [
            pid.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote()
            for n in cluster.worker_nodes
        ],
        timeout=120,
    )


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    """4 scenes of 13 frames: 16 clips of 4 frames, 8 shards of 2 clips."""
    root = tmp_path_factory.mktemp("tartan16")
    write_tartanair(root, n_scenes=4, frames=13)
    return root


def _config(tmp: Path, data: Path, name: str, cluster, shard_size: int = 2, **fault):
    return tartanair_config(
        tmp,
        data,
        name,
        ray={"address": cluster.address},
        max_inflight_shards=3,
        shard_size=shard_size,
        fault={"trace_dir": str(tmp / f"trace-{name}"), **fault},
    )


def _traces(trace_dir: Path) -> list[tuple[int, str, float]]:
    """(clip ordinal, node id, file time) per ingest attempt (the files; folders hold other traces)."""
    out = []
    for p in (p for p in trace_dir.iterdir() if p.is_file()):
        ordinal, node, _pid = p.name.split(".")
        out.append((int(ordinal), node, p.stat().st_mtime))
    return out


def _done_shards(out: Path) -> int:
    ms = ManifestStore(Store(str(out)))
    return sum(e["state"] == "done" for e in ms.ledger().values()) if ms.has_plan() else 0


def _exactly_once(out: Path) -> None:
    keys = all_keys(out)
    assert len(keys) == len(set(keys)), "a clip appears twice"
    assert sorted(keys) == sorted(planned_ids(out)), "a planned clip is missing"
    rep = verify(str(out))
    assert rep.ok, rep.problems


def test_work_spreads_over_nodes_and_survives_losing_a_worker_node(tmp_path, data16, cluster):
    workers = {n.node_id for n in cluster.worker_nodes}
    assert len(workers) == 2

    # 1. a clean build: every clip exactly once, the work spread over both worker nodes
    clean = build(_config(tmp_path, data16, "clean", cluster, ingest_delay_s=0.3), show_progress=False)
    assert clean.ok and clean.shards_done == 8 and clean.clips_written == 16
    _exactly_once(tmp_path / "clean")
    by_node: dict[str, int] = {}
    for _, node, _ in _traces(tmp_path / "trace-clean"):
        by_node[node] = by_node.get(node, 0) + 1
    assert set(by_node) == workers, by_node  # both worker nodes ran clips, the 0-CPU head none
    assert min(by_node.values()) >= 3, by_node

    # 2. the same build, losing a worker node mid-run (its raylet and workers SIGKILLed)
    s, loss = _build_losing_a_node(tmp_path, data16, "lossy", cluster)
    assert s.ok and s.shards_done == 8 and s.shards_failed == 0 and s.clips_failed == 0 and s.clips_written == 16
    _exactly_once(tmp_path / "lossy")
    assert shard_files(tmp_path / "lossy") == shard_files(tmp_path / "clean")  # byte-identical to the clean build
    print(
        f"node loss: {len(loss['ran_on_victim'])} clips had started on the lost node, {sorted(loss['retried'])} ran "
        f"again elsewhere; build {s.seconds:.1f} s; clean build {clean.seconds:.1f} s"
    )


def _build_losing_a_node(
    tmp: Path, data: Path, name: str, cluster, delay_s: float = 0.6, shard_size: int = 2, min_done: int = 2
):
    """Build in a thread; once ``min_done`` shards are published, SIGKILL the raylet and workers of a node
    that started an ingest attempt under 0.25 s ago (still sleeping ``delay_s``), add a fresh node,
    and let the build finish. Returns the summary and what happened on the lost node."""
    cfg = _config(tmp, data, name, cluster, shard_size=shard_size, ingest_delay_s=delay_s)
    result: dict = {}

    def run():
        try:
            result["summary"] = build(cfg, show_progress=False)
        except BaseException as exc:  # surfaced by the assertions below
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out, trace = tmp / name, tmp / f"trace-{name}"
    deadline = time.time() + 120
    in_flight = []
    while time.time() < deadline and t.is_alive():
        if _done_shards(out) >= min_done:
            in_flight = [(o, n) for o, n, ts in _traces(trace) if time.time() - ts < 0.25]
            if in_flight:
                break
        time.sleep(0.05)
    assert in_flight and t.is_alive(), "the build ended before the node could be removed"
    victim = next(n for n in cluster.worker_nodes if n.node_id == in_flight[0][1])
    killed_at = time.time()
    ran_on_victim = {o for o, n, _ in _traces(trace) if n == victim.node_id}
    cluster.remove_node(victim, allow_graceful=False)
    cluster.add_node(num_cpus=1)  # a replacement joins while the build runs
    t.join(timeout=300)
    assert not t.is_alive(), "the build hung after the node loss"
    assert "error" not in result, result.get("error")

    attempts = _traces(trace)
    assert ran_on_victim, "no clip had run on the removed node"
    after = [(o, n) for o, n, ts in attempts if ts > killed_at + 0.05]
    assert after and all(n != victim.node_id for _, n in after)
    # the clip in flight on the lost node when it died was run again on a surviving node
    retried = {o for o, n, ts in attempts if n != victim.node_id} & ran_on_victim
    assert in_flight[0][0] in retried, "the clip in flight on the lost node was not retried elsewhere"
    # clips whose attempt on the lost node had *finished* before it died, and that ran again after
    finished_there = {o for o, n, ts in attempts if n == victim.node_id and ts < killed_at - delay_s - 0.1}
    rerun = {o for o, n, ts in attempts if n != victim.node_id and ts > killed_at}
    return result["summary"], {
        "ran_on_victim": ran_on_victim,
        "retried": retried,
        "reconstructed": finished_there & rerun,
    }


@pytest.mark.slow
def test_losing_a_node_that_holds_finished_clips_in_its_object_store(tmp_path, cluster):
    """Clips of 4 frames at 96x128 are ~0.4 MB, above Ray's inline limit: a finished ingest's output
    lives in the object store of the node that ran it (not in the driver), and a shard's write task
    pulls it from there, possibly from the node that dies. Whether a finished clip of the lost node
    still had to be fetched (and so was rebuilt by lineage reconstruction) depends on timing: it is
    printed, not asserted."""
    from pipeline.demo.render import random_scene, render
    from pipeline.demo.writers import tartanair as w

    data = tmp_path / "data"
    for i in range(4):
        r = render(random_scene(f"s{i}", seed=i, dynamic=False, num_frames=13, height=96, width=128, num_tracks=16))
        w.write(r, data, w.default_scene_id(i))
    clean = build(_config(tmp_path, data, "clean", cluster, shard_size=4, ingest_delay_s=0.3), show_progress=False)
    assert clean.ok and clean.clips_written == 16
    s, loss = _build_losing_a_node(tmp_path, data, "lossy", cluster, delay_s=0.8, shard_size=4, min_done=1)
    assert s.ok and s.shards_done == 4 and s.clips_failed == 0 and s.clips_written == 16
    _exactly_once(tmp_path / "lossy")
    assert shard_files(tmp_path / "lossy") == shard_files(tmp_path / "clean")
    print(
        f"node loss (object-store clips): {len(loss['ran_on_victim'])} clips had started on the lost node, "
        f"{sorted(loss['retried'])} ran again elsewhere, {sorted(loss['reconstructed'])} of them finished before"
    )


def test_temporary_left_by_a_write_attempt_lost_mid_publish_is_removed(tmp_path, data16, cluster):
    """A write attempt killed with its node mid-publish leaves ``<shard>.tar.tmp-<id>`` on the shared
    filesystem while its retry publishes under another name; the finished build must not keep it."""
    cfg = _config(tmp_path, data16, "tmp", cluster, ingest_delay_s=0.3)
    t = threading.Thread(target=build, args=(cfg,), kwargs={"show_progress": False}, daemon=True)
    t.start()
    out = tmp_path / "tmp"
    deadline = time.time() + 60
    # the build removes old temporaries before it marks shards running: drop ours after that
    while time.time() < deadline and not (
        ManifestStore(Store(str(out))).has_plan()
        and (out / "manifests" / "ledger").exists()
        and any((out / "manifests" / "ledger").iterdir())
    ):
        time.sleep(0.05)
    partial = out / "shards" / "tartanair" / "tartanair-000007.tar.tmp-0123456789abcdef"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half a shard")
    assert _done_shards(out) < 8, "the build finished before the partial file was dropped"
    t.join(timeout=120)
    assert not t.is_alive()
    assert not partial.exists()
    _exactly_once(out)
