"""The d4s command line: config errors, status --json, inspect."""

from __future__ import annotations

import json

from conftest import tartanair_config, write_tartanair
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_config_errors_exit_nonzero_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: /tmp/x\ndatasets:\n  nosuchset: {root: /tmp}\n")
    r = runner.invoke(app, ["build", str(bad)])
    assert r.exit_code == 2
    assert "unknown dataset" in r.output and "nosuchset" in r.output
    r = runner.invoke(app, ["build", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "config file not found" in r.output
    bad.write_text("output: /tmp/x\nshard_size: -1\ndatasets:\n  tartanair: {root: /tmp}\n")
    r = runner.invoke(app, ["build", str(bad)])
    assert r.exit_code == 2 and "shard_size" in r.output
    r = runner.invoke(app, ["status", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no plan recorded" in r.output
    # verify exited 1, the code of a failed verification, on a folder that is no output at all
    r = runner.invoke(app, ["verify", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no plan recorded" in r.output


def test_empty_root_is_a_config_error(tmp_path):
    cfg = tartanair_config(tmp_path, tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    r = runner.invoke(app, ["build", str(p)])
    assert r.exit_code == 2 and "no scenes found" in r.output


def test_status_json_and_verify_after_build(tmp_path, ray_local):
    data = tmp_path / "data"
    write_tartanair(data, n_scenes=1, frames=7)
    cfg = tartanair_config(tmp_path, data)
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    r = runner.invoke(app, ["build", str(p), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["status", str(tmp_path / "out"), "--json"])
    st = json.loads(r.stdout)
    assert st["datasets"]["tartanair"] == {"clips_done": 2, "clips_failed": 0, "clips_pending": 0}
    assert st["shards"] == {"done": 1, "failed": 0, "running": 0, "pending": 0}
    # tartanair with ground-truth depth and no tracks: no depth/align/tracks stages
    assert list(st["stages"]["tartanair"]) == ["ingest", "encode", "write"]
    assert st["stages"]["tartanair"]["write"] == {"done": 2, "failed": 0, "pending": 0, "skipped": 0}
    assert st["throughput"]["clips"] == 2 and st["throughput"]["clips_per_s"] > 0 and st["throughput"]["eta_s"] == 0
    depth = st["qc"]["tartanair"]["depth median (m)"]
    assert depth["n"] == 2 and 0 < depth["p5"] <= depth["p50"] <= depth["p95"]
    r = runner.invoke(app, ["status", str(tmp_path / "out")])
    assert r.exit_code == 0 and "clips/s" in r.stdout and "QC distributions" in r.stdout and "encode" in r.stdout
    r = runner.invoke(app, ["verify", str(tmp_path / "out")])
    assert r.exit_code == 0 and "verify OK" in r.stdout
    _damaged_outputs_are_one_line_errors(tmp_path, tmp_path / "out")
    _failures_print_as_written(tmp_path / "out")
    _a_dataset_without_clips_is_reported_with_why(tmp_path / "out")


def test_inspect_reports_scene_and_problems(tmp_path):
    data = tmp_path / "data"
    ((r, ws),) = write_tartanair(data, n_scenes=1, frames=6)
    scene = data / ws.scene_id
    res = runner.invoke(app, ["inspect", "tartanair", str(scene), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["num_frames"] == 6 and rep["image_size"] == [32, 24] and rep["problems"] == []
    assert len(rep["c2w"]) == 6 and len(rep["intrinsics"][0]) == 4 and rep["has_depth"]
    (scene / "image_left" / "000003_left.png").write_bytes(b"\x89PNG broken")
    res = runner.invoke(app, ["inspect", "tartanair", str(scene), "--json"])
    rep = json.loads(res.stdout)
    assert res.exit_code == 1 and len(rep["problems"]) == 1 and "000003_left.png" in rep["problems"][0]
    assert rep["frames_read"] == 5


def _damaged_outputs_are_one_line_errors(tmp_path, out):
    """A damaged or foreign output: status, verify, report and resume say which file and why in
    one line (exit 2), never a traceback (they raised pyarrow's, json's and yaml's errors)."""
    import shutil

    def damaged(name, rel, data):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        target = copy / rel if rel else sorted((copy / "manifests" / "ledger").glob("*.parquet"))[0]
        target.write_bytes(data(target.read_bytes()))
        return copy, target.name

    cases = [
        (damaged("ledger", None, lambda b: b[: len(b) // 2]), ("status", "verify", "report", "resume")),
        (damaged("plan", "manifests/shards.parquet", lambda b: b"junk"), ("status", "verify", "report")),
        (damaged("lease", "manifests/lease.json", lambda b: b"{oops"), ("status", "resume")),
        (damaged("yaml", "config.resolved.yaml", lambda b: b"datasets: [a: b"), ("status", "resume")),
        (damaged("newer", "config.resolved.yaml", lambda b: b + b"format_version: 99\n"), ("status", "resume")),
    ]
    for (copy, name), commands in cases:
        for cmd in commands:
            r = runner.invoke(app, [cmd, str(copy)] + (["--no-progress"] if cmd == "resume" else []))
            assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (cmd, name, r.output, r.exception)
            assert "error:" in r.output and name in r.output.replace("\n", ""), (cmd, name, r.output)


def _failures_print_as_written(out):
    """Failure reasons and paths are data, not Rich markup: a path starting with '/' read as a
    closing tag crashed `d4s status` and the end of `d4s build` (MarkupError, exit 1) after the
    build had finished, and no reason was shown."""
    from manifests.store import ManifestStore
    from pipeline.cli import _print_summary
    from pipeline.runner import BuildSummary
    from pipeline.storage import Store

    failure = {"clip_id": "c1", "stage": "ingest", "reason": "bad [/bold] header", "path": "/data/x/depth.npy"}
    ms = ManifestStore(Store(str(out)))
    sh = ms.shards()[0]
    done = ms.ledger()[sh["shard_id"]]
    ms.append_events([{**done, "clips_failed": done["clips_failed"] + [failure]}])
    r = runner.invoke(app, ["status", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "bad [/bold] header" in r.output and "[/data/x/depth.npy]" in r.output
    _print_summary(BuildSummary(str(out), 1, 1, 0, 0, 1, 1, 1.0, [failure]))  # raised MarkupError


def _a_dataset_without_clips_is_reported_with_why(out):
    """A dataset whose scenes give no clip (all too short) vanished from status and the report
    (which then said "No dataset planned." for a build of only such a dataset)."""
    from manifests.store import ManifestStore
    from pipeline.report import write_report
    from pipeline.status import collect_status
    from pipeline.storage import Store

    ms = ManifestStore(Store(str(out)))
    note = "only 10 frames, a clip needs 1000"
    extra = [
        {"dataset": "vkitti2", "scene": f"Scene0{i}/clone", "num_frames": 10, "num_clips": 0, "note": note}
        for i in (1, 2)
    ]
    ms.write_plan(ms.scenes() + extra, ms.clips(), ms.shards())
    st = collect_status(str(out))
    assert st["datasets"]["vkitti2"] == {"clips_done": 0, "clips_failed": 0, "clips_pending": 0}
    assert st["no_clips"]["vkitti2"] == f"2 scenes gave no clip: {note}"
    r = runner.invoke(app, ["status", str(out)])
    assert r.exit_code == 0 and "vkitti2" in r.output and note in r.output.replace("\n", " "), r.output
    html = open(write_report(str(out), gallery_clips=0)).read()
    assert "vkitti2" in html and note in html


def test_an_address_where_no_ray_answers_is_one_line(tmp_path):
    """`--address 127.0.0.1:1` (nothing listening) made ray.init retry forever, deaf to Ctrl-C, with
    the lease held; it is now refused in one line before the lease is taken."""
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    write_tartanair(data)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tartanair_config(tmp_path, data).to_yaml())
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "build", str(cfg), "--no-progress", "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out" / "manifests" / "lease.json").exists()


def test_inspect_a_root_reads_every_scene_and_takes_the_configs_options(tmp_path):
    """A dataset root holding several scenes was reported through its first scene only (exit 0 with
    a damaged second scene); each scene now has its report. --config takes the dataset's adapter
    options from a build config (the demo's Stereo4D data needed one the command could not pass)."""
    data = tmp_path / "data"
    written = write_tartanair(data, n_scenes=2, frames=6)
    second = data / written[1][1].scene_id
    (second / "image_left" / "000002_left.png").write_bytes(b"\x89PNG broken")
    res = runner.invoke(app, ["inspect", "tartanair", str(data), "--json"])
    reps = json.loads(res.stdout)
    assert res.exit_code == 1 and [len(r["problems"]) for r in reps] == [0, 1], res.output
    assert reps[1]["scene"] == written[1][1].scene_id and "000002_left.png" in reps[1]["problems"][0]
    res = runner.invoke(app, ["inspect", "tartanair", str(data), "--max-scenes", "1"])
    assert res.exit_code == 0 and "1 more scene" in res.output, res.output
    assert reps[0]["valid_depth_fraction"] > 0.9
    cfg = tmp_path / "c.yaml"  # the config's depth range reaches the adapter: no demo depth lies in 0.1-0.2 m
    cfg.write_text(
        f"output: {tmp_path}/o\ndatasets:\n  tartanair: {{root: {data}, min_depth_m: 0.1, max_depth_m: 0.2}}\n"
    )
    res = runner.invoke(
        app, ["inspect", "tartanair", str(data / written[0][1].scene_id), "--config", str(cfg), "--json"]
    )
    assert json.loads(res.stdout)["valid_depth_fraction"] == 0.0, res.output


def test_a_full_disk_under_the_driver_is_one_line_and_a_shard_log_does_not_stop_the_build(tmp_path, ray_local):
    """A full disk when the driver wrote the ledger, the index or the lease ended in a ~50-line
    traceback; writing a shard's log (information only) aborted the build before the shard was
    recorded done, so the finished shard was built again. Now: one line naming the file, exit 5,
    and a shard log that cannot be written is a warning."""
    import errno

    from pipeline.verify import verify

    data = tmp_path / "data"
    write_tartanair(data, n_scenes=1, frames=8)
    cfg = tartanair_config(tmp_path, data)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    import os

    import pytest

    real = os.replace
    target = {"part": "/logs/"}

    def full(src, dst, *a, **k):  # the publishing rename of an atomic write, in this (the driver's) process
        if target["part"] in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "replace", full)
    try:
        r = runner.invoke(app, ["build", str(tmp_path / "c.yaml"), "--no-progress"])
        assert r.exit_code == 0, r.output
        assert verify(str(tmp_path / "out")).ok
        target["part"] = "/index.parquet"
        r = runner.invoke(app, ["resume", str(tmp_path / "out"), "--no-progress"])
    finally:
        mp.undo()
    text = r.output.strip()
    assert r.exit_code == 5, r.output
    assert "Traceback" not in text and "index.parquet" in text and "No space left" in text and "d4s resume" in text
    r = runner.invoke(app, ["resume", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert verify(str(tmp_path / "out")).ok
