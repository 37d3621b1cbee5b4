"""``d4s verify``: prove every planned clip is in exactly one intact shard (or recorded as failed).

Checks, per planned shard: the ledger says done; the file exists; its sha256 matches the
ledger; its tar parses; its sample keys are exactly the shard's planned clips minus the clips
recorded as failed, in plan order, each with the required entries. Across shards: no key
twice, no file under ``shards/`` that the plan does not name, and the index agrees: the same
keys, and each row's shard, sha256 and byte offset those the ledger records.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from manifests.store import ManifestStore
from pipeline.storage import Store

REQUIRED = ("intrinsics.npy", "c2w.npy", "meta.json", "rgb.000.jpg")
VERIFY_WORKERS = 16  # shards read at once (object stores: one stream each)


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


class _HashingReader:
    """A file read once, front to back, hashing every byte: what ``tarfile`` skips (the members'
    data) is read through in large chunks rather than sought over, so one pass gives the sha256
    of the whole shard and its headers, without holding the shard (hundreds of MB at full scale)
    in memory. Only forward seeks exist: reading a tar's members in order needs no other."""

    CHUNK = 1 << 20

    def __init__(self, f):
        self.f, self.h, self.pos = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        self.pos += len(b)
        return b

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.pos:
            raise OSError(f"only forward seeks: from {self.pos} to {pos} (whence {whence})")
        while self.pos < pos and self.read(min(self.CHUNK, pos - self.pos)):
            pass
        return self.pos

    def drain(self) -> str:
        while self.read(self.CHUNK):
            pass
        return self.h.hexdigest()


def _read_shard(store: Store, rel: str) -> tuple[str, list[tuple[str, set]] | None, str | None]:
    """(sha256, [(sample key, its entry extensions)] in tar order or None, why the tar is unreadable)."""
    with store.open(rel, "rb", block_size=8 << 20) as f:
        r = _HashingReader(f)
        members: dict[str, set] = {}
        why = None
        try:
            with tarfile.open(fileobj=r, mode="r:") as tar:  # 'r:': no compression probing (it seeks back)
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, set()).add(ext)
        except tarfile.TarError as exc:
            why = str(exc)
        sha = r.drain()
    return sha, (None if why else list(members.items())), why


def verify(output: str, workers: int | None = None) -> VerifyReport:
    """The checks of the module docs. Shards are read once each, streamed (hash and tar headers
    together), ``workers`` at a time: at full scale (tens of thousands of shards, terabytes) a
    serial pass took hours; problems are reported in plan order all the same. Default: on an
    object store ``VERIFY_WORKERS`` streams (each is bound by its latency and bandwidth); on a
    filesystem one per core (hashing is the work; more threads only contend)."""
    store = Store(output)
    if workers is None:
        workers = (os.cpu_count() or 1) if store.is_local else VERIFY_WORKERS
    ms = ManifestStore(store)
    rep = VerifyReport()
    if not ms.has_plan():
        rep.problems.append(f"{output}: no plan recorded (not a d4s output?)")
        rep.not_an_output = True
        return rep
    ledger = ms.ledger()
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
            rep.problems.append(f"{rel}: shard not done (state {ev['state'] if ev else 'pending'})")
            continue
        if rel not in listing:
            rep.problems.append(f"{rel}: missing (ledger says done)")
            continue
        todo.append((sh, ev))
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        read = pool.map(lambda t: _read_shard(store, t[0]["path"]), todo)
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
