"""Driver-side cost over a large finished output: ``d4s verify``, the training loader's
start-up (``training.data.resolve_catalog``), the ledger read of a resume's start-up and the
index a build ends with (``write_index``) on a synthetic output of N shards.

The output is written through the project's own manifest API (plan tables, ledger events,
index.parquet) with real tar shards of ``--samples`` samples each (``--kib`` KiB of random bytes
per frame, 16 frames), so both commands do their real work. Run it with two checkouts on
PYTHONPATH to compare them side by side, e.g.::

    PYTHONPATH=/tmp/old python bench/bench_output_scale.py --shards 400 --kib 64
    PYTHONPATH=.        python bench/bench_output_scale.py --shards 400 --kib 64

Prints one line per measurement (and where the modules were imported from).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import resource
import shutil
import tarfile
import tempfile
import time


def make_output(out: str, n: int, samples: int, kib: int, tars: bool = True) -> None:
    from manifests.store import ManifestStore
    from pipeline.plan import Plan
    from pipeline.runner import write_index
    from pipeline.storage import Store

    store = Store(out)
    ms = ManifestStore(store)
    scenes, clips, shards = [], [], []
    for i in range(n):
        sid = f"stereo4d-{i:06d}"
        ids = []
        for j in range(samples):
            scene = f"train/v{i:06d}_{j // 2}"
            cid = f"stereo4d__train-v{i:06d}_{j // 2}__{(j % 2) * 16:06d}"
            if j % 2 == 0:
                scenes.append({"dataset": "stereo4d", "scene": scene, "num_frames": 32, "num_clips": 2, "note": ""})
            clips.append(
                {
                    "clip_id": cid,
                    "ordinal": len(clips),
                    "dataset": "stereo4d",
                    "scene": scene,
                    "start": (j % 2) * 16,
                    "frames": list(range((j % 2) * 16, (j % 2) * 16 + 16)),
                    "shard_id": sid,
                }
            )
            ids.append(cid)
        shards.append(
            {
                "shard_id": sid,
                "dataset": "stereo4d",
                "path": f"shards/stereo4d/{sid}.tar",
                "num_clips": samples,
                "clip_ids": ids,
            }
        )
    ms.write_plan(scenes, clips, shards)
    frame = os.urandom(kib * 1024 if tars else 1)
    events = []
    for sh in shards:
        buf = io.BytesIO()
        offsets = []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for cid in sh["clip_ids"]:
                offsets.append([cid, buf.tell(), 16, True])
                names = ["intrinsics.npy", "c2w.npy", "meta.json"] + [f"rgb.{k:03d}.jpg" for k in range(16)]
                for m in names:
                    data = frame if m.endswith(".jpg") else b"x" * 128
                    ti = tarfile.TarInfo(f"{cid}.{m}")
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
        data = buf.getvalue()
        if tars:
            store.write_bytes_atomic(sh["path"], data)
        events.append(
            {
                "shard_id": sh["shard_id"],
                "state": "done",
                "samples_written": len(offsets),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "samples": offsets,
                "clip_qc": [_qc_record(cid) for cid, *_ in offsets],  # as large as a real build's
                "stage_counts": {
                    st: {"in": samples, "out": samples, "dropped_by_reason": {}, "seconds": 1.5}
                    for st in ("ingest", "depth", "align", "tracks", "encode", "write")
                },
                "timings": {st: 1.5 for st in ("ingest", "depth", "align", "tracks", "encode", "write")},
                "build_id": "bench",
            }
        )
    for k in range(0, len(events), 256):
        ms.append_events(events[k : k + 256])
    write_index(ms, Plan(scenes, clips, shards), {})


def _qc_record(key: str) -> dict:
    """A ledger QC record with every field a real sample's has (manifests/clip_qc.py)."""
    from manifests.clip_qc import ALIGN_FIELDS, GT_TRACK_FIELDS, SELFCHECK_FIELDS, TRACK_FIELDS

    return {
        "key": key,
        "dataset": "stereo4d",
        "frames": 16,
        "bytes": 1_234_567,
        "depth_source": "model",
        "depth_p5_m": 0.8123456789,
        "depth_median_m": 3.123456789,
        "depth_p95_m": 12.3456789,
        "valid_depth_fraction": 0.987654321,
        "align": {**{k: 0.123456789 for k in ALIGN_FIELDS}, "reference": "megasam"},
        "tracks": {k: 0.123456789 for k in TRACK_FIELDS},
        "selfcheck": {k: 0.987654321 for k in SELFCHECK_FIELDS},
        "gt_tracks": {k: 3.0 for k in GT_TRACK_FIELDS},
    }


def time_ledger(out: str, n: int) -> None:
    """The ledger as a resume reads it at start-up, and the index a build ends with."""
    from manifests.store import ManifestStore
    from pipeline.plan import Plan
    from pipeline.runner import write_index
    from pipeline.storage import Store

    ms = ManifestStore(Store(out))
    t = time.perf_counter()
    ms.ledger()
    print(f"ledger read, every column: {n} shards in {time.perf_counter() - t:.2f} s", flush=True)
    try:
        t = time.perf_counter()
        ms.ledger(columns=("sha256", "fingerprint", "bytes"))
        print(f"ledger read, a resume's columns: {n} shards in {time.perf_counter() - t:.2f} s", flush=True)
    except TypeError:
        print("ledger read, a resume's columns: (this checkout reads every column)", flush=True)
    plan = Plan(ms.scenes(), ms.clips(), ms.shards())
    t = time.perf_counter()
    write_index(ms, plan, {})
    print(f"write_index: {n} shards in {time.perf_counter() - t:.2f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, nargs="+", default=[400])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--kib", type=int, default=64, help="KiB per frame (16 frames per sample)")
    p.add_argument(
        "--catalog-only", action="store_true", help="no shard files: time the loader's start-up and the ledger only"
    )
    p.add_argument("--work", default=None, help="folder for the synthetic outputs (default: a temporary one)")
    a = p.parse_args()

    import training.data
    from pipeline import verify as verify_mod
    from training.config import DataConfig

    print(f"modules: {os.path.dirname(os.path.dirname(verify_mod.__file__))}", flush=True)
    work = a.work or tempfile.mkdtemp(prefix="d4s-bench-scale-")
    for n in a.shards:
        out = os.path.join(work, f"out-{n}")
        if not os.path.exists(os.path.join(out, "index.parquet")):
            shutil.rmtree(out, ignore_errors=True)
            make_output(out, n, a.samples, a.kib, tars=not a.catalog_only)
        t = time.perf_counter()
        cat = training.data.resolve_catalog(DataConfig(root=out))
        dt = time.perf_counter() - t
        print(f"resolve_catalog: {n} shards, {sum(cat.counts.values())} samples in {dt:.2f} s", flush=True)
        time_ledger(out, n)
        if a.catalog_only:
            continue
        total = sum(
            os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(out, "shards")) for f in fs
        )
        for f in [os.path.join(r, x) for r, _, xs in os.walk(os.path.join(out, "shards")) for x in xs]:
            with open(f, "rb") as fh:  # warm the page cache alike for both runs
                while fh.read(1 << 22):
                    pass
        t = time.perf_counter()
        rep = verify_mod.verify(out)
        dt = time.perf_counter() - t
        print(
            f"verify: {n} shards, {total / 2**20:.0f} MiB: ok={rep.ok} in {dt:.2f} s "
            f"({total / 2**20 / dt:.0f} MiB/s, page cache warm)",
            flush=True,
        )
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
