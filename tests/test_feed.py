"""Whether ``max_inflight_shards`` can keep a build's GPUs busy (pipeline/feed.py).

Found with the scene-pass bench (bench/RESULTS.md §7, session 8): the GPUs wait whenever fewer
scenes are in flight than MegaSaM runs fit, or fewer shards than the model actors take. The build
says so at its start, with the setting to change, instead of running at a fraction of its GPUs."""

import pytest

from pipeline.config import BuildConfig
from pipeline.feed import Feed, FeedMonitor, feed_for


def cfg(inflight=4, megasam_gpus=1.0, depth_actors=1, depth_gpus=1.0, tracks=True):
    raw = {
        "output": "/tmp/x",
        "max_inflight_shards": inflight,
        "datasets": {
            "realestate10k": {
                "root": "/tmp/none",
                "depth_source": "megasam",
                "track_source": "cotracker" if tracks else "none",
            }
        },
        "stages": {
            "align": {"megasam_command": "megasam {frames_dir} {out_npz} {clip_id}", "megasam_num_gpus": megasam_gpus},
            "depth": {"resources": {"num_gpus": depth_gpus, "actors": depth_actors}},
            "tracks": {"resources": {"num_gpus": 1.0, "actors": 1}},
        },
    }
    return BuildConfig.model_validate(raw).resolved()


def shards(n_shards, scenes_per_shard, clips_per_scene=2):
    out = {}
    for s in range(n_shards):
        out[f"sh{s}"] = [
            {"dataset": "realestate10k", "scene": f"s{s}-{k}", "clip_id": f"s{s}-{k}-{c}"}
            for k in range(scenes_per_shard)
            for c in range(clips_per_scene)
        ]
    return out


def test_a_cluster_of_64_gpus_with_four_shards_in_flight_is_told_how_many_it_needs():
    # 64 GPUs: one depth and one track actor of a GPU each, 62 MegaSaM runs of a GPU fit beside them;
    # shards of 3 scenes: 4 in flight keep at most 12 MegaSaM runs going
    f = feed_for(cfg(inflight=4), total_gpus=64, clips_by_shard=shards(10, 3))
    assert f == Feed(inflight=4, actors=2, megasam_slots=62, scenes_per_shard=3.0)
    assert f.needed() == 21  # ceil(62 / 3)
    msg = f.warning()
    assert "max_inflight_shards is 4" in msg and "62 MegaSaM runs" in msg and "at least 21" in msg


def test_enough_shards_in_flight_say_nothing():
    f = feed_for(cfg(inflight=21), total_gpus=64, clips_by_shard=shards(30, 3))
    assert f.needed() == 21 and f.warning() is None


def test_model_actors_want_two_shards_each_even_without_megasam_gpus():
    # MegaSaM on the CPUs (megasam_num_gpus 0) puts no bound of its own; 4 depth actors and a track
    # actor each take two calls at once
    c = cfg(inflight=6, megasam_gpus=0.0, depth_actors=4, depth_gpus=0.5)
    f = feed_for(c, total_gpus=8, clips_by_shard=shards(10, 3))
    assert f.megasam_slots == 0 and f.actors == 5 and f.needed() == 10
    assert "5 model actors" in f.warning() and "at least 10" in f.warning()


def test_no_gpus_yet_no_megasam_bound():
    # a joined autoscaling cluster may start with no GPU nodes: nothing to size against yet
    f = feed_for(cfg(inflight=4), total_gpus=0, clips_by_shard=shards(10, 3))
    assert f.megasam_slots == 0 and f.needed() == 4 and f.warning() is None


def test_fractional_megasam_runs_and_the_actors_gpus_are_taken_first():
    # 2 GPUs: actors 0.45 + 0.45, MegaSaM 0.1 a run -> 11 runs fit beside them
    c = cfg(inflight=2, megasam_gpus=0.1, depth_gpus=0.45)
    c.stages.tracks.resources.num_gpus = 0.45
    f = feed_for(c, total_gpus=2, clips_by_shard=shards(5, 2))
    assert f.megasam_slots == 11 and f.needed() == 6  # ceil(11 / 2)


@pytest.mark.parametrize("n", [0, 1])
def test_shard_sizes_come_from_the_shards_that_run_megasam(n):
    by_shard = shards(3, 4)
    by_shard["gt"] = [{"dataset": "tartanair", "scene": "t", "clip_id": "t-0"}] * n
    f = feed_for(cfg(), total_gpus=16, clips_by_shard=by_shard)
    assert f.scenes_per_shard == 4.0


def test_only_the_datasets_of_this_build_count():
    # a config that also names a dataset whose clips are all done (a resume): its actors are not started
    c = cfg(inflight=2, megasam_gpus=0.0)
    f = feed_for(c, total_gpus=4, clips_by_shard={})
    assert f == Feed(inflight=2, actors=0, megasam_slots=0, scenes_per_shard=1.0) and f.warning() is None


def test_the_dag_warns_in_the_build_log_with_the_cluster_it_runs_on(ray_local, caplog):
    # ShardDAG.run calls check_feed with the shards it is given; the local Ray of the tests has no GPUs,
    # so the bound here is the actors'
    from types import SimpleNamespace

    from pipeline.dag import ShardDAG

    c = cfg(inflight=1, megasam_gpus=0.0)
    with caplog.at_level("WARNING", logger="d4s"):
        got = ShardDAG.check_feed(SimpleNamespace(cfg=c), shards(3, 2))
    assert got is not None and "at least 4" in got and "2 model actors" in got
    assert got in caplog.text
    c.max_inflight_shards = 4
    assert ShardDAG.check_feed(SimpleNamespace(cfg=c), shards(3, 2)) is None


# The start-up rule cannot see how long a shard spends in the CPU stages around the model actors
# (ingest before, alignment and encoding after). Session 9's 2-GPU bench: 8 shards in flight kept
# one depth actor busy 95 % of the time, two only ~80 % each (bench/RESULTS.md §7). The actors
# measure the seconds their model waited between calls (``<stage>.model_idle_s``); the build says
# so once it has seen the pipeline full.


def shard(held, idle, stage="depth"):
    return {f"{stage}.model_held_s": held, f"{stage}.model_idle_s": idle}


def test_actors_idle_while_shards_wait_is_told_once_with_a_larger_setting():
    mon = FeedMonitor(inflight=8, stages=("depth",))
    # the first 8 shards fill the pipeline (the actors wait for the first ingest): not judged
    assert all(mon.observe(shard(1.0, 5.0), queued=100, spare_cpus=lambda: 4.0) is None for _ in range(8))
    got = [mon.observe(shard(3.0, 1.0), queued=100, spare_cpus=lambda: 4.0) for _ in range(8)]
    assert got[:-1] == [None] * 7 and got[-1] is not None
    assert "depth" in got[-1] and "25%" in got[-1] and "max_inflight_shards is 8" in got[-1]
    assert "at least 11" in got[-1]  # 8 / (1 - 0.25), rounded up
    assert mon.observe(shard(3.0, 1.0), queued=100, spare_cpus=lambda: 4.0) is None  # said once


def test_busy_actors_or_an_empty_queue_say_nothing():
    busy = FeedMonitor(inflight=4, stages=("depth", "tracks"))
    for _ in range(12):
        assert busy.observe(shard(3.0, 0.1) | shard(2.0, 0.1, "tracks"), queued=50, spare_cpus=lambda: 4.0) is None
    tail = FeedMonitor(inflight=4, stages=("depth",))
    for _ in range(12):  # the last shards of a build: nothing left to feed them
        assert tail.observe(shard(1.0, 3.0), queued=0, spare_cpus=lambda: 4.0) is None


def test_the_idlest_model_stage_is_named():
    mon = FeedMonitor(inflight=2, stages=("depth", "tracks"))
    for _ in range(2):
        mon.observe(shard(1.0, 1.0) | shard(1.0, 1.0, "tracks"), queued=9, spare_cpus=lambda: 4.0)
    got = [mon.observe(shard(3.0, 0.0) | shard(1.0, 3.0, "tracks"), queued=9, spare_cpus=lambda: 4.0) for _ in range(2)]
    assert got[0] is None and "tracks" in got[1] and "75%" in got[1]


def test_a_build_short_of_cpus_is_not_told_to_add_shards():
    # the demo on a 2-core machine: the depth model waits most of the time because every CPU is busy
    # with the other datasets' shards and the stages around it; more shards in flight would only
    # queue more tasks (it said "at least 136" before this check)
    mon = FeedMonitor(inflight=4, stages=("depth",))
    got = [mon.observe(shard(0.1, 3.0), queued=7, spare_cpus=lambda: 0.0) for _ in range(8)]
    assert got == [None] * 8


def test_free_cpus_are_looked_up_only_while_judging():
    calls = []

    def spare():
        calls.append(1)
        return 4.0

    mon = FeedMonitor(inflight=3, stages=("depth",))
    for _ in range(10):
        mon.observe(shard(1.0, 1.0), queued=5, spare_cpus=spare)
    assert len(calls) == 3  # shards 4-6: one cluster query per judged completion


def test_the_setting_asked_for_is_bounded():
    mon = FeedMonitor(inflight=4, stages=("depth",))
    got = [mon.observe(shard(0.1, 3.0), queued=7, spare_cpus=lambda: 8.0) for _ in range(8)]
    assert "97%" in got[-1] and "at least 16" in got[-1]  # 4 x the setting, not 4 / 0.03


def test_a_model_that_only_some_shards_need_is_not_judged():
    # the demo: most shards are of datasets with depth of their own; the depth model waits while they
    # flow, and more shards in flight would not change that (it was told "at least 16")
    mon = FeedMonitor(inflight=2, stages=("depth",))
    mixed = [shard(0.5, 3.0), {}, {}, shard(0.5, 3.0)]
    assert [mon.observe(st, queued=7, spare_cpus=lambda: 8.0) for st in mixed] == [None] * 4


def test_the_cpu_a_finishing_shard_just_released_does_not_count_as_free():
    mon = FeedMonitor(inflight=2, stages=("depth",))
    got = [mon.observe(shard(1.0, 3.0), queued=7, spare_cpus=lambda: 1.0) for _ in range(4)]
    assert got == [None] * 4
