"""Every stage task of a shard pipeline starts only once its inputs exist.

A task that starts before its inputs and waits for them inside (``ray.get`` in the body) holds a
worker process the whole wait; Ray lends its CPU to other tasks meanwhile, and those need worker
processes of their own, each started and importing the stages (torch: seconds of CPU). The demo
build on 2 CPUs had 15 worker processes and ~6 GB of them, most waiting; on a cluster node with
many shards in flight that is dozens. With the inputs handed to Ray as task arguments, Ray starts a
task once they exist (and on the node that holds them).

``fault.trace_dir`` records when each stage's task body began and ended, per clip
(``tasks/<stage>.<pid>``); here every stage must begin after the stages before it ended for its clips.
"""

from __future__ import annotations

from pathlib import Path

from conftest import tartanair_config, write_tartanair

from pipeline.runner import build

# Stages in pipeline order; depth and MegaSaM run side by side, both after ingest.
RANK = {"ingest": 0, "depth": 1, "megasam": 1, "align": 2, "tracks": 3, "encode": 4, "write": 5}


def task_spans(trace_dir: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """clip id -> stage -> (first start, last end) of that stage's task bodies on the clip."""
    spans: dict[str, dict[str, tuple[float, float]]] = {}
    for f in (trace_dir / "tasks").iterdir():
        stage = f.name.split(".")[0]
        for line in f.read_text().splitlines():
            start, end, *clip_ids = line.split()
            for cid in clip_ids:
                a, b = spans.setdefault(cid, {}).get(stage, (float("inf"), float("-inf")))
                spans[cid][stage] = (min(a, float(start)), max(b, float(end)))
    return spans


def early_starts(trace_dir: Path) -> list[str]:
    """Each (clip, stage) whose task began before an earlier stage's task on that clip had ended."""
    out = []
    for cid, stages in sorted(task_spans(trace_dir).items()):
        for later, (start, _) in stages.items():
            for earlier, (_, end) in stages.items():
                if RANK[earlier] < RANK[later] and start < end:
                    out.append(f"{cid}: {later} began {end - start:.2f} s before {earlier} ended")
    return out


def test_stage_tasks_start_after_their_inputs_exist(tmp_path, ray_local):
    data = tmp_path / "data"
    write_tartanair(data, n_scenes=2, frames=13)  # 8 clips of 4 frames, 4 shards of 2
    trace = tmp_path / "trace"
    cfg = tartanair_config(tmp_path, data, "out", fault={"trace_dir": str(trace), "ingest_delay_s": 0.5})
    s = build(cfg, show_progress=False)
    assert s.ok and s.clips_written == 8
    spans = task_spans(trace)
    assert len(spans) == 8 and all({"ingest", "encode", "write"} <= set(v) for v in spans.values()), spans
    assert early_starts(trace) == []


def test_what_escapes_a_stage_fails_its_clips_not_the_tasks_after_it():
    """A task's exception would fail every task fed by it, the shard's write among them; the
    backstop turns it into one failure per clip, classified, and passes a result through."""
    from pipeline.clip import ClipFailure
    from pipeline.dag import _or_failures

    def broken():
        raise KeyError("intrinsics")

    def lost():
        raise ConnectionResetError(104, "Connection reset by peer")

    assert _or_failures("align", ["a", "b"], lambda: ["x", "y"]) == ["x", "y"]
    out = _or_failures("align", ["a", "b"], broken)
    assert [type(f) for f in out] == [ClipFailure, ClipFailure] and [f.clip_id for f in out] == ["a", "b"]
    assert all(f.stage == "align" and "KeyError" in f.reason and not f.transient for f in out)
    [f] = _or_failures("encode", ["c"], lost)
    assert f.transient and "ConnectionResetError" in f.reason
