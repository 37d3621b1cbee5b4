"""The scene bench's GPU steady state (bench/bench_scene_passes.py): from the end of the depth actor's
warm-up to the end of its last model call, read from the actor's hold intervals (``fault.trace_dir``).

The older figure ran from the first to the last busy GPU sample, so it took in the actor's start-up
warm-up, the wait for the first shard and the warm-up for the frame size: in builds of a few shards
that is most of the window (bench/RESULTS.md §7)."""

import pytest

from bench.bench_scene_passes import hold_util, merge_spans, steady_throughput, steady_util, used_gpu_samples


def samples(utils, t0=100.0, period=0.5):
    return [(t0 + i * period, 0, u, 1000.0) for i, u in enumerate(utils)]


def test_window_starts_after_the_warm_up_and_ends_with_the_last_hold():
    # a sample at t is the utilisation over the period before t. 100-101 s: the actor's start-up
    # warm-up; idle until the first hold (103-106 s, its first second the warm-up for the frame
    # size), a gap, the second hold (106.5-108 s)
    s = samples([90, 90, 0, 0, 0, 0, 0, 50, 50, 100, 100, 100, 100, 0, 100, 100, 100, 0])
    got = hold_util(s, holds=[(103.0, 106.0), (106.5, 108.0)], warmup_s=1.0)
    assert got["gpu_steady_span_s"] == pytest.approx(4.0)  # 104-108 s
    assert got["gpu_util_after_warmup"] == pytest.approx(700 / 8)  # the samples of 104.5 ... 108 s
    assert got["depth_held_fraction"] == pytest.approx(3.5 / 4.0)
    assert got["gpu_util_while_held"] == pytest.approx(100.0)


def test_no_holds_no_figures():
    assert hold_util(samples([50, 50]), holds=[], warmup_s=0.0) == {
        "gpu_util_after_warmup": None,
        "gpu_util_while_held": None,
        "depth_held_fraction": None,
        "gpu_steady_span_s": None,
    }


def test_two_actors_overlapping_holds_count_once_and_the_window_starts_at_the_depth_warm_up():
    # depth holds 103-106 s (its first second the warm-up); the track actor 105-107 s, overlapping it;
    # nothing held 107-108 s, then the track actor 108-109 s
    s = samples([0] * 7 + [50, 50] + [100] * 6 + [0, 0] + [100, 100])
    depth = [(103.0, 106.0)]
    got = hold_util(s, holds=depth + [(105.0, 107.0), (108.0, 109.0)], warmup_s=1.0, warm_holds=[depth])
    assert got["gpu_steady_span_s"] == pytest.approx(5.0)  # 104-109 s
    assert got["depth_held_fraction"] == pytest.approx(4.0 / 5.0)  # 104-107 and 108-109, the overlap once
    assert got["gpu_util_after_warmup"] == pytest.approx(800 / 10)
    assert got["gpu_util_while_held"] == pytest.approx(100.0)


def test_merge_spans_joins_overlapping_and_touching_intervals_only():
    assert merge_spans([(3.0, 4.0), (1.0, 2.0), (1.5, 2.5), (2.5, 2.7), (5.0, 6.0)]) == [
        (1.0, 2.7),
        (3.0, 4.0),
        (5.0, 6.0),
    ]


def two_gpu_samples(used, idle_gpu=1, t0=100.0, period=0.5):
    """nvidia-smi rows of a 2-GPU host where the build used one GPU: one row per GPU per tick."""
    rows = []
    for i, u in enumerate(used):
        for g in (0, 1):
            rows.append((t0 + i * period, g, 0.0 if g == idle_gpu else u, 1000.0))
    return rows


def test_a_gpu_the_build_never_used_is_left_out_of_every_figure():
    # a 1-GPU build on a 2-GPU host (bench/RESULTS.md §7, session 8): averaging in the idle GPU halved
    # every figure. The build used GPU 1 here; GPU 0 stayed idle.
    utils = [0, 0, 50, 90, 90, 90, 90, 0]
    s = two_gpu_samples(utils, idle_gpu=0)
    got = hold_util(s, holds=[(100.5, 103.0)], warmup_s=0.5)
    assert got == hold_util(samples(utils), holds=[(100.5, 103.0)], warmup_s=0.5)
    assert got["gpu_util_after_warmup"] == pytest.approx(90.0)
    one = steady_util(samples(utils))
    assert steady_util(s)["gpu_util_steady"] == pytest.approx(one["gpu_util_steady"]) == pytest.approx(410 / 5)
    assert used_gpu_samples(s) == [r for r in s if r[1] == 1]


def test_with_two_depth_actors_the_window_starts_when_the_later_one_has_warmed_up():
    # actor A's first hold starts at 101 s, actor B's at 102.5 s; depth.warmup_s is summed over both
    # (1 s each): the steady state starts at 103.5 s, not at 101 + 2 s nor at 101 + 1 s
    a, b = [(101.0, 104.0)], [(102.5, 105.0)]
    s = samples([0, 0, 0, 50, 50, 50, 50, 100, 100, 100, 100])
    got = hold_util(s, holds=a + b, warmup_s=2.0, warm_holds=[a, b])
    assert got["gpu_steady_span_s"] == pytest.approx(1.5)  # 103.5-105 s
    assert got["gpu_util_after_warmup"] == pytest.approx(100.0)
    assert got["depth_held_fraction"] == pytest.approx(1.0)


def test_a_scene_copy_has_other_pixels_and_the_same_geometry():
    from types import SimpleNamespace

    import numpy as np

    from bench.bench_scene_passes import variant

    rng = np.random.default_rng(0)
    scene = SimpleNamespace(
        rgb=rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8),
        depth=rng.random((3, 4, 5)).astype(np.float32),
        intrinsics=np.eye(3),
        c2w=np.tile(np.eye(4), (3, 1, 1)),
    )
    one, two = variant(scene, 1), variant(scene, 2)
    assert one.rgb.dtype == np.uint8 and one.rgb.shape == scene.rgb.shape
    assert not np.array_equal(one.rgb, scene.rgb) and not np.array_equal(one.rgb, two.rgb)
    assert one.depth is scene.depth and one.c2w is scene.c2w and one.intrinsics is scene.intrinsics


def test_steady_throughput_counts_the_shards_done_after_the_first_over_the_span_to_the_last():
    # three shards done at 10, 12 and 14 s with 5, 6 and 4 clips; the first shard's completion marks
    # the end of the head (start-up, first ingest, warm-up), so its clips are not in the rate
    events = [
        {"shard_id": "a", "state": "running", "finished_at": None, "samples_written": None},
        {"shard_id": "a", "state": "done", "finished_at": 10.0, "samples_written": 5},
        {"shard_id": "c", "state": "done", "finished_at": 14.0, "samples_written": 4},
        {"shard_id": "b", "state": "done", "finished_at": 12.0, "samples_written": 6},
    ]
    got = steady_throughput(events)
    assert got["steady_span_s"] == pytest.approx(4.0)
    assert got["steady_clips_per_s"] == pytest.approx(10 / 4)
    assert got["shards_done"] == 3


def test_steady_throughput_needs_two_completions_and_counts_a_retried_shard_once():
    one = [{"shard_id": "a", "state": "done", "finished_at": 10.0, "samples_written": 5}]
    assert steady_throughput(one)["steady_clips_per_s"] is None
    # a shard that failed once and was done on its retry counts once, at its completion
    retried = one + [
        {"shard_id": "b", "state": "failed", "finished_at": 11.0, "samples_written": None},
        {"shard_id": "b", "state": "done", "finished_at": 13.0, "samples_written": 6},
    ]
    got = steady_throughput(retried)
    assert got["shards_done"] == 2
    assert got["steady_clips_per_s"] == pytest.approx(6 / 3)


def test_the_full_pipeline_rate_starts_at_the_completion_that_fills_it():
    # five shards of 4 clips done at 10, 11, 13, 16 and 18 s; with 2 in flight the rate runs from
    # the 2nd completion (11 s) to the last: the 3 shards after it, 12 clips over 7 s
    events = [
        {"shard_id": s, "state": "done", "finished_at": t, "samples_written": 4}
        for s, t in zip("abcde", (10.0, 11.0, 13.0, 16.0, 18.0))
    ]
    got = steady_throughput(events, full_after=2)
    assert got["full_clips_per_s"] == pytest.approx(12 / 7)
    assert got["steady_clips_per_s"] == pytest.approx(16 / 8)  # unchanged by it
    assert steady_throughput(events)["full_clips_per_s"] is None  # not asked for
    assert steady_throughput(events, full_after=4)["full_clips_per_s"] is None  # too few completions after it
