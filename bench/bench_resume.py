"""Resume start-up on a large output on S3: how long until a resume knows what is left to build.

Usage: python bench/bench_resume.py --shards 10000 [--shard-kib 64] [--old-sample 1000] [--out DIR]

Writes a synthetic finished output of ``--shards`` one-clip shards to an S3 server (moto's
server mode on loopback, started here, as in the tests): the plan manifests, one object of
``--shard-kib`` KiB per shard, and a compacted ledger with a ``done`` event per shard (sha256,
size and the object's fingerprint, as a build records them), 1 % of them left ``running`` as a
killed driver leaves them. Then it times what a resume does before it starts Ray, with the code
``d4s resume`` runs:

* ``lease``: take the output's lease (``manifests/lease.py``);
* ``ledger``: read the ledger;
* ``settle``: decide which shards are done and intact (``pipeline.runner.settle_done_shards``: one
  listing of ``shards/``, fingerprints compared, nothing read) and find stray temporaries;
* ``full check``: the same with every shard hashed, 16 at a time (``d4s resume --full-check``);
* ``old serial check``: what resume did before: for each done shard, an existence check and a
  full read to hash it, one after the other; timed on ``--old-sample`` shards and scaled up.

Planning (listing the datasets) and Ray's start are the same as for a fresh build and not part of
this figure. Writes ``bench_resume.json`` and ``bench_resume.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _synthetic_output(store, n: int, kib: int) -> tuple[list[dict], float]:
    """Plan, shard objects and a compacted ledger of a finished build of ``n`` shards."""
    import pyarrow as pa

    from manifests.schemas import LEDGER_SCHEMA
    from manifests.store import EPOCH_SHIFT, LEDGER_DIR, ManifestStore, _to_bytes

    t0 = time.time()
    ms = ManifestStore(store)
    shards = [
        {
            "shard_id": f"synth-{i:06d}",
            "dataset": "synth",
            "path": f"shards/synth/synth-{i:06d}.tar",
            "num_clips": 1,
            "clip_ids": [f"synth__s__{i:06d}"],
        }
        for i in range(n)
    ]
    clips = [
        {
            "clip_id": sh["clip_ids"][0],
            "ordinal": i,
            "dataset": "synth",
            "scene": "s",
            "start": i,
            "frames": [i],
            "shard_id": sh["shard_id"],
        }
        for i, sh in enumerate(shards)
    ]
    ms.write_plan([{"dataset": "synth", "scene": "s", "num_frames": n, "num_clips": n, "note": None}], clips, shards)
    payload = {}
    for sh in shards:
        body = hashlib.sha256(sh["shard_id"].encode()).digest() * (kib * 32)  # kib KiB, distinct per shard
        payload[store.path(sh["path"])] = body
    for start in range(0, n, 500):  # concurrent PUTs, 500 at a time
        keys = list(payload)[start : start + 500]
        store.fs.pipe({k: payload[k] for k in keys})
    listing = store.files_detail("shards")
    rows = []
    seq = 1 << EPOCH_SHIFT
    for i, sh in enumerate(shards):
        body = payload[store.path(sh["path"])]
        seq += 1
        rows.append(
            {
                "seq": seq,
                "shard_id": sh["shard_id"],
                "state": "running",
                "attempt": 1,
                "build_id": "bench",
                "clips_failed": "[]",
                "timings": "{}",
                "samples": "[]",
                "clip_qc": "[]",
            }
        )
        if i % 100 == 99:
            continue  # 1 %: left running by a killed driver
        seq += 1
        rows.append(
            {
                "seq": seq,
                "shard_id": sh["shard_id"],
                "state": "done",
                "attempt": 1,
                "build_id": "bench",
                "samples_written": 1,
                "bytes": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "fingerprint": store.fingerprint(listing[sh["path"]]),
                "clips_failed": "[]",
                "timings": "{}",
                "samples": json.dumps([[sh["clip_ids"][0], 0, 1, False]]),
                "clip_qc": "[]",
            }
        )
    table = pa.Table.from_pylist(rows, LEDGER_SCHEMA)
    store.write_bytes_atomic(f"{LEDGER_DIR}/compacted-{seq:020d}-00000000.parquet", _to_bytes(table))
    return shards, time.time() - t0


def _old_serial_check(store, shards: list[dict], ledger: dict) -> int:
    """Resume's check before this change: exists + full sha256, shard after shard."""
    ok = 0
    for sh in shards:
        ev = ledger.get(sh["shard_id"])
        if (
            ev
            and ev["state"] == "done"
            and ev["sha256"]
            and store.exists(sh["path"])
            and store.sha256(sh["path"]) == ev["sha256"]
        ):
            ok += 1
    return ok


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=10000)
    ap.add_argument("--shard-kib", type=int, default=64)
    ap.add_argument("--old-sample", type=int, default=1000, help="shards the old serial check is timed on")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="d4s-bench-resume-"))
    out.mkdir(parents=True, exist_ok=True)

    from s3_server import LocalS3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    srv = LocalS3(bucket="d4s-bench").start()
    srv.create_bucket()
    srv.apply_env()
    try:
        from manifests.lease import Lease
        from manifests.store import ManifestStore
        from pipeline.runner import settle_done_shards
        from pipeline.storage import Store

        store = Store(srv.url("out"))
        shards, make_s = _synthetic_output(store, args.shards, args.shard_kib)
        print(f"synthetic output: {args.shards} shards of {args.shard_kib} KiB in {make_s:.1f} s", flush=True)
        t = {}
        t0 = time.perf_counter()
        ms = ManifestStore(store)
        lease = Lease(store, command="resume", ttl_s=300)
        lease.acquire(min_epoch=ms.max_epoch())
        t["lease"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ledger = ms.ledger()
        t["ledger"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        done, strays = settle_done_shards(store, shards, ledger)
        t["settle"] = time.perf_counter() - t0
        expected_done = sum(1 for e in ledger.values() if e["state"] == "done")
        assert len(done) == expected_done and not strays, (len(done), expected_done, strays)
        t0 = time.perf_counter()
        done_full, _ = settle_done_shards(store, shards, ledger, full_check=True)
        t["full_check"] = time.perf_counter() - t0
        assert done_full == done
        sample = shards[: args.old_sample]
        t0 = time.perf_counter()
        _old_serial_check(store, sample, ledger)
        old_sample_s = time.perf_counter() - t0
        t["old_serial_check_scaled"] = old_sample_s * len(shards) / len(sample)
        lease.release()
    finally:
        srv.stop()
        srv.restore_env()
    new_total = t["lease"] + t["ledger"] + t["settle"]
    res = {
        "command": f"python bench/bench_resume.py --shards {args.shards} --shard-kib {args.shard_kib} --old-sample {args.old_sample}",
        "shards": args.shards,
        "shard_kib": args.shard_kib,
        "done": len(done),
        "seconds": {k: round(v, 2) for k, v in t.items()},
        "resume_start_s": round(new_total, 2),
        "old_sample": len(sample),
        "old_sample_s": round(old_sample_s, 2),
        "cpus": os.cpu_count(),
    }
    md = (
        "\n".join(
            [
                "| step | seconds |",
                "|---|---|",
                f"| lease | {t['lease']:.2f} |",
                f"| ledger read ({args.shards * 2 - args.shards // 100} events) | {t['ledger']:.2f} |",
                f"| settle: one listing, fingerprints compared, {len(done)} shards trusted | {t['settle']:.2f} |",
                f"| **resume start-up (lease + ledger + settle)** | **{new_total:.2f}** |",
                f"| full check: every shard hashed, 16 at a time (`--full-check`) | {t['full_check']:.2f} |",
                f"| old serial check (exists + hash per shard), {len(sample)} shards timed, scaled to {args.shards} | "
                f"{t['old_serial_check_scaled']:.1f} |",
            ]
        )
        + "\n"
    )
    (out / "bench_resume.json").write_text(json.dumps(res, indent=1))
    (out / "bench_resume.md").write_text(md)
    print(md)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
