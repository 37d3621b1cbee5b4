"""Parquet manifests kept with the output: the plan (scenes, clips, shards) and the shard ledger.

Layout under the output root::

    manifests/scenes.parquet      one row per discovered scene
    manifests/clips.parquet       one row per planned clip (stable clip_id, frames, shard_id)
    manifests/shards.parquet      one row per planned shard
    manifests/ledger/*.parquet    append-only ledger events (one small file per flush)
    index.parquet                 sample key -> shard, byte offset (written when a build ends)

The ledger is append-only so that it works the same on a filesystem and an object store (a new
object per flush; no read-modify-write of a shared file). The current state of a shard is its
latest event. Only the driver writes the ledger; workers return results to it.
"""
from __future__ import annotations

import io
import json
import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schemas import CLIP_SCHEMA, INDEX_SCHEMA, LEDGER_SCHEMA, SCENE_SCHEMA, SHARD_SCHEMA
from pipeline import strict_json
from pipeline.storage import Store

SHARD_STATES = ("pending", "running", "done", "failed")


def _to_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _read(store: Store, rel: str) -> pa.Table:
    # Read on this thread (manifests are small). Arrow's reader threads (pq.read_table, or
    # use_threads) can drop the last reference to the Python-owned bytes after the read has
    # returned; one doing so while the interpreter exits cannot take the GIL, and the process
    # aborts ("terminate called without an active exception") after the command has finished.
    with pq.ParquetFile(pa.BufferReader(store.read_bytes(rel))) as f:
        return f.read(use_threads=False)


class ManifestStore:
    def __init__(self, store: Store):
        self.store = store
        self._seq = 0

    # -- plan ------------------------------------------------------------------------------
    def write_plan(self, scenes: list[dict], clips: list[dict], shards: list[dict]) -> None:
        self.store.write_bytes_atomic("manifests/scenes.parquet", _to_bytes(pa.Table.from_pylist(scenes, SCENE_SCHEMA)))
        self.store.write_bytes_atomic("manifests/clips.parquet", _to_bytes(pa.Table.from_pylist(clips, CLIP_SCHEMA)))
        self.store.write_bytes_atomic("manifests/shards.parquet", _to_bytes(pa.Table.from_pylist(shards, SHARD_SCHEMA)))

    def has_plan(self) -> bool:
        return self.store.exists("manifests/shards.parquet")

    def scenes(self) -> list[dict]:
        return _read(self.store, "manifests/scenes.parquet").to_pylist()

    def clips(self) -> list[dict]:
        return _read(self.store, "manifests/clips.parquet").to_pylist()

    def shards(self) -> list[dict]:
        return _read(self.store, "manifests/shards.parquet").to_pylist()

    # -- ledger ----------------------------------------------------------------------------
    def append_events(self, events: list[dict]) -> None:
        """Persist ledger events atomically as one new Parquet object."""
        if not events:
            return
        rows = []
        for e in events:
            row = {k: e.get(k) for k in LEDGER_SCHEMA.names}
            # strictly increasing within this process, time-ordered across processes
            self._seq = max(time.time_ns(), self._seq + 1)
            row["seq"] = self._seq
            row["clips_failed"] = strict_json.dumps(e.get("clips_failed") or [])
            row["timings"] = strict_json.dumps(e.get("timings") or {})
            row["samples"] = strict_json.dumps(e.get("samples") or [])
            row["clip_qc"] = strict_json.dumps(e.get("clip_qc") or [])
            row["stage_counts"] = strict_json.dumps(e.get("stage_counts") or {})
            rows.append(row)
        name = f"manifests/ledger/events-{rows[0]['seq']:024d}-{uuid.uuid4().hex[:8]}.parquet"
        self.store.write_bytes_atomic(name, _to_bytes(pa.Table.from_pylist(rows, LEDGER_SCHEMA)))

    def ledger_events(self) -> list[dict]:
        rows = []
        for name in self.store.listdir("manifests/ledger"):
            if name.endswith(".parquet") and ".tmp-" not in name:
                rows.extend(_read(self.store, f"manifests/ledger/{name}").to_pylist())
        rows.sort(key=lambda r: r["seq"])
        for r in rows:
            r["clips_failed"] = json.loads(r["clips_failed"] or "[]")
            r["timings"] = json.loads(r["timings"] or "{}")
            r["samples"] = json.loads(r["samples"] or "[]")
            r["clip_qc"] = json.loads(r.get("clip_qc") or "[]")
            r["stage_counts"] = json.loads(r.get("stage_counts") or "{}")  # {}: written before the column existed
        return rows

    def ledger(self) -> dict[str, dict]:
        """Current state per shard_id: its latest event, with ``attempts`` counted over events."""
        return current_states(self.ledger_events())

    def compact(self) -> None:
        """Fold the event files into one (keeps history; bounds the number of objects)."""
        names = [n for n in self.store.listdir("manifests/ledger") if n.endswith(".parquet") and ".tmp-" not in n]
        if len(names) <= 1:
            return
        tables = [_read(self.store, f"manifests/ledger/{n}") for n in names]
        # promote: ledgers written before a column was added still fold in (missing -> null)
        merged = pa.concat_tables(tables, promote_options="default").sort_by("seq")
        first_seq = merged.column("seq")[0].as_py()
        target = f"manifests/ledger/events-{first_seq:024d}-compact.parquet"
        self.store.write_bytes_atomic(target, _to_bytes(merged))
        for n in names:
            if f"manifests/ledger/{n}" != target:
                self.store.remove(f"manifests/ledger/{n}")

    # -- index -----------------------------------------------------------------------------
    def write_index(self, rows: list[dict]) -> None:
        rows = sorted(rows, key=lambda r: r["key"])
        self.store.write_bytes_atomic("index.parquet", _to_bytes(pa.Table.from_pylist(rows, INDEX_SCHEMA)))

    def index(self) -> list[dict]:
        return _read(self.store, "index.parquet").to_pylist() if self.store.exists("index.parquet") else []


def current_states(events: list[dict]) -> dict[str, dict]:
    """Latest event per shard_id of ``events`` (in ``seq`` order), with ``attempts`` counted over
    them: for readers that already hold the events (one ledger read per command)."""
    state: dict[str, dict] = {}
    attempts: dict[str, int] = {}
    for e in events:
        if e["state"] == "running":
            attempts[e["shard_id"]] = attempts.get(e["shard_id"], 0) + 1
        state[e["shard_id"]] = e
    for sid, e in state.items():
        e["attempts"] = attempts.get(sid, 0)
    return state


def host_name() -> str:
    return os.uname().nodename
