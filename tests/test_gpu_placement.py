"""GPU placement that does not depend on the cluster's state when the driver starts.

Model actors request their configured GPUs whatever the cluster has; on a cluster that has no GPU
node yet (as the shipped ``ray_cluster.yaml`` starts) they wait, and the demand is what an
autoscaler answers. Here a GPU node (a simulated ``num_gpus=1`` resource; the actor then runs its
model on CPU, ``fault.gpus_are_simulated``) joins a local multi-node cluster after the build has
started: the depth-model actor must land on it and every shard must be built. (TartanAir is
configured with ``depth_source: vda_metric`` so that its shards need the depth actor; its clips
carry ground-truth depth, so the actor is called for every shard but runs no forward pass: the
test is about placement, and CPU inference would take a minute here.) A local Ray, which cannot
grow, is refused up front instead of silently running the model on CPU.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import tartanair_config, tiny_vda

from manifests.store import ManifestStore
from pipeline.config import ConfigError
from pipeline.runner import build
from pipeline.storage import Store
from pipeline.verify import verify

DEPTH = tiny_vda(num_gpus=1)


def _config(tmp: Path, data: Path, name: str, **over):
    cfg = tartanair_config(tmp, data, name, stages={"depth": DEPTH}, **over)
    cfg.datasets["tartanair"].depth_source = "vda_metric"
    return cfg


def test_local_ray_without_gpus_is_refused_not_run_on_cpu(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    with pytest.raises(ConfigError) as err:
        build(_config(tmp_path, data, "out"), show_progress=False)
    assert "stages.depth.resources.num_gpus: 0" in str(err.value)


def test_model_actor_waits_for_a_gpu_node_that_joins_after_the_start(tmp_path, tartan_data):
    import ray
    from ray.cluster_utils import Cluster

    data, _ = tartan_data
    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        trace = tmp_path / "trace"
        cfg = _config(
            tmp_path,
            data,
            "out",
            ray={"address": cluster.address},
            fault={"trace_dir": str(trace), "gpus_are_simulated": True},
        )
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("summary", build(cfg, show_progress=False)), daemon=True)
        t.start()
        deadline = time.time() + 120
        while not (trace.exists() and any(p.is_file() for p in trace.iterdir())) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # ingest has run; without a GPU node the model stage cannot start
        out = tmp_path / "out"
        assert t.is_alive() and not (trace / "actors").exists()
        assert not any(e["state"] == "done" for e in ManifestStore(Store(str(out))).ledger().values())
        gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
        t.join(300)
        s = result["summary"]
        # (a dataset with a depth stage gets whole-scene shards: 2 here, not 3)
        assert s.ok and s.shards_done == s.shards_total == 2 and s.clips_written == 6
        [actor] = list((trace / "actors").iterdir())
        assert actor.name.split(".")[1] == gpu_node.node_id  # the actor ran on the node that brought the GPU
        assert verify(str(out)).ok
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_running:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
