"""``d4s verify``: prove every planned clip is in exactly one intact shard (or recorded as failed).

Checks, per planned shard: the ledger says done; the file exists; its sha256 matches the
ledger; its tar parses; its sample keys are exactly the shard's planned clips minus the clips
recorded as failed, in plan order, each with the required entries. Across shards: no key
twice, no file under ``shards/`` that the plan does not name, and the index agrees: the same
keys, and each row's shard, sha256 and byte offset those the ledger records.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from manifests.store import ManifestStore
from pipeline.storage import Store

REQUIRED = ("intrinsics.npy", "c2w.npy", "meta.json", "rgb.000.jpg")
VERIFY_WORKERS = 16  # shards read at once (object stores: one stream each)
VERIFY_MEMORY = 2 << 30  # bytes of shards held at once by the reading threads


@dataclass
class VerifyReport:
    shards_checked: int = 0
    samples: int = 0
    clips_failed: int = 0
    problems: list[str] = field(default_factory=list)
    not_an_output: bool = False  # no plan recorded: nothing was verified (the CLI exits 2, not 1)

    @property
    def ok(self) -> bool:
        return not self.problems


class _ByteBudget:
    """Bytes of shards held in memory at once, across the reading threads: a shard is read whole
    (one request on an object store; hashing and reading release the GIL, so threads overlap),
    and the budget bounds the memory whatever the shard size. A shard larger than the budget is
    read alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self.cv = limit, 0, threading.Condition()

    def take(self, n: int) -> int:
        n = min(n, self.limit)
        with self.cv:
            self.cv.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        return n

    def give(self, n: int) -> None:
        with self.cv:
            self.used -= n
            self.cv.notify_all()


def _read_shard(store: Store, rel: str) -> tuple[str, list[tuple[str, set]] | None, str | None]:
    """(sha256, [(sample key, its entry extensions)] in tar order or None, why the tar is unreadable)."""
    data = store.read_bytes(rel)
    sha = hashlib.sha256(data).hexdigest()
    members: dict[str, set] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, set()).add(ext)
    except tarfile.TarError as exc:
        return sha, None, str(exc)
    return sha, list(members.items()), None


def verify(output: str, workers: int | None = None) -> VerifyReport:
    """The checks of the module docs. Shards are read once each (one request), hashed and parsed
    from memory, ``workers`` at a time within ``VERIFY_MEMORY`` bytes: at full scale (tens of
    thousands of shards, terabytes) a serial pass took hours; problems are reported in plan order
    all the same. Default: on an object store ``VERIFY_WORKERS`` streams (each is bound by its
    latency and bandwidth); on a filesystem one per core (hashing is the work)."""
    store = Store(output)
    if workers is None:
        workers = (os.cpu_count() or 1) if store.is_local else VERIFY_WORKERS
    ms = ManifestStore(store)
    rep = VerifyReport()
    if not ms.has_plan():
        rep.problems.append(f"{output}: no plan recorded (not a d4s output?)")
        rep.not_an_output = True
        return rep
    ledger = ms.ledger(columns=("sha256", "samples", "clips_failed"))
    from manifests.lease import live_owner

    live = live_owner(store) if any(ev["state"] == "running" for ev in ledger.values()) else None
    listing = store.files_detail("shards")  # one listing, not a request per shard
    seen: dict[str, str] = {}
    indexed: dict[str, tuple] = {}  # key -> (shard path, sha256, offset) as the ledger records them
    planned_paths = set()
    todo = []
    for sh in ms.shards():
        sid, rel = sh["shard_id"], sh["path"]
        planned_paths.add(rel)
        ev = ledger.get(sid)
        if not ev or ev["state"] != "done":
            state = ev["state"] if ev else "pending"
            if state == "running" and ev.get("build_id") != live:  # its driver is gone
                state = "running when its driver stopped; `d4s resume` redoes it"
            rep.problems.append(f"{rel}: shard not done (state {state})")
            continue
        if rel not in listing:
            rep.problems.append(f"{rel}: missing (ledger says done)")
            continue
        todo.append((sh, ev))
    budget = _ByteBudget(VERIFY_MEMORY)

    def check(sh: dict) -> tuple:
        held = budget.take(int(listing[sh["path"]].get("size") or 0))
        try:
            return _read_shard(store, sh["path"])
        finally:
            budget.give(held)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        read = pool.map(lambda t: check(t[0]), todo)
        for (sh, ev), (sha, order, why) in zip(todo, read):
            rel = sh["path"]
            rep.shards_checked += 1
            if sha != ev["sha256"]:
                rep.problems.append(f"{rel}: sha256 mismatch (file altered or corrupt)")
                continue
            indexed.update((key, (rel, ev["sha256"], int(offset))) for key, offset, *_ in ev["samples"])
            failed = {f["clip_id"] for f in ev["clips_failed"]}
            rep.clips_failed += len(failed)
            expected = [c for c in sh["clip_ids"] if c not in failed]
            if order is None:
                rep.problems.append(f"{rel}: unreadable tar ({why})")
                continue
            keys = [k for k, _ in order]
            if keys != expected:
                extra = sorted(set(keys) - set(expected))
                lost = sorted(set(expected) - set(keys))
                rep.problems.append(f"{rel}: keys differ from plan (unexpected {extra[:3]}, missing {lost[:3]})")
            for key, exts in order:
                miss = [e for e in REQUIRED if e not in exts]
                if miss:
                    rep.problems.append(f"{rel}: sample {key} lacks {miss}")
                if key in seen:
                    rep.problems.append(f"{rel}: sample {key} also in {seen[key]} (duplicate)")
                seen[key] = rel
            rep.samples += len(order)
    for rel in listing:
        if rel not in planned_paths:
            rep.problems.append(f"{rel}: file not in the plan (stray or partial write)")
    index = ms.index()
    if {r["key"] for r in index} != set(seen):
        rep.problems.append(f"index.parquet lists {len(index)} samples, shards hold {len(seen)}")
    stale = [
        r["key"]
        for r in index
        if r["key"] in indexed and (r["shard_path"], r["shard_sha256"], int(r["offset"])) != indexed[r["key"]]
    ]
    if stale:
        rep.problems.append(
            f"index.parquet: {len(stale)} rows disagree with the ledger on their shard, sha256 or offset "
            f"(e.g. {stale[0]}): the index is stale (a driver stopped before rewriting it); "
            "`d4s resume` rewrites it"
        )
    return rep
