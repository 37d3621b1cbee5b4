"""The shard ledger under concurrency: order by the driver's sequence (not wall clocks), compactions
that never lose or duplicate an event (two at once, one killed half-way), and readers that keep
working while a compaction folds and deletes the files they listed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from manifests.store import ManifestStore
from pipeline.storage import Store

ROOT = Path(__file__).resolve().parents[1]


def _event(shard: str, state: str, **kw) -> dict:
    return {"shard_id": shard, "state": state, "build_id": kw.pop("build_id", "b"), **kw}


def _fill(ms: ManifestStore, n: int, files: int = 0) -> None:
    """``n`` shards, each with a running and a done event; the first ``files`` events one file each."""
    for i in range(n):
        ms.append_events([_event(f"s{i:04d}", "running")])
        ms.append_events([_event(f"s{i:04d}", "done", sha256=f"{i:064x}")])


def _ids(events: list[dict]) -> list[tuple]:
    return [(e["seq"], e["shard_id"], e["state"]) for e in events]


def test_order_is_the_drivers_sequence_not_the_wall_clock(tmp_path, monkeypatch):
    """A resume on a host whose clock is 10 s behind still supersedes the older event."""
    store = Store(str(tmp_path))
    ManifestStore(store).append_events([_event("s0", "failed", error="boom", build_id="first")])
    real_ns, real_s = time.time_ns, time.time
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() - 10_000_000_000)
    monkeypatch.setattr(time, "time", lambda: real_s() - 10.0)
    second = ManifestStore(store)  # a new driver process, on the skewed host
    second.append_events([_event("s0", "running", build_id="second")])
    second.append_events([_event("s0", "done", build_id="second", sha256="ab" * 32)])
    led = ManifestStore(store).ledger()
    assert led["s0"]["state"] == "done" and led["s0"]["build_id"] == "second"
    assert led["s0"]["attempts"] == 1


class _PausingStore(Store):
    """Pauses the first compaction output write until ``go`` is set (a slow, stale compaction)."""

    def __init__(self, url, reached: threading.Event, go: threading.Event):
        super().__init__(url)
        self.reached, self.go = reached, go

    def write_bytes_atomic(self, rel, data):
        if "compact" in rel and not self.go.is_set():
            self.reached.set()
            self.go.wait(30)
        return super().write_bytes_atomic(rel, data)


def test_two_compactions_at_once_lose_no_event(tmp_path):
    store = Store(str(tmp_path))
    ms = ManifestStore(store)
    _fill(ms, 3)
    reached, go = threading.Event(), threading.Event()
    slow = ManifestStore(_PausingStore(str(tmp_path), reached, go))
    t = threading.Thread(target=slow.compact)
    t.start()
    assert reached.wait(30)  # the slow compaction has read its inputs and is about to write
    ms.append_events([_event("s9999", "running")])
    ms.append_events([_event("s9999", "done", sha256="cd" * 32)])
    ManifestStore(store).compact()  # a second compaction folds everything, including the new events
    go.set()
    t.join(30)
    events = ManifestStore(store).ledger_events()
    assert len(events) == 8 and len(set(_ids(events))) == 8
    assert ManifestStore(store).ledger()["s9999"]["state"] == "done"
    ManifestStore(store).compact()
    assert len(ManifestStore(store).ledger_events()) == 8
    assert len([n for n in store.listdir("manifests/ledger") if n.endswith(".parquet")]) == 1


def test_compaction_killed_before_deleting_its_inputs_leaves_no_duplicates(tmp_path):
    store = Store(str(tmp_path))
    ms = ManifestStore(store)
    _fill(ms, 100)  # 200 events in 200 files
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from manifests.store import ManifestStore
        from pipeline.storage import Store
        calls = []
        def dying_remove(self, rel):
            calls.append(rel)
            if len(calls) == 7:
                os._exit(9)  # killed after its output is durable and 6 inputs are gone
            return Store.__dict__["_orig_remove"](self, rel)
        Store._orig_remove = Store.remove
        Store.remove = dying_remove
        ManifestStore(Store({str(tmp_path)!r})).compact()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-2000:]
    events = ManifestStore(store).ledger_events()
    assert len(events) == 200 and len(set(_ids(events))) == 200
    led = ManifestStore(store).ledger()
    assert all(e["attempts"] == 1 and e["state"] == "done" for e in led.values()) and len(led) == 100
    ManifestStore(store).compact()  # the next compaction folds the leftovers without duplicating
    assert len(ManifestStore(store).ledger_events()) == 200


class _CompactingOnListStore(Store):
    """Runs a whole compaction right after this reader listed the ledger (once)."""

    def listdir(self, rel=""):
        names = super().listdir(rel)
        if rel == "manifests/ledger" and not getattr(self, "_done", False):
            self._done = True
            ManifestStore(Store(self.url)).compact()
        return names


class _ReadingBetweenWriteAndDeleteStore(Store):
    """A compactor whose first input deletion is preceded by a reader's full read."""

    seen: list | None = None

    def remove(self, rel):
        if self.seen is None:
            self.seen = ManifestStore(Store(self.url)).ledger_events()
        return super().remove(rel)


def test_readers_during_a_compaction_see_every_event_once(tmp_path):
    store = Store(str(tmp_path))
    _fill(ManifestStore(store), 20)
    # the files the reader listed are deleted before it reads them
    events = ManifestStore(_CompactingOnListStore(str(tmp_path))).ledger_events()
    assert len(events) == 40 and len(set(_ids(events))) == 40
    # the reader runs when the compacted file is written and its inputs still exist
    _fill(ManifestStore(store), 5)
    compactor = _ReadingBetweenWriteAndDeleteStore(str(tmp_path))
    ManifestStore(compactor).compact()
    assert compactor.seen is not None
    assert len(compactor.seen) == 50 and len(set(_ids(compactor.seen))) == 50


def test_readers_and_compactions_in_threads(tmp_path):
    """Appends, compactions and reads at once for a second: every read a duplicate-free prefix."""
    store = Store(str(tmp_path))
    ms = ManifestStore(store)
    stop = threading.Event()
    problems: list[str] = []

    def writer():
        i = 0
        while not stop.is_set():
            ms.append_events([_event(f"w{i:05d}", "done", sha256="ee" * 32)])
            i += 1
            if i % 7 == 0:
                ms.compact()

    def reader():
        last = 0
        while not stop.is_set():
            try:
                ev = ManifestStore(store).ledger_events()
            except Exception as exc:  # noqa: BLE001 - any crash of a reader is the defect
                problems.append(f"{type(exc).__name__}: {exc}")
                return
            ids = _ids(ev)
            if len(ids) != len(set(ids)):
                problems.append(f"duplicated events: {len(ids) - len(set(ids))}")
            if len(ids) < last:
                problems.append(f"events went from {last} to {len(ids)}")
            last = len(ids)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert not problems, problems[:5]
    ms.compact()
    final = ManifestStore(store).ledger_events()
    assert len(final) == len(set(_ids(final))) > 0


def test_a_ledger_from_before_driver_sequences_is_continued_and_compacted(tmp_path):
    """Events numbered by the old nanosecond clock (here a host a day ahead), in files named the old
    way and without the newer columns, are still ordered before every new event."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(str(tmp_path))
    old_schema = pa.schema(
        [
            ("seq", pa.int64()),
            ("shard_id", pa.string()),
            ("state", pa.string()),
            ("attempt", pa.int64()),
            ("error", pa.string()),
            ("sha256", pa.string()),
            ("clips_failed", pa.string()),
            ("timings", pa.string()),
            ("samples", pa.string()),
            ("host", pa.string()),
            ("build_id", pa.string()),
        ]
    )
    ahead = time.time_ns() + 86_400 * 10**9
    for i, (state, name) in enumerate(
        [("running", "events-{:024d}-abcdef12.parquet"), ("failed", "events-{:024d}-compact.parquet")]
    ):
        rows = [
            {
                "seq": ahead + i,
                "shard_id": "s0",
                "state": state,
                "attempt": 1,
                "error": "boom" if i else None,
                "sha256": None,
                "clips_failed": "[]",
                "timings": "{}",
                "samples": "[]",
                "host": "h",
                "build_id": "old",
            }
        ]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, old_schema), buf)
        store.write_bytes_atomic(f"manifests/ledger/{name.format(ahead + i)}", buf.getvalue())
    ms = ManifestStore(store)
    assert ms.max_epoch() == (ahead + 1) >> 40
    ms.append_events([_event("s0", "running", build_id="new")])
    ms.append_events([_event("s0", "done", build_id="new", sha256="ab" * 32)])
    led = ManifestStore(store).ledger()
    assert led["s0"]["state"] == "done" and led["s0"]["attempts"] == 2
    ManifestStore(store).compact()
    events = ManifestStore(store).ledger_events()
    assert [e["state"] for e in events] == ["running", "failed", "running", "done"]


def test_periodic_compaction_folds_recent_files_and_compacted_ones_only_when_they_pile_up(tmp_path):
    from manifests.store import MAX_COMPACTED

    store = Store(str(tmp_path))
    ms = ManifestStore(store)

    def files():
        names = [n for n in store.listdir("manifests/ledger") if n.endswith(".parquet")]
        return sum(n.startswith("compacted-") for n in names), sum(n.startswith("events-") for n in names)

    for i in range(4 * (MAX_COMPACTED - 1)):
        ms.append_events([_event(f"s{i:04d}", "done", sha256="ab" * 32)])
        ms.maybe_compact(every=4)
    assert files() == (MAX_COMPACTED - 1, 0)  # each periodic compaction folded only its 4 new files
    for i in range(4):
        ms.append_events([_event(f"t{i}", "done", sha256="ab" * 32)])
        ms.maybe_compact(every=4)
    assert files() == (1, 0)  # the pile reached MAX_COMPACTED: everything folded into one
    events = ManifestStore(store).ledger_events()
    assert len(events) == 4 * MAX_COMPACTED and len(set(_ids(events))) == len(events)


def test_readers_read_only_the_columns_they_need(tmp_path):
    """A reader that names its columns gets those (and the event's identity) with the JSON ones
    decoded, the same values as a full read, and nothing else: at the full dataset's scale the
    per-sample QC records are most of the ledger, and resume, the index and the loader never use them."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(str(tmp_path))
    ms = ManifestStore(store)
    qc = [{"key": "k0", "align": {"scale": 1.5}}]
    ms.append_events([_event("s0", "running")])
    ms.append_events(
        [_event("s0", "done", sha256="ab" * 32, samples=[["k0", 0, 16, True]], clip_qc=qc, stage_counts={"a": {}})]
    )
    # an event file written before the stage_counts / clip_qc / fingerprint columns existed
    old = pa.schema([("seq", pa.int64()), ("shard_id", pa.string()), ("state", pa.string()), ("build_id", pa.string())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"seq": 1, "shard_id": "s1", "state": "running", "build_id": "o"}], old), buf)
    store.write_bytes_atomic("manifests/ledger/events-00000000000000000001-0123abcd.parquet", buf.getvalue())

    full = ManifestStore(store).ledger()
    some = ManifestStore(store).ledger(columns=("sha256", "samples", "stage_counts"))
    assert set(some) == set(full) == {"s0", "s1"}
    for sid in full:
        assert set(some[sid]) == {
            "seq",
            "shard_id",
            "state",
            "build_id",
            "sha256",
            "samples",
            "stage_counts",
            "attempts",
        }
        for col in some[sid]:
            assert some[sid][col] == full[sid][col], (sid, col)
    assert some["s0"]["samples"] == [["k0", 0, 16, True]] and full["s0"]["clip_qc"] == qc
    assert some["s1"]["stage_counts"] == {} and some["s1"]["sha256"] is None  # columns the old file lacks
    assert some["s0"]["attempts"] == 1
    with pytest.raises(ValueError, match="clip_qcc"):
        ManifestStore(store).ledger(columns=("clip_qcc",))  # a typo is not an empty column
