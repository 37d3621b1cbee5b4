"""``d4s verify``: prove every planned clip is in exactly one intact shard (or recorded as failed).

Checks, per planned shard: the ledger says done; the file exists; its sha256 matches the
ledger; its tar parses; its sample keys are exactly the shard's planned clips minus the clips
recorded as failed, in plan order, each with the required entries. Across shards: no key
twice, no file under ``shards/`` that the plan does not name, and the index agrees: the same
keys, and each row's shard, sha256 and byte offset those the ledger records.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

from manifests.store import ManifestStore
from pipeline.storage import Store

REQUIRED = ("intrinsics.npy", "c2w.npy", "meta.json", "rgb.000.jpg")


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


def verify(output: str) -> VerifyReport:
    store = Store(output)
    ms = ManifestStore(store)
    rep = VerifyReport()
    if not ms.has_plan():
        rep.problems.append(f"{output}: no plan recorded (not a d4s output?)")
        rep.not_an_output = True
        return rep
    ledger = ms.ledger()
    seen: dict[str, str] = {}
    indexed: dict[str, tuple] = {}  # key -> (shard path, sha256, offset) as the ledger records them
    planned_paths = set()
    for sh in ms.shards():
        sid, rel = sh["shard_id"], sh["path"]
        planned_paths.add(rel)
        ev = ledger.get(sid)
        if not ev or ev["state"] != "done":
            rep.problems.append(f"{rel}: shard not done (state {ev['state'] if ev else 'pending'})")
            continue
        if not store.exists(rel):
            rep.problems.append(f"{rel}: missing (ledger says done)")
            continue
        rep.shards_checked += 1
        data = store.read_bytes(rel)
        import hashlib

        if hashlib.sha256(data).hexdigest() != ev["sha256"]:
            rep.problems.append(f"{rel}: sha256 mismatch (file altered or corrupt)")
            continue
        indexed.update((key, (rel, ev["sha256"], int(offset))) for key, offset, *_ in ev["samples"])
        failed = {f["clip_id"] for f in ev["clips_failed"]}
        rep.clips_failed += len(failed)
        expected = [c for c in sh["clip_ids"] if c not in failed]
        try:
            members: dict[str, set] = {}
            order: list[str] = []
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    if key not in members:
                        members[key] = set()
                        order.append(key)
                    members[key].add(ext)
        except tarfile.TarError as exc:
            rep.problems.append(f"{rel}: unreadable tar ({exc})")
            continue
        if order != expected:
            extra = sorted(set(order) - set(expected))
            lost = sorted(set(expected) - set(order))
            rep.problems.append(f"{rel}: keys differ from plan (unexpected {extra[:3]}, missing {lost[:3]})")
        for key in order:
            miss = [e for e in REQUIRED if e not in members[key]]
            if miss:
                rep.problems.append(f"{rel}: sample {key} lacks {miss}")
            if key in seen:
                rep.problems.append(f"{rel}: sample {key} also in {seen[key]} (duplicate)")
            seen[key] = rel
        rep.samples += len(order)
    for rel in store.walk_files("shards"):
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
