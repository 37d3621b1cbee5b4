"""What one node cannot hold is refused before any work, naming the setting.

Each model actor and each MegaSaM run is placed on one node. One asking for more CPUs or GPUs
than any node has waited for ever: Ray only logged "no available node types can fulfill", the
build printed nothing, and every shard met its deadline (6 h by default) as a transient failure
that each resume met again. A local Ray (which cannot gain nodes) is refused; on a joined cluster,
whose autoscaler may add larger nodes, a warning names the setting. A local Ray told to count GPUs
that CUDA does not have (``ray.num_gpus`` on a machine without them) failed every shard with
actors dying and being replaced; it is refused too."""

from __future__ import annotations

import pytest
from conftest import realestate10k_vda_config

from pipeline.config import ConfigError
from pipeline.dag import cuda_shortfall, node_fit_problems
from pipeline.runner import build

NODES = [{"CPU": 0.0}, {"CPU": 16.0, "GPU": 1.0}, {"CPU": 32.0}]


def test_a_bundle_no_node_holds_is_named_with_the_largest_node():
    wanted = [
        ("stages.depth.resources", "the depth model actor", 4.0, 1.0),
        ("stages.align.megasam_num_cpus / megasam_num_gpus", "a MegaSaM run", 1.0, 2.0),
        ("stages.tracks.resources", "the tracks model actor", 20.0, 1.0),
    ]
    problems = node_fit_problems(wanted, NODES)
    assert len(problems) == 2
    assert "megasam_num_gpus" in problems[0] and "1 CPUs and 2 GPUs" in problems[0]
    assert "stages.tracks.resources" in problems[1] and "20 CPUs and 1 GPUs" in problems[1]
    assert all("largest: 32 CPUs, 1 GPUs" in p for p in problems)
    # two GPUs in all, but on two nodes: a run of 2 GPUs still fits none
    assert node_fit_problems([("k", "a MegaSaM run", 1.0, 2.0)], [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}])
    assert not node_fit_problems([("k", "x", 16.0, 1.0), ("k", "y", 0.0, 0.5)], NODES)


def test_gpus_that_cuda_does_not_have_are_found():
    assert cuda_shortfall(stage_gpus=1.0, ray_gpus=1, cuda_devices=0, simulated=False)
    assert "ray.num_gpus" in cuda_shortfall(stage_gpus=1.0, ray_gpus=2, cuda_devices=1, simulated=False)
    assert cuda_shortfall(stage_gpus=1.0, ray_gpus=1, cuda_devices=0, simulated=True) is None
    assert cuda_shortfall(stage_gpus=0.0, ray_gpus=1, cuda_devices=0, simulated=False) is None
    assert cuda_shortfall(stage_gpus=1.0, ray_gpus=1, cuda_devices=1, simulated=False) is None


def test_a_local_build_whose_megasam_run_fits_no_node_is_refused_before_any_work(tmp_path, ray_local):
    cfg = realestate10k_vda_config(tmp_path, 1)
    cfg.datasets["realestate10k"].depth_source = "megasam"
    cfg.stages.align.megasam_command = "true {frames_dir} {out_npz}"
    cfg.stages.align.megasam_num_gpus = 0
    cfg.stages.align.megasam_num_cpus = 8
    with pytest.raises(ConfigError) as err:
        build(cfg, show_progress=False)
    msg = str(err.value)
    assert "megasam_num_cpus" in msg and "8 CPUs" in msg and "largest: 2 CPUs" in msg
    assert not (tmp_path / "out" / "shards").exists()


def test_on_a_joined_cluster_a_stage_no_node_holds_stops_the_build_after_the_wait(tmp_path, ray_local, monkeypatch):
    """A joined cluster's autoscaler may add a node large enough, so the build starts with a
    warning; when none joins within ``ray.unplaceable_wait_s`` the build stops in one line naming
    the setting (it used to wait until each shard in flight met its deadline, 6 h by default, and
    fail it as transient, again on every resume). Here a local Ray plays the joined cluster."""
    import time

    import pipeline.dag

    monkeypatch.setattr(pipeline.dag, "_joined_cluster", lambda cfg: True)
    cfg = realestate10k_vda_config(tmp_path, 1, shard_deadline_s=100)  # the loop looks every 10 s
    cfg.datasets["realestate10k"].depth_source = "megasam"
    cfg.stages.align.megasam_command = "true {frames_dir} {out_npz}"
    cfg.stages.align.megasam_num_gpus = 0
    cfg.stages.align.megasam_num_cpus = 8
    cfg.ray.unplaceable_wait_s = 3
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        build(cfg, show_progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "megasam_num_cpus" in msg and "unplaceable_wait_s = 3 s" in msg, msg
    assert time.monotonic() - t0 < 120
