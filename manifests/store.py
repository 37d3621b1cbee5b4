"""Parquet manifests kept with the output: the plan (scenes, clips, shards) and the shard ledger.

Layout under the output root::

    manifests/scenes.parquet      one row per discovered scene
    manifests/clips.parquet       one row per planned clip (stable clip_id, frames, shard_id)
    manifests/shards.parquet      one row per planned shard
    manifests/ledger/*.parquet    append-only ledger events (one small file per flush, folded
                                  by compactions into ``compacted-*.parquet``)
    manifests/lease.json          the running driver's lease (manifests/lease.py)
    index.parquet                 sample key -> shard, byte offset (written when a build ends)

The ledger is append-only so that it works the same on a filesystem and an object store (a new
object per flush; no read-modify-write of a shared file). The current state of a shard is its
latest event by ``seq``, a number the driver owns: the epoch of its lease (one more than any
epoch already in the ledger) in the high bits and a counter in the low 40. Only the driver that
holds the lease writes the ledger; workers return results to it. Compaction and reading are safe
against each other and against a compaction killed half-way (see :meth:`ManifestStore.compact`).
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schemas import CLIP_SCHEMA, INDEX_SCHEMA, LEDGER_SCHEMA, SCENE_SCHEMA, SHARD_SCHEMA
from pipeline import strict_json
from pipeline.config import ConfigError
from pipeline.storage import Store

SHARD_STATES = ("pending", "running", "done", "failed")
LEDGER_DIR = "manifests/ledger"
EPOCH_SHIFT = 40  # seq = epoch << 40 | the event's number within its epoch
COMPACT_EVERY = 256  # event files a driver adds before it folds them
MAX_COMPACTED = 16  # a periodic compaction that would leave this many compacted files folds them all
READ_ROUNDS = 20  # listings a reader retries while compactions delete what it listed
_EVENT_IDENTITY = ("seq", "build_id", "shard_id", "state")
# JSON-encoded columns, decoded on reading, with the value an event written without them means
_JSON_COLUMNS = {"clips_failed": "[]", "timings": "{}", "samples": "[]", "clip_qc": "[]", "stage_counts": "{}"}
_NAME_SEQ = re.compile(r"^(?:events|compacted)-(\d{20})-[0-9a-f]{8}\.parquet$")


def _unique_events(table: pa.Table) -> pa.Table:
    """One row per event (the first copy), sorted by ``seq``."""
    cols = [
        table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows for c in _EVENT_IDENTITY
    ]
    seen: set = set()
    keep = []
    for i, key in enumerate(zip(*cols)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    out = table.take(pa.array(keep, pa.int64())) if len(keep) < table.num_rows else table
    return out.sort_by("seq")


def _to_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class DamagedOutputError(ConfigError):
    """A manifest object of an output cannot be read: it was damaged after it was written (every
    object is published whole, so a build never leaves one half-written)."""


def _parse(data: bytes, columns: list[str] | None = None, where: str = "a manifest object") -> pa.Table:
    # Parse on this thread (manifests are small). Arrow's reader threads (pq.read_table, or
    # use_threads) can drop the last reference to the Python-owned bytes after the read has
    # returned; one doing so while the interpreter exits cannot take the GIL, and the process
    # aborts ("terminate called without an active exception") after the command has finished.
    # ``columns`` a file lacks (written before they existed) are left out, not an error
    try:
        with pq.ParquetFile(pa.BufferReader(data)) as f:
            if columns is not None:
                have = set(f.schema_arrow.names)
                columns = [c for c in columns if c in have]
            return f.read(columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        advice = (
            "restore it, or remove it: `d4s resume` then rebuilds the shards whose events it held"
            if f"/{LEDGER_DIR}/" in where
            else "restore it from a copy"
        )
        raise DamagedOutputError(
            f"{where}: not a readable Parquet object ({type(exc).__name__}: {exc}); it was damaged after "
            f"it was written: {advice}"
        ) from None


def _read(store: Store, rel: str) -> pa.Table:
    return _parse(store.read_bytes(rel), where=store.display(rel))


class ManifestStore:
    def __init__(self, store: Store):
        self.store = store
        self._epoch: int | None = None
        self._counter = 0
        self.files_since_compaction = 0

    # -- plan ------------------------------------------------------------------------------
    def write_plan(self, scenes: list[dict], clips: list[dict], shards: list[dict]) -> None:
        # every table is made before any is written: a plan that cannot be recorded leaves none
        try:
            data = {
                "scenes": _to_bytes(pa.Table.from_pylist(scenes, SCENE_SCHEMA)),
                "clips": _to_bytes(pa.Table.from_pylist(clips, CLIP_SCHEMA)),
                "shards": _to_bytes(pa.Table.from_pylist(shards, SHARD_SCHEMA)),
            }
        except UnicodeEncodeError as exc:  # planning escapes such names (pipeline/plan.py: recordable)
            raise ConfigError(
                f"the plan holds a name that is not UTF-8, which Parquet cannot hold: {exc.object!r}"
            ) from None
        for name, raw in data.items():
            self.store.write_bytes_atomic(f"manifests/{name}.parquet", raw)

    def has_plan(self) -> bool:
        return self.store.exists("manifests/shards.parquet")

    def scenes(self) -> list[dict]:
        return _read(self.store, "manifests/scenes.parquet").to_pylist()

    def clips(self) -> list[dict]:
        return _read(self.store, "manifests/clips.parquet").to_pylist()

    def shards(self) -> list[dict]:
        return _read(self.store, "manifests/shards.parquet").to_pylist()

    # -- ledger ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Number this driver's events in ``epoch`` (the lease's; larger than any in the ledger)."""
        self._epoch, self._counter = int(epoch), 0

    def max_epoch(self) -> int:
        """The largest epoch among recorded events (0 for an empty ledger). Read from the file
        names (an append file is named after its first event, all of one epoch; a compacted file
        after its last); only files named otherwise (written by older versions) are opened."""
        best, legacy = 0, []
        for n in self._event_files():
            m = _NAME_SEQ.match(n)
            if m:
                best = max(best, int(m.group(1)) >> EPOCH_SHIFT)
            else:
                legacy.append(n)
        for rel, data in self.store.read_many([f"{LEDGER_DIR}/{n}" for n in legacy]).items():
            if isinstance(data, FileNotFoundError):  # folded by a compaction meanwhile: read it all
                return max([best] + [e["seq"] >> EPOCH_SHIFT for e in self.ledger_events()])
            if isinstance(data, BaseException):
                raise data
            seqs = _parse(data, columns=["seq"], where=self.store.display(rel)).column("seq").to_pylist()
            best = max([best] + [q >> EPOCH_SHIFT for q in seqs if q is not None])
        return best

    def _next_seq(self) -> int:
        if self._epoch is None:  # a writer without a lease (tools, tests): after everything recorded
            self.set_epoch(self.max_epoch() + 1)
        self._counter += 1
        if self._counter >= 1 << EPOCH_SHIFT:
            raise OverflowError("more than 2**40 ledger events in one epoch")
        return (self._epoch << EPOCH_SHIFT) | self._counter

    def append_events(self, events: list[dict]) -> None:
        """Persist ledger events atomically as one new Parquet object, numbered in this driver's
        sequence (``seq`` = epoch << 40 | counter): never a wall clock, so a host whose clock is
        behind cannot slip an event under an older one."""
        if not events:
            return
        rows = []
        for e in events:
            row = {k: e.get(k) for k in LEDGER_SCHEMA.names}
            row["seq"] = self._next_seq()
            row["clips_failed"] = strict_json.dumps(e.get("clips_failed") or [])
            row["timings"] = strict_json.dumps(e.get("timings") or {})
            row["samples"] = strict_json.dumps(e.get("samples") or [])
            row["clip_qc"] = strict_json.dumps(e.get("clip_qc") or [])
            row["stage_counts"] = strict_json.dumps(e.get("stage_counts") or {})
            rows.append(row)
        name = f"{LEDGER_DIR}/events-{rows[0]['seq']:020d}-{uuid.uuid4().hex[:8]}.parquet"
        self.store.write_bytes_atomic(name, _to_bytes(pa.Table.from_pylist(rows, LEDGER_SCHEMA)))
        self.files_since_compaction += 1

    def _event_files(self) -> list[str]:
        return [n for n in self.store.listdir(LEDGER_DIR) if n.endswith(".parquet") and ".tmp-" not in n]

    def _read_event_files(self, columns: list[str] | None = None) -> dict[str, pa.Table]:
        """Every event file (``columns`` of it, or all), read while a compaction may fold and
        delete them.

        A compaction writes its output before it deletes its inputs, so a file that vanished
        between listing and reading has its events in a newer file: list again and read what is
        new. The same event can then be read twice (from an input and from the output, or from
        the two outputs of compactions that ran at once); :func:`_unique_events` drops the copies.
        """
        got: dict[str, pa.Table] = {}
        for _ in range(READ_ROUNDS):
            todo = [n for n in self._event_files() if n not in got]
            data = self.store.read_many([f"{LEDGER_DIR}/{n}" for n in todo])
            vanished = False
            for n in todo:
                v = data[f"{LEDGER_DIR}/{n}"]
                if isinstance(v, FileNotFoundError):
                    vanished = True
                elif isinstance(v, BaseException):
                    raise v
                else:
                    got[n] = _parse(v, columns=columns, where=self.store.display(f"{LEDGER_DIR}/{n}"))
            if not vanished:
                return got
        raise RuntimeError(f"{self.store.display(LEDGER_DIR)}: the ledger kept changing under {READ_ROUNDS} reads")

    def ledger_events(self, columns: Iterable[str] | None = None) -> list[dict]:
        """Every event once, in sequence order; the JSON columns decoded.

        ``columns``: only these fields of each event (with its identity: seq, build_id, shard_id,
        state), for readers that need a few. At the full dataset's scale the per-sample columns
        (``clip_qc`` above all) are most of the ledger, and decoding them most of the time to read
        it; resume, the index and the training loader never look at them. A column that an event
        was written without reads as None (a JSON one as its empty value)."""
        wanted = None
        if columns is not None:
            unknown = sorted(set(columns) - set(LEDGER_SCHEMA.names))
            if unknown:
                raise ValueError(f"not ledger columns: {', '.join(unknown)}")
            wanted = list(dict.fromkeys([*_EVENT_IDENTITY, *columns]))
        tables = list(self._read_event_files(wanted).values())
        if not tables:
            return []
        rows = _unique_events(pa.concat_tables(tables, promote_options="default")).to_pylist()
        for r in rows:
            for c in wanted or LEDGER_SCHEMA.names:
                if c in _JSON_COLUMNS:
                    r[c] = json.loads(r.get(c) or _JSON_COLUMNS[c])
                else:
                    r.setdefault(c, None)
        return rows

    def ledger(self, events: list[dict] | None = None, columns: Iterable[str] | None = None) -> dict[str, dict]:
        """Current state per shard_id: its latest event, with ``attempts`` counted over events
        (``columns``: as :meth:`ledger_events`)."""
        return current_states(self.ledger_events(columns) if events is None else events)

    def maybe_compact(self, every: int = COMPACT_EVERY, after_write: Callable[[], None] | None = None) -> None:
        """Fold this writer's recent files once it has added ``every`` of them (cheap: the files
        already compacted are left alone until they would number ``MAX_COMPACTED``)."""
        if self.files_since_compaction >= every:
            self.compact(after_write=after_write, full=False)

    def compact(self, after_write: Callable[[], None] | None = None, full: bool = True) -> int:
        """Fold event files into one; returns how many it replaced.

        ``full`` folds every file; otherwise only the small ``events-*`` files, unless its output
        would make ``MAX_COMPACTED`` compacted files (a periodic compaction during a long build
        then costs the few hundred files written since the last one, not the whole ledger).

        Never loses or duplicates an event: the output has a name of its own (two compactions at
        once write two files, neither overwrites the other), it is durable before any input is
        deleted, only the files this compaction read are deleted, and readers drop the copies an
        interrupted or concurrent compaction leaves behind. ``after_write`` is a test hook called
        between the output's publication and the first deletion.
        """
        self.files_since_compaction = 0
        names = self._event_files()
        if not full:
            small = [n for n in names if n.startswith("events-")]
            if len(names) - len(small) + 1 < MAX_COMPACTED:  # the output would not make the pile MAX_COMPACTED
                names = small
        if len(names) <= 1:
            return 0
        data = self.store.read_many([f"{LEDGER_DIR}/{n}" for n in names])
        tables = {}
        for n in names:
            v = data[f"{LEDGER_DIR}/{n}"]
            if isinstance(v, FileNotFoundError):
                continue  # folded by another compaction meanwhile: its events are in that one's output
            if isinstance(v, BaseException):
                raise v
            tables[n] = _parse(v, where=self.store.display(f"{LEDGER_DIR}/{n}"))
        if len(tables) <= 1:
            return 0
        merged = _unique_events(pa.concat_tables(list(tables.values()), promote_options="default"))
        last = merged.column("seq")[-1].as_py()
        target = f"{LEDGER_DIR}/compacted-{last:020d}-{uuid.uuid4().hex[:8]}.parquet"
        self.store.write_bytes_atomic(target, _to_bytes(merged))
        if not self.store.exists(target):
            raise IOError(f"{self.store.display(target)}: the compacted ledger is not visible after writing it")
        if after_write is not None:
            after_write()
        for n in tables:
            self.store.remove(f"{LEDGER_DIR}/{n}")
        return len(tables)

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
