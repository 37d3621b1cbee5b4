"""The scene bench's GPU steady state (bench/bench_scene_passes.py): from the end of the depth actor's
warm-up to the end of its last model call, read from the actor's hold intervals (``fault.trace_dir``).

The older figure ran from the first to the last busy GPU sample, so it took in the actor's start-up
warm-up, the wait for the first shard and the warm-up for the frame size: in builds of a few shards
that is most of the window (bench/RESULTS.md §7)."""

import pytest

from bench.bench_scene_passes import hold_util, merge_spans


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
    got = hold_util(s, holds=depth + [(105.0, 107.0), (108.0, 109.0)], warmup_s=1.0, warm_holds=depth)
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
