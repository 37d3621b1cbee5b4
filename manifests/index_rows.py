"""The rows of ``index.parquet``: every written sample's key -> dataset, shard, the shard's sha256,
the sample's byte offset, frame count, static/dynamic flag, scene and split.

They follow from the ledger (each done shard's ``samples``, ``sha256`` and ``fingerprint``) and the plan (each
clip's scene; the split by scene, :mod:`pipeline.split`). A build writes them when it ends; the
training loader computes the same rows itself from an output that has none (its driver stopped
before writing the index), so that held-out scenes stay held out either way.
"""

from __future__ import annotations

from manifests.store import ManifestStore
from pipeline.split import TRAIN, split_of_clips

#: the ledger columns the rows are made from
LEDGER_COLUMNS = ("samples", "sha256", "fingerprint")


def index_rows(
    ledger: dict[str, dict], clips: list[dict], shards: list[dict], val_fractions: dict[str, float]
) -> list[dict]:
    """``ledger``: the current state per shard (``ManifestStore.ledger``, with ``LEDGER_COLUMNS``);
    ``clips`` / ``shards``: the plan's. Rows in plan order of the shards, file order within each."""
    split = split_of_clips(clips, val_fractions)
    scene = {c["clip_id"]: c["scene"] for c in clips}
    rows = []
    for sh in shards:
        ev = ledger.get(sh["shard_id"])
        if not ev or ev["state"] != "done":
            continue
        for key, offset, num_frames, dynamic in ev["samples"]:
            rows.append(
                {
                    "key": key,
                    "dataset": sh["dataset"],
                    "shard_id": sh["shard_id"],
                    "shard_path": sh["path"],
                    "shard_sha256": ev.get("sha256"),
                    "shard_fingerprint": ev.get("fingerprint"),
                    "offset": offset,
                    "num_frames": num_frames,
                    "dynamic": dynamic,
                    "scene": scene.get(key, ""),
                    "split": split.get(key, TRAIN),
                }
            )
    return rows


def output_index_rows(ms: ManifestStore, val_fractions: dict[str, float]) -> list[dict]:
    """:func:`index_rows` of the output ``ms`` holds, from its recorded plan and ledger."""
    return index_rows(ms.ledger(columns=LEDGER_COLUMNS), ms.clips(), ms.shards(), val_fractions)
