"""`d4s status`, `report` and `verify` only read: the ledger once per command, Ray never imported, and
the per-stage counts come from the counters the write stage records in the ledger."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from manifests.store import ManifestStore
from pipeline.storage import Store

ROOT = Path(__file__).resolve().parents[1]


def _clip(key: str):
    from pipeline.clip import Clip, ClipMeta

    t, h, w = 2, 8, 8
    meta = ClipMeta("realestate10k", "s", key, [0, 1], False, True, depth_source="aligned", track_source="none")
    depth = np.full((t, h, w), 2.0, np.float32)
    clip = Clip(
        meta,
        np.zeros((t, h, w, 3), np.uint8),
        np.tile([8.0, 8.0, 4.0, 4.0], (t, 1)),
        np.tile(np.eye(4), (t, 1, 1)),
        depth,
        np.ones((t, h, w), bool),
    )
    clip.aux["timings"] = {"ingest": 0.5, "depth": 2.0, "align": 1.0}
    return clip


def _config(out: Path):
    from pipeline.config import BuildConfig

    return BuildConfig.model_validate(
        {
            "output": str(out),
            "shard_size": 5,
            "datasets": {"realestate10k": {"root": "/not/read", "depth_source": "vda_metric", "track_source": "none"}},
            "stages": {"depth": {"metric": True}},
        }
    ).resolved()


def _write_shard(out: Path):
    """One shard of 5 planned clips through the real write stage: 3 written, 1 failed at ingest, 1 at align."""
    from pipeline.clip import ClipFailure
    from stages.write import write_shard

    cfg = _config(out)
    ids = [f"realestate10k__s__{i:06d}" for i in range(5)]
    clips = [
        _clip(ids[0]),
        ClipFailure(ids[1], "ingest", "file is missing", "/d/x.png"),
        _clip(ids[2]),
        ClipFailure(ids[3], "align", "align QC: abs_rel 0.900 > 0.25; residual 0.400 > 0.15"),
        _clip(ids[4]),
    ]
    shard = {
        "shard_id": "realestate10k-000000",
        "dataset": "realestate10k",
        "path": "shards/realestate10k/realestate10k-000000.tar",
        "num_clips": 5,
        "clip_ids": ids,
    }
    return cfg, shard, ids, write_shard(shard, clips, cfg)


def test_write_result_carries_the_stage_counters(tmp_path):
    _, _, _, result = _write_shard(tmp_path / "out")
    c = result["stage_counts"]
    assert list(c) == ["ingest", "depth", "align", "encode", "write"]
    assert (c["ingest"]["in"], c["ingest"]["out"]) == (5, 4)
    assert c["ingest"]["dropped_by_reason"] == {"ingest: file is missing": 1}
    assert (c["depth"]["in"], c["depth"]["out"], c["depth"]["dropped_by_reason"]) == (4, 4, {})
    assert (c["align"]["in"], c["align"]["out"]) == (4, 3)
    assert c["align"]["dropped_by_reason"] == {"align QC: abs_rel": 1, "align QC: residual": 1}  # one clip, two checks
    assert (c["write"]["in"], c["write"]["out"]) == (3, 3)
    assert c["depth"]["seconds"] == 6.0 and c["ingest"]["seconds"] == 1.5  # summed over written clips


def _output(tmp_path: Path, done: bool = True, build_id: str = "b") -> Path:
    """A finished one-shard output (plan, recorded config, ledger) written without Ray; with
    ``done=False`` its shard is left "running" by ``build_id``."""
    from pipeline.config import OUTPUT_CONFIG_NAME

    out = tmp_path / "out"
    cfg, shard, ids, result = _write_shard(out)
    store = Store(str(out))
    store.write_bytes_atomic(OUTPUT_CONFIG_NAME, cfg.to_yaml().encode())
    ms = ManifestStore(store)
    ms.write_plan(
        [{"dataset": "realestate10k", "scene": "s", "num_frames": 10, "num_clips": 5, "note": ""}],
        [
            {
                "clip_id": c,
                "ordinal": i,
                "dataset": "realestate10k",
                "scene": "s",
                "start": i,
                "frames": [i, i + 1],
                "shard_id": shard["shard_id"],
            }
            for i, c in enumerate(ids)
        ],
        [shard],
    )
    ms.append_events([{"shard_id": shard["shard_id"], "state": "running", "build_id": build_id, "started_at": 1.0}])
    if not done:
        return out
    result.pop("log")
    ms.append_events([{"shard_id": shard["shard_id"], "state": "done", "build_id": build_id, **result}])
    ms.write_index(
        [
            {
                "key": k,
                "dataset": "realestate10k",
                "shard_id": shard["shard_id"],
                "shard_path": shard["path"],
                "offset": off,
                "num_frames": n,
                "dynamic": d,
            }
            for k, off, n, d in result["samples"]
        ]
    )
    return out


def test_status_reports_the_recorded_counters(tmp_path):
    from pipeline.status import collect_status

    st = collect_status(str(_output(tmp_path)))
    assert st["stages"]["realestate10k"]["ingest"] == {"done": 4, "failed": 1, "pending": 0, "skipped": 0}
    assert st["stages"]["realestate10k"]["align"] == {"done": 3, "failed": 1, "pending": 0, "skipped": 1}
    assert st["stages"]["realestate10k"]["write"] == {"done": 3, "failed": 0, "pending": 0, "skipped": 2}
    assert st["drops"]["realestate10k"] == {
        "align QC: abs_rel": 1,
        "align QC: residual": 1,
        "ingest: file is missing": 1,
    }
    assert st["stage_seconds"]["depth"] == 6.0
    assert st["datasets"]["realestate10k"] == {"clips_done": 3, "clips_failed": 2, "clips_pending": 0}


_PROBE = """
import json, sys
from typer.testing import CliRunner
from manifests.store import ManifestStore
from pipeline.cli import app

reads = []
real = ManifestStore.ledger_events
def counted(self, *a, **k):
    reads.append(1)
    return real(self, *a, **k)
ManifestStore.ledger_events = counted
out, counts = sys.argv[1], {}
for cmd in (["status", out, "--json"], ["status", out], ["report", out], ["verify", out]):
    reads.clear()
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code in (0, 1), (cmd, res.output)
    counts[" ".join(cmd[:1] + cmd[2:])] = len(reads)
print(json.dumps({"reads": counts, "ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))}))
"""


def test_read_only_commands_read_the_ledger_once_and_never_import_ray(tmp_path):
    out = _output(tmp_path)
    r = subprocess.run([sys.executable, "-c", _PROBE, str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    assert probe["reads"] == {"status --json": 1, "status": 1, "report": 1, "verify": 1}
    assert probe["ray"] == []
    assert (out / "report.html").is_file()


def test_status_shows_the_live_builds_shards_as_running(tmp_path):
    """A live build's shards were shown as pending, as if no driver were at work on them. Running
    means the ledger's "running" event is the build whose lease is live; a dead driver's is pending."""
    from manifests.lease import Lease
    from pipeline.status import collect_status

    out = _output(tmp_path, done=False, build_id="b")
    lease = Lease(Store(str(out)), owner="b", ttl_s=60)
    lease.acquire()
    st = collect_status(str(out))
    assert st["shards"] == {"done": 0, "failed": 0, "running": 1, "pending": 0}
    assert st["datasets"]["realestate10k"]["clips_pending"] == 5  # not done yet
    lease.release()  # the driver ended without finishing it: pending work for `d4s resume`
    assert collect_status(str(out))["shards"] == {"done": 0, "failed": 0, "running": 0, "pending": 1}
    other = Lease(Store(str(out)), owner="c", ttl_s=60)
    other.acquire()  # another build holds the output: "b"'s shard is not being worked on
    assert collect_status(str(out))["shards"]["running"] == 0
    other.release()


def test_status_and_report_of_an_output_whose_driver_died(tmp_path):
    """A driver killed mid-build (SIGKILL) left its lease unreleased: status said the lease was
    "held by" it and gave an ETA "for what is pending", report.html too, though nothing was at
    work. Now the lease is named as left by a driver that is gone, and the build as stopped."""
    from typer.testing import CliRunner

    from manifests.lease import LEASE_PATH, Lease
    from pipeline.cli import app

    out = _output(tmp_path, build_id="b")  # one shard done by build "b"
    store = Store(str(out))
    ms = ManifestStore(store)
    (shard,) = ms.shards()
    extra = {**shard, "shard_id": "more-000001", "path": shard["path"].replace(".tar", "-1.tar")}
    extra["clip_ids"] = [c + "x" for c in shard["clip_ids"]]
    clips = ms.clips() + [{**c, "clip_id": c["clip_id"] + "x", "shard_id": "more-000001"} for c in ms.clips()]
    ms.write_plan(ms.scenes(), clips, [shard, extra])  # a second shard, never started: pending clips
    ms.append_events([{"shard_id": "more-000001", "state": "running", "build_id": "b", "started_at": 2.0}])
    lease = Lease(store, owner="b", ttl_s=3600)
    lease.acquire()
    live = CliRunner().invoke(app, ["status", str(out)]).output
    assert "lease: held by" in live and "ETA" in live, live
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    data, version = store.read_versioned(LEASE_PATH)
    rec = json.loads(data)
    rec["pid"], rec["pid_start"] = dead.pid, ""  # as if the driver holding it had been killed
    assert store.replace_if_version(LEASE_PATH, json.dumps(rec).encode(), version)

    r = CliRunner().invoke(app, ["status", str(out)])
    assert r.exit_code == 0, r.output
    assert "held by" not in r.output and "ETA" not in r.output, r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("lease:")]
    assert "left by" in line and "is gone" in line and "d4s resume" in line, line
    assert "stopped" in r.output and "5 clips pending" in r.output, r.output
    st = json.loads(CliRunner().invoke(app, ["status", str(out), "--json"]).output)
    assert st["lease"]["stale"] and st["throughput"]["eta_s"] is None and st["throughput"]["stopped"]
    r = CliRunner().invoke(app, ["report", str(out)])
    html = (out / "report.html").read_text()
    assert "ETA" not in html and "stopped" in html


def test_verify_names_a_shard_left_running_by_a_driver_that_is_gone(tmp_path):
    from pipeline.verify import verify

    out = _output(tmp_path, done=False, build_id="b")  # no lease: no driver holds the output
    (problem,) = verify(str(out)).problems
    assert "shard not done" in problem and "driver stopped" in problem and "d4s resume" in problem, problem


def test_status_report_and_verify_write_nothing_into_the_output(tmp_path, monkeypatch):
    """Judging whether a lease left unreleased is still held wrote a clock probe into the output
    (the store's clock): on a read-only copy, or without write access, status of such an output
    failed. The read-only commands now judge the lease's age on this host's clock, and write
    nothing but the report they are asked for."""
    from typer.testing import CliRunner

    from manifests.lease import Lease
    from pipeline.cli import app

    out = _output(tmp_path, done=False, build_id="b")
    Lease(Store(str(out)), owner="b", ttl_s=3600, same_host_shortcut=False).acquire()  # a live-looking lease
    writes = []
    real = Store.write_bytes_atomic

    def refuse(self, rel, data):
        if not rel.endswith("report.html"):
            writes.append(rel)
            raise PermissionError(13, "Permission denied", rel)
        return real(self, rel, data)

    monkeypatch.setattr(Store, "write_bytes_atomic", refuse)
    for cmd in (["status", str(out)], ["status", str(out), "--json"], ["report", str(out)], ["verify", str(out)]):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code in (0, 1) and "ermission" not in r.output, (cmd, r.output[-2000:])
    assert writes == []
