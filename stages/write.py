"""Write stage: encoded samples -> one shard tar, published atomically, byte-reproducible.

The tar is assembled in plan order with fixed metadata (mtime 0, uid/gid 0, no user names), so
two builds of the same inputs produce byte-identical shards and a retried write yields the same
bytes as the first attempt. Publication goes through :meth:`Store.atomic_writer`: readers see
the whole shard or none; the ledger commit that follows is what makes it count.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

import webdataset as wds

from pipeline.storage import Store
from stages.contract import StageContract

CONTRACT = StageContract(
    name="write",
    inputs=("samples of one shard, in plan order",),
    outputs=("shards/<dataset>/<shard_id>.tar", "sha256", "index rows", "per-sample QC records", "per-stage counters"),
    runs_as="task (CPU)",
    acts_when="always (a shard whose clips all failed is written empty)",
    errors="storage errors fail the shard (retried by resume), never a clip; a clip that failed transiently "
    "(pipeline/failures.py) fails the shard too, which is re-run, never published without it",
)


def shard_bytes(samples: list[dict]) -> tuple[bytes, list[tuple[str, int]]]:
    """Tar bytes and (key, offset of the sample's first member) for every sample."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0, user="", group="", mode=0o444) as sink:
        for s in samples:
            sink.write(s)
    data = buf.getvalue()
    # TarWriter streams through a buffer, so offsets are read back from the member headers.
    first: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            first.setdefault(m.name.split(".", 1)[0], m.offset)
    return data, [(s["__key__"], first[s["__key__"]]) for s in samples]


def publish_shard(store: Store, rel: str, data: bytes) -> tuple[str, dict]:
    """Write atomically, read back, and return the sha256 of what is actually stored with the
    stored object's fingerprint. The fingerprint is taken before and after the read-back hash and
    must not change in between, so the two describe one object: another attempt of the shard
    publishing meanwhile is hashed again (and refused when its bytes differ), never recorded
    with this attempt's sha256 (resume trusts an unchanged fingerprint without hashing)."""
    store.write_bytes_atomic(rel, data)
    digest = hashlib.sha256(data).hexdigest()
    for _ in range(5):
        before = store.fingerprint_of(rel)
        stored = store.sha256(rel)
        after = store.fingerprint_of(rel)
        if before == after:
            break
    else:
        raise IOError(f"shard {rel}: the stored object kept changing while it was read back")
    if stored != digest:
        raise IOError(f"shard {rel}: stored bytes differ from written bytes (sha256 {stored} != {digest})")
    return digest, after


def software_stack() -> str:
    """The libraries shard bytes depend on (docs/FORMAT.md), for the per-shard log."""
    import platform

    import numpy as np
    import PIL
    from PIL import features

    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        blas = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - older numpy: no build record
        blas = "unknown"
    parts = [
        f"python {platform.python_version()}",
        f"numpy {np.__version__} ({blas})",
        f"Pillow {PIL.__version__} (zlib {features.version('zlib')}, libjpeg-turbo {features.version('libjpeg_turbo')})",
        f"cpu {platform.machine()}",
    ]
    import sys

    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


def write_shard(shard: dict, clips: list, cfg) -> dict:
    """Publish the shard's samples in plan order as one tar and report for the ledger.

    ``clips`` are the encode stage's results (:class:`~stages.encode.EncodedClip` or
    ``ClipFailure``, in plan order); a ``Clip`` is encoded here first (the same function)."""
    import socket
    import time

    from pipeline.clip import Clip, ClipFailure
    from stages.encode import encode_for_shard

    t0 = time.time()
    samples, failures, timings, meta_rows, qc_rows, stats = [], [], {}, {}, [], {}
    for item in clips:
        if isinstance(item, Clip):
            item = encode_for_shard(item, cfg.jpeg_quality, cfg.depth_png_level)
        for k, v in item.stats.items():
            stats[k] = stats.get(k, 0) + v
        if isinstance(item, ClipFailure):
            failures.append(item.to_json())
            continue
        for k, v in item.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        samples.append(item.sample)
        meta_rows[item.key] = (item.num_frames, item.dynamic)
        qc_rows.append(item.qc)
    transient = [f for f in failures if f.get("transient")]
    if transient:  # publish the shard whole later (a re-run, or resume), never without these clips
        from pipeline.failures import TransientShardError

        f = transient[0]
        raise TransientShardError(
            f"{len(transient)} clip(s) failed transiently; first {f['clip_id']} at {f['stage']}: {f['reason']}"
        )
    t1 = time.time()
    data, offsets = shard_bytes(samples)
    store = Store(cfg.output)
    sha, fingerprint = publish_shard(store, shard["path"], data)
    timings["write"] = time.time() - t1
    from manifests.stage_counts import stage_counts
    from pipeline.plan import stages_for

    counts = stage_counts(stages_for(cfg, shard["dataset"]), len(clips), failures, timings)
    log_lines = [
        f"shard {shard['shard_id']}: {len(samples)} samples, {len(failures)} failed clips, {len(data)} bytes",
        f"  written on {socket.gethostname()} with {software_stack()}",
    ]
    log_lines += [f"  stage {k}: {v:.3f} s" for k, v in sorted(timings.items())]
    log_lines += [f"  {k}: {v:g}" for k, v in sorted(stats.items())]
    log_lines += [
        f"  FAILED {f['clip_id']} at {f['stage']}: {f['reason']}" + (f" ({f['path']})" if f.get("path") else "")
        for f in failures
    ]
    return {
        "samples_written": len(samples),
        "clips_failed": failures,
        "bytes": len(data),
        "sha256": sha,
        "fingerprint": fingerprint,
        "samples": [[k, off, *meta_rows[k]] for k, off in offsets],
        "clip_qc": qc_rows,
        "timings": timings,
        "stage_counts": counts,
        "stats": stats,
        "started_at": t0,
        "finished_at": time.time(),
        "host": socket.gethostname(),
        "log": "\n".join(log_lines) + "\n",
    }
