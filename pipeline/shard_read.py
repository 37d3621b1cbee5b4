"""Reading single clips back from a build's shards, by key, with one seek each.

A done shard's ledger event lists every sample it holds with the byte offset of the sample's
first tar member (docs/MANIFESTS.md), so one clip is read by seeking there (a ranged read on an
object store) and taking the members that carry its key, never by scanning the whole tar. The
bytes are decoded by :func:`pipeline.sample_format.decode_sample`, the one decoder of the format.
Used by the report's gallery (:mod:`pipeline.gallery`) and by ``d4s show`` (:mod:`pipeline.show`).
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import numpy as np

from pipeline.storage import Store


class SampleReadError(IOError):
    """A sample could not be read back; the message names the shard and the reason."""


@dataclass(frozen=True)
class SampleLocation:
    """Where one written clip is: its shard (path relative to the output) and byte offset."""

    key: str
    dataset: str
    shard_id: str
    shard_path: str
    offset: int
    num_frames: int


def written_samples(shards: list[dict], events: list[dict]) -> dict[str, SampleLocation]:
    """Every sample of every shard whose latest ledger event is ``done``, by key, in plan order.

    ``shards`` are the plan's rows (``ManifestStore.shards()``), ``events`` the ledger's events in
    ``seq`` order (``ManifestStore.ledger_events()``). A shard that is running, failed or pending
    contributes nothing: only what a reader of the output can rely on is listed.
    """
    latest: dict[str, dict] = {}
    for e in events:
        latest[e["shard_id"]] = e
    out: dict[str, SampleLocation] = {}
    for sh in shards:
        ev = latest.get(sh["shard_id"])
        if not ev or ev["state"] != "done":
            continue
        for key, offset, num_frames, _dynamic in ev.get("samples") or []:
            out[key] = SampleLocation(key, sh["dataset"], sh["shard_id"], sh["path"], int(offset), int(num_frames))
    return out


def failed_clips(events: list[dict]) -> dict[str, dict]:
    """Clips the latest event of their shard records as failed: ``{clip_id: {stage, reason, path}}``."""
    latest: dict[str, dict] = {}
    for e in events:
        latest[e["shard_id"]] = e
    out: dict[str, dict] = {}
    for ev in latest.values():
        if ev["state"] == "done":
            for f in ev.get("clips_failed") or []:
                out[f["clip_id"]] = f
    return out


def read_sample(store: Store, loc: SampleLocation) -> dict:
    """The raw WebDataset sample (``{"__key__": key, entry: bytes}``) of one clip.

    Raises :class:`SampleReadError` naming the shard when the file is missing or its bytes at
    the recorded offset are not that sample's tar members.
    """
    where = store.display(loc.shard_path)
    sample: dict = {"__key__": loc.key}
    try:
        # one sample at its offset: a small read-ahead (s3fs's default fetched up to 50 MiB past it)
        with store.open(loc.shard_path, "rb", block_size=1 << 20) as f:
            f.seek(loc.offset)
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    key, _, entry = member.name.partition(".")
                    if key != loc.key:
                        break
                    if member.isfile():
                        sample[entry] = tar.extractfile(member).read()
    except FileNotFoundError as exc:
        raise SampleReadError(f"{where}: shard missing ({exc})") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SampleReadError(f"{where}: unreadable at byte {loc.offset} ({type(exc).__name__}: {exc})") from exc
    if len(sample) == 1:
        raise SampleReadError(f"{where}: no member of sample {loc.key} at byte {loc.offset}")
    if "meta.json" not in sample:
        raise SampleReadError(f"{where}: sample {loc.key} has no meta.json (entries {sorted(sample)[1:6]})")
    return sample


def load_array(sample: dict, entry: str) -> np.ndarray:
    """One ``.npy`` entry of a raw sample, never unpickled (as :mod:`pipeline.sample_format` reads them)."""
    return np.load(io.BytesIO(sample[entry]), allow_pickle=False)
