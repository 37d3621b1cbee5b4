"""Exactly-once across drivers and runs: a second driver is refused (and touches nothing), a changed
config is refused unless a new output version is asked for, run-time overrides never rewrite the
recorded config, transient failures are retried and left for resume (never recorded as lost
clips), and a resume trusts the ledger's checksums, hashing only the shards whose stored object
changed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import webdataset as wds
from conftest import tartanair_config
from test_build import all_keys, planned_ids, shard_files

from manifests.lease import Lease, LeaseHeldError
from manifests.store import ManifestStore
from pipeline.config import ConfigError
from pipeline.runner import CONFIG_NAME, build, resume
from pipeline.status import collect_status
from pipeline.storage import Store
from pipeline.verify import verify


def test_second_driver_is_refused_while_a_build_runs(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    out = tmp_path / "out"
    cfg = tartanair_config(tmp_path, data, fault={"ingest_delay_s": 0.6}, max_inflight_shards=1)
    first: dict = {}
    t = threading.Thread(target=lambda: first.setdefault("summary", build(cfg, show_progress=False)))
    t.start()
    # wait for the holder's "running" events: they come after its own start-up sweep of stray
    # temporaries, which (rightly) removes any it finds; the planted one must come after that
    ledger_dir = out / "manifests" / "ledger"
    deadline = time.time() + 60
    while not (ledger_dir.is_dir() and any(ledger_dir.glob("events-*.parquet"))) and time.time() < deadline:
        time.sleep(0.05)
    inflight = out / "shards" / "tartanair" / "tartanair-000002.tar.tmp-0123456789abcdef"
    inflight.parent.mkdir(parents=True, exist_ok=True)
    inflight.write_bytes(b"half a shard the first driver is still writing")
    with pytest.raises(LeaseHeldError) as err:
        resume(str(out), show_progress=False)
    assert "held by another driver" in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    assert inflight.exists()  # the refused driver did not sweep the other one's temporaries
    # the CLI says the same in one line, with its own exit status
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "resume", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"},
    )
    assert r.returncode == 3 and "held by another driver" in r.stderr, r.stderr[-2000:]
    t.join(120)
    s = first["summary"]
    assert s.ok and s.shards_done == 3 and s.clips_written == 6
    keys = all_keys(out)
    assert sorted(keys) == sorted(planned_ids(out)) and len(keys) == len(set(keys))
    assert verify(str(out)).ok  # the holder swept the temporary when its run ended
    assert ManifestStore(Store(str(out))).ledger()["tartanair-000000"]["attempts"] == 1


def test_changed_content_settings_are_refused_unless_a_new_version(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    out = tmp_path / "out"
    build(tartanair_config(tmp_path, data, jpeg_quality=95), show_progress=False)
    recorded = (out / CONFIG_NAME).read_bytes()
    before = shard_files(out)
    q60 = tartanair_config(tmp_path, data, jpeg_quality=60)
    with pytest.raises(ConfigError) as err:
        build(q60, show_progress=False)
    assert "jpeg_quality: 95 -> 60" in str(err.value) and "--new-version" in str(err.value)
    assert (out / CONFIG_NAME).read_bytes() == recorded and shard_files(out) == before
    with pytest.raises(ConfigError):
        resume(str(out), show_progress=False, overrides={"jpeg_quality": 60})
    s = build(q60, show_progress=False, new_version=True)
    assert s.shards_done == 3 and s.shards_skipped == 0
    assert all(before[k] != v for k, v in shard_files(out).items())
    assert verify(str(out)).ok
    metas = [
        s["meta.json"]
        for p in sorted((out / "shards").rglob("*.tar"))
        for s in wds.WebDataset(str(p), shardshuffle=False, empty_check=False)
    ]
    assert {__import__("json").loads(m)["config_hash"] for m in metas} == {q60.resolved().content_hash("tartanair")}
    assert "jpeg_quality: 60" in (out / CONFIG_NAME).read_text()
    assert any(p.read_bytes() == recorded for p in (out / "config.history").iterdir())


def test_run_time_overrides_never_rewrite_the_recorded_config(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    out = tmp_path / "out"
    cfg = tartanair_config(
        tmp_path, data, ray={"num_cpus": 2, "task_retries": 1, "actor_restarts": 0}, fault={"ingest_delay_s": 0.01}
    )
    build(cfg, show_progress=False)
    text = (out / CONFIG_NAME).read_text()
    assert "ingest_delay_s: 0.01" not in text  # fault hooks belong to one run, never to the output
    from pipeline.runner import load_output_config

    merged = load_output_config(str(out)).with_overrides({"ray": {"address": "auto"}})
    assert merged.ray.address == "auto" and merged.ray.task_retries == 1 and merged.ray.actor_restarts == 0
    s = resume(str(out), show_progress=False, overrides={"ray": {"address": "auto"}, "max_inflight_shards": 1})
    assert s.shards_skipped == 3
    assert (out / CONFIG_NAME).read_text() == text


def test_transient_failure_is_retried_then_left_for_resume(tmp_path, tartan_data, ray_local):
    """A worker lost past Ray's retries fails its shard transiently: never a clip recorded as failed."""
    data, _ = tartan_data
    crash = {"worker_exit_on_clip": 3, "marker_dir": str(tmp_path / "marks")}
    cfg = tartanair_config(tmp_path, data, "a", ray={"num_cpus": 2, "task_retries": 0, "shard_retries": 0}, fault=crash)
    s = build(cfg, show_progress=False)
    assert (tmp_path / "marks" / "worker_exit_3").exists() and not s.ok
    assert s.shards_failed == 1 and s.clips_failed == 0
    st = collect_status(str(tmp_path / "a"))
    assert st["shards"]["failed"] == 1 and st["failure_classes"] == {"transient": 1, "permanent": 0}
    [f] = [f for f in st["failures"] if f["shard_id"]]
    assert f["class"] == "transient" and "WorkerCrashedError" in f["reason"]
    assert st["lease"]["released"] and st["lease"]["command"] == "build"
    s = resume(str(tmp_path / "a"), show_progress=False)
    assert s.ok and s.shards_done == 1 and s.shards_skipped == 2
    assert sorted(all_keys(tmp_path / "a")) == sorted(planned_ids(tmp_path / "a"))
    assert verify(str(tmp_path / "a")).ok
    # with a shard retry the build itself recovers, after a backoff
    crash["marker_dir"] = str(tmp_path / "marks-b")
    cfg = tartanair_config(
        tmp_path,
        data,
        "b",
        fault=crash,
        ray={"num_cpus": 2, "task_retries": 0, "shard_retries": 1, "retry_backoff_s": 0.2},
    )
    s = build(cfg, show_progress=False)
    assert s.ok and s.clips_written == 6 and (tmp_path / "marks-b" / "worker_exit_3").exists()
    assert ManifestStore(Store(str(tmp_path / "b"))).ledger()["tartanair-000001"]["attempts"] == 1


def test_resume_trusts_the_ledger_and_hashes_only_changed_shards(tmp_path, tartan_data, ray_local, monkeypatch):
    data, _ = tartan_data
    out = tmp_path / "out"
    build(tartanair_config(tmp_path, data), show_progress=False)
    hashed: list[str] = []
    real = Store.sha256
    monkeypatch.setattr(Store, "sha256", lambda self, rel: hashed.append(rel) or real(self, rel))
    s = resume(str(out), show_progress=False)
    assert s.shards_skipped == 3 and hashed == []
    tar = sorted((out / "shards").rglob("*.tar"))[1]
    raw = bytearray(tar.read_bytes())
    raw[700] ^= 0xFF  # same size, different bytes, rewritten in place
    tar.write_bytes(bytes(raw))
    s = resume(str(out), show_progress=False)
    assert hashed == [str(tar.relative_to(out))] and s.shards_done == 1 and s.shards_skipped == 2
    hashed.clear()
    s = resume(str(out), show_progress=False, full_check=True)
    assert len(hashed) == 3 and s.shards_skipped == 3
    assert verify(str(out)).ok


def test_refused_driver_leaves_a_held_lease_alone(tmp_path, tartan_data):
    """Without Ray: the refusal comes before any planning, Ray start or write."""
    data, _ = tartan_data
    cfg = tartanair_config(tmp_path, data)
    holder = Lease(Store(cfg.output), command="build", ttl_s=600)
    holder.acquire()
    with pytest.raises(LeaseHeldError):
        build(cfg, show_progress=False)
    assert not (tmp_path / "out" / CONFIG_NAME).exists()
    assert holder.check() is None
    holder.release()


def test_config_recorded_before_explicit_gpu_placement_still_loads(tmp_path):
    from pipeline.runner import load_output_config

    out = tmp_path / "old"
    out.mkdir()
    (out / CONFIG_NAME).write_text(
        "output: %s\nshard_size: 2\ndatasets:\n  tartanair: {root: /data}\nstages:\n"
        "  depth: {resources: {num_cpus: 1.0, num_gpus: 0.0, actors: 1, auto_gpu: true}}\n"
        "  tracks: {resources: {num_cpus: 1.0, num_gpus: 1.0, actors: 2, auto_gpu: true}}\n" % out
    )
    cfg = load_output_config(str(out))
    assert cfg.stages.depth.resources.num_gpus == 0 and cfg.stages.tracks.resources.num_gpus == 1
    with pytest.raises(ConfigError, match="auto_gpu was removed"):  # in a new config it is an error
        from pipeline.config import load_config

        load_config((out / CONFIG_NAME).read_text(), is_text=True)


def test_the_recorded_fingerprint_is_of_the_object_that_was_hashed(tmp_path):
    """A second write attempt of the shard (a zombie) that publishes other bytes between the
    read-back hash and the fingerprint: the done event paired the first attempt's sha256 with the
    zombie's fingerprint, and resume, trusting an unchanged fingerprint, kept the zombie's bytes.
    The fingerprint is now taken around the hash; a change in between hashes again."""
    from pipeline.storage import Store
    from stages.write import publish_shard

    store = Store(str(tmp_path / "out"))
    real_sha256 = Store.sha256
    zombie = []

    def hash_then_zombie(self, rel):
        digest = real_sha256(self, rel)
        if not zombie:
            zombie.append(rel)
            self.write_bytes_atomic(rel, b"the zombie's other bytes")
        return digest

    Store.sha256 = hash_then_zombie
    try:
        with pytest.raises(IOError, match="stored bytes differ"):
            publish_shard(store, "shards/x/x-000000.tar", b"this attempt's bytes")
    finally:
        Store.sha256 = real_sha256
    assert zombie
    digest, fingerprint = publish_shard(store, "shards/x/x-000001.tar", b"bytes")
    assert fingerprint == store.fingerprint_of("shards/x/x-000001.tar") and len(digest) == 64
