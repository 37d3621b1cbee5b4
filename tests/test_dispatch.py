"""How the driver hands shards to the model actors.

* While the model actors start (the process, the model built, a warm-up: seconds to tens of
  seconds), the driver admits one shard per actor, not ``max_inflight_shards``: the ingest of a
  full pipeline's worth of shards would take every core from the actors building their models
  and delay the first model call (session 9 on the GPU machine: 16-32 s), and there is no model
  to feed yet.
* A shard's model call goes to the actor with the fewest frames sent and not yet returned, not
  round robin: shards hold whole scenes of unequal length, and a GPU must not wait while
  another's queue is long (bench/RESULTS.md §7, session 9: the end of a 2-GPU build).
"""

from __future__ import annotations

import time
from pathlib import Path

from conftest import tartanair_config, tiny_vda

from pipeline.dag import _ActorLoad, _model_frames
from pipeline.runner import build
from pipeline.verify import verify

DEPTH = tiny_vda()


def _ingest_starts(trace: Path) -> list[float]:
    """When each ingest attempt began (its trace file is made first thing)."""
    return [p.stat().st_mtime for p in trace.iterdir() if p.is_file()]


def test_one_shard_per_actor_is_admitted_until_the_actors_are_up(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    trace = tmp_path / "trace"
    cfg = tartanair_config(
        tmp_path,
        data,
        stages={"depth": DEPTH},
        max_inflight_shards=4,
        fault={"trace_dir": str(trace), "actor_start_delay_s": 4.0},
    )
    cfg.datasets["tartanair"].depth_source = "vda_metric"  # its shards need the depth actor
    s = build(cfg, show_progress=False)
    assert s.ok and s.shards_done == s.shards_total == 2 and s.clips_written == 6
    [startup] = list((trace / "startup").iterdir())
    started, _, up = map(float, startup.read_text().split())
    assert up - started >= 4.0
    starts = _ingest_starts(trace)
    assert len(starts) == 6
    # one whole-scene shard (3 clips) while the actor started, the other once it was up
    assert sum(t < up for t in starts) == 3, sorted(t - up for t in starts)
    assert verify(cfg.output).ok


def test_no_model_stage_means_no_wait(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    trace = tmp_path / "trace"
    cfg = tartanair_config(tmp_path, data, fault={"trace_dir": str(trace), "actor_start_delay_s": 30.0})
    t0 = time.time()
    s = build(cfg, show_progress=False)
    assert s.ok and s.clips_written == 6
    assert time.time() - t0 < 30.0  # no actor to wait for
    assert not (trace / "startup").exists()


def test_a_call_goes_to_the_actor_with_the_fewest_frames_outstanding(tmp_path, ray_local):
    import ray

    @ray.remote
    def until(path: str) -> int:
        while not Path(path).exists():
            time.sleep(0.02)
        return 1

    go = tmp_path / "go"
    load = _ActorLoad(3)
    assert load.pick() == 0  # all idle: the first
    slow = until.remote(str(go))
    load.add(0, slow, 300)
    assert load.pick() == 1
    load.add(1, until.remote(str(go)), 200)
    assert load.pick() == 2
    load.add(2, until.remote(str(go)), 250)
    assert load.pick() == 1  # 200 outstanding is the least
    load.add(1, until.remote(str(go)), 200)  # actor 1: 400
    assert load.pick() == 2
    go.touch()  # every call returns: their frames no longer count
    ray.get(slow)
    deadline = time.time() + 30
    while load.outstanding() != [0, 0, 0] and time.time() < deadline:
        time.sleep(0.05)
    assert load.outstanding() == [0, 0, 0]
    load.add(0, ray.put(1), 10**6)  # returned already: nothing outstanding
    assert load.pick() == 0


def test_a_replaced_actor_starts_with_nothing_outstanding(tmp_path, ray_local):
    import ray

    @ray.remote
    def never() -> int:
        time.sleep(3600)
        return 0

    load = _ActorLoad(2)
    refs = [never.remote(), never.remote()]
    load.add(0, refs[0], 100)
    load.add(1, refs[1], 50)
    assert load.pick() == 1
    load.reset(0)  # its calls were cancelled with the old actor
    assert load.pick() == 0 and load.outstanding() == [0, 50]
    for r in refs:
        ray.cancel(r, force=True)


def test_calls_go_to_actors_that_are_up_while_another_cannot_be_placed(ray_local):
    """Two 1-GPU depth actors on a cluster with one GPU: the second was never placed, yet with
    nothing outstanding it won every other pick, and its shards met their deadline while the
    placed actor idled. While some actor is up, calls go only to actors that are up."""
    import ray

    @ray.remote(num_cpus=0)
    class Model:
        def f(self) -> int:
            return 1

    placed = Model.remote()
    unplaceable = Model.options(resources={"no-such-node": 1}).remote()
    load = _ActorLoad(2)
    load.starting(0, unplaceable.__ray_ready__.remote())
    load.starting(1, placed.__ray_ready__.remote())
    assert load.pick() == 0  # none up yet: any (the least loaded)
    ray.get(placed.__ray_ready__.remote())
    never = ray.put(None)
    for _ in range(3):
        i = load.pick()
        assert i == 1
        load.add(i, placed.f.remote() if i else never, 100)
    load.starting(1, Model.options(resources={"no-such-node": 1}).remote().__ray_ready__.remote())
    assert load.pick() == 0  # no actor up any more: back to the least loaded of all
    ray.kill(unplaceable)


def test_the_frames_of_a_call_count_each_scene_frame_once_in_scene_passes():
    clips = [
        {"scene": "a", "frames": [0, 2, 4, 6]},
        {"scene": "a", "frames": [4, 6, 8, 10]},
        {"scene": "b", "frames": [0, 2, 4, 6]},
    ]
    assert _model_frames(clips, "scene") == 6 + 4
    assert _model_frames(clips, "clip") == 12
