"""Object storage end to end, against a real S3-compatible server on loopback (moto's server mode).

A dataset root uploaded to S3, a build into ``s3://``, verify, damage + resume, byte-identity with a
local build of the same inputs, no credentials anywhere in the output, the trainer's loader reading
the shards back, and atomic publication (an exception mid-write leaves no object behind).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from conftest import write_tartanair  # noqa: E402
from s3_server import LocalS3  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1:<free port> with one bucket; fake, per-run credentials."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's per-request access log
    srv = LocalS3().start()
    try:
        srv.create_bucket()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def s3(s3_server):
    """The S3 environment for this process *and* for a fresh local Ray started under it.

    Ray workers inherit the environment of the raylet, i.e. of the process at ``ray.init``: a Ray
    started earlier in the session (``ray_local``) would not see the endpoint or the credentials, so
    it is shut down here and restarted, as it was, when the module ends.
    """
    import ray

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    s3_server.apply_env()
    # "local": a new instance even when another cluster on this machine left its address behind
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield s3_server
    finally:
        ray.shutdown()
        s3_server.restore_env()
        if was_running:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


def _config(output: str, root: str, **over):
    from pipeline.config import BuildConfig

    return BuildConfig.model_validate(
        {
            "output": output,
            "shard_size": 2,
            "datasets": {"tartanair": {"root": root, "clip_length": 4, "clip_stride": 3, "track_source": "none"}},
            "ray": {"num_cpus": 2},
            **over,
        }
    )


def _static_stage(steps: int) -> dict:
    """A tiny first curriculum stage (16 px, 3 frames) for training from the S3 builds."""
    return dict(
        name="static",
        steps=steps,
        resolution=16,
        num_frames=3,
        scenes="any",
        max_frame_stride=1,
        frozen=["deformation"],
        losses=["fm", "photo", "geo"],
    )


def _members(data: bytes) -> dict[str, bytes]:
    """Tar members, with the provenance hash of the config (it names the dataset root) left out."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            body = tar.extractfile(m).read()
            if m.name.endswith(".meta.json"):
                meta = json.loads(body)
                meta.pop("config_hash")
                body = json.dumps(meta, sort_keys=True).encode()
            out[m.name] = body
    return out


def _tar_keys(data: bytes) -> list[str]:
    keys: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            k = m.name.split(".", 1)[0]
            if not keys or keys[-1] != k:
                keys.append(k)
    return keys


@pytest.fixture(scope="module")
def builds(s3, tmp_path_factory):
    """The same TartanAir scenes (uploaded to ``s3://bucket/data`` with s3fs) built with one config
    into ``s3://bucket/out`` and into a local output (the reference); and from the local copy of the
    files into another local output."""
    import fsspec

    from pipeline.runner import build

    tmp = tmp_path_factory.mktemp("s3build")
    data = tmp / "tartanair"
    write_tartanair(data)
    fs = fsspec.filesystem("s3")
    fs.put(str(data) + "/", f"{s3.bucket}/data/tartanair/", recursive=True)
    assert s3.objects("data/tartanair/")  # the dataset really is on the server now
    root = s3.url("data/tartanair")
    remote = build(_config(s3.url("out"), root), show_progress=False)
    build(_config(str(tmp / "local"), root), show_progress=False)
    build(_config(str(tmp / "local_root"), str(data)), show_progress=False)
    return {"local_out": tmp / "local", "local_root_out": tmp / "local_root", "remote": remote, "url": s3.url("out")}


def _local_shards(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "shards").rglob("*.tar"))}


def _remote_shards(s3) -> dict[str, bytes]:
    return {k[len("out/") :]: s3.get(k) for k in s3.objects("out/shards/")}


def test_atomic_writer_publishes_whole_object_or_nothing(s3):
    from pipeline.storage import Store

    st = Store(s3.url("atomic"))
    assert not st.is_local and st.display("x.bin") == f"s3://{s3.bucket}/atomic/x.bin"
    for size in (3, 12 * 2**20):  # a one-PUT object and one past s3fs's multipart threshold when streamed
        with pytest.raises(RuntimeError, match="mid-write"):
            with st.atomic_writer(f"partial-{size}.bin") as f:
                f.write(b"x" * size)
                raise RuntimeError("mid-write")
        assert not st.exists(f"partial-{size}.bin")
    assert not s3.objects("atomic/")  # nothing at the final key, no temporary object either
    with st.atomic_writer("whole.bin") as f:
        f.write(b"a" * 1000)
        f.write(b"b" * 1000)
    st.write_bytes_atomic("direct.bin", b"direct")
    assert s3.get("atomic/whole.bin") == b"a" * 1000 + b"b" * 1000 and s3.get("atomic/direct.bin") == b"direct"
    assert st.listdir() == ["direct.bin", "whole.bin"]
    # a second Store sees a change made behind the first one's back (no stale listing cache)
    s3.delete("atomic/whole.bin")
    assert not st.exists("whole.bin") and st.listdir() == ["direct.bin"]


def test_build_from_s3_root_into_s3_verifies_and_equals_local_build(s3, builds):
    from manifests.store import ManifestStore
    from pipeline.storage import Store
    from pipeline.verify import verify

    r = builds["remote"]
    assert r.ok and r.clips_failed == 0 and r.clips_written == 6 and r.shards_done == 3
    rep = verify(builds["url"])
    assert rep.ok, rep.problems
    assert rep.samples == 6 and rep.shards_checked == 3
    remote, local = _remote_shards(s3), _local_shards(builds["local_out"])
    assert len(remote) == 3 and remote == local  # byte-identical to a local build of the same config
    # and the samples read through s3:// equal those read from the local files (only the provenance
    # hash differs, because it covers the dataset root)
    from_local_files = _local_shards(builds["local_root_out"])
    assert {k: _members(v) for k, v in remote.items()} == {k: _members(v) for k, v in from_local_files.items()}
    ms = ManifestStore(Store(builds["url"]))
    planned = sorted(c["clip_id"] for c in ms.clips())
    keys = [k for data in remote.values() for k in _tar_keys(data)]
    assert sorted(keys) == planned and len(keys) == len(set(keys))
    assert sorted(r["key"] for r in ms.index()) == planned
    names = set(s3.objects("out/"))
    assert {"out/config.resolved.yaml", "out/manifests/clips.parquet", "out/index.parquet"} <= names
    assert not [n for n in names if ".tmp" in n]


def test_cli_verify_and_status_on_s3_url(s3, builds):
    """A fresh process finds the server through the environment alone (nothing in the output names it)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", builds["url"], "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    st = json.loads(r.stdout)
    assert st["datasets"]["tartanair"]["clips_done"] == 6
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "verify", builds["url"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_training_loader_reads_shards_from_s3(s3, builds):
    from manifests.store import ManifestStore
    from pipeline.storage import Store
    from training.config import make_config
    from training.data import iter_tar, make_loader, resolve_shards

    index = ManifestStore(Store(builds["url"])).index()
    stage = _static_stage(2)
    cfg = make_config("tiny", data={"root": builds["url"], "shuffle_buffer": 1}, stages=[stage])
    by_ds, counts, keys = resolve_shards(cfg.data)
    assert counts == {"tartanair": 6} and keys == {r["key"]: "tartanair" for r in index}
    assert all(u.startswith(f"s3://{s3.bucket}/out/shards/") for u in by_ds["tartanair"])
    seen = [s["__key__"] for url in by_ds["tartanair"] for s in iter_tar(url)]
    assert sorted(seen) == sorted(keys)
    loader = make_loader(cfg.data, cfg.stages[0], 0, n_tracks=8, batch_size=2, rank=0, world=1)
    it = iter(loader)
    got = []
    for _ in range(3):
        batch = next(it)
        assert tuple(batch["video"].shape) == (2, 3, 3, 16, 16)
        got += batch["key"]
    assert set(got) <= set(keys) and len(set(got)) == 6  # one epoch: every sample once


def test_training_checkpoints_and_resumes_in_s3_workdir(s3, builds, capsys):
    """The in-process trainer: shards, checkpoints, ``latest`` and metrics all on the object store."""
    import yaml

    from training.cli import train_main
    from training.trainer import latest_checkpoint, load_checkpoint

    cfg = {
        "preset": "tiny",
        "data": {"root": builds["url"], "shuffle_buffer": 1},
        "stages": [_static_stage(2)],
        "runtime": {"launcher": "local", "num_workers": 1, "ckpt_every": 1, "tensorboard": False},
    }
    path = builds["local_out"].parent / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    wd = s3.url("train")
    assert train_main(str(path), None, 1, wd) == 0
    assert train_main(str(path), None, 2, wd) == 0
    out = capsys.readouterr().out
    assert "resumed from checkpoint s3://" in out and "(step 1)" in out
    assert (
        latest_checkpoint(wd) == f"{wd}/ckpt/step-00000002.pt" and load_checkpoint(latest_checkpoint(wd))["step"] == 2
    )
    rows = [json.loads(line) for line in s3.get("train/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert not [k for k in s3.objects("train/") if ".tmp" in k]


@pytest.mark.slow  # ~70 s; the S3 workdir itself is covered in-process above, Ray Train by test_training_train
def test_ray_train_two_ranks_checkpoint_and_resume_in_s3_workdir(s3, builds):
    """Ray Train (2 gloo ranks) with an ``s3://`` workdir: checkpoints and metrics on the store, Ray
    Train's own bookkeeping on the node, and a second call resumes from the store's checkpoint."""
    from training.config import make_config
    from training.trainer import latest_checkpoint, load_checkpoint, ray_storage_path, train

    wd = s3.url("train_ray")
    stage = _static_stage(3)
    base = dict(
        data={"root": builds["url"], "shuffle_buffer": 1},
        workdir=wd,
        stages=[stage],
        runtime={"launcher": "ray", "num_workers": 2, "ckpt_every": 1, "tensorboard": False},
    )
    train(make_config("tiny", max_steps=1, **base))
    assert load_checkpoint(latest_checkpoint(wd))["step"] == 1
    train(make_config("tiny", max_steps=3, **base))
    st = load_checkpoint(latest_checkpoint(wd))
    assert st["step"] == 3 and st["world"] == 2
    rows = [json.loads(line) for line in s3.get("train_ray/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # the second call went on from step 1, not from 0
    assert not [k for k in s3.objects("train_ray/") if "/ray/" in k or ".tmp" in k]
    assert os.path.isdir(ray_storage_path(wd)) and "://" not in ray_storage_path(wd)


def test_model_checkpoints_load_from_s3(s3):
    import torch

    from stages.depth.vda.load import read_state_dict
    from stages.tracks.cotracker.load import read_checkpoint

    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(4)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    s3.put("ckpt/model.pth", buf.getvalue())
    for got in (read_state_dict(s3.url("ckpt/model.pth")), read_checkpoint(s3.url("ckpt/model.pth"))):
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_megasam_cache_in_s3_is_reused_by_another_runner(s3, tmp_path):
    """The MegaSaM cache lives in the output store: a second node (another runner, another work
    dir) finds the result in S3 and does not run the command again; the log is in S3 too."""
    import shlex
    import sys

    import numpy as np

    from stages.align.megasam import MegaSaMCache, MegaSaMRunner, run_cached

    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake_megasam.py"
    script.write_text(
        "import os, sys, numpy as np\n"
        "frames, out, run = sys.argv[1:4]\n"
        f"open({str(calls)!r}, 'a').write(run + '\\n')\n"
        "t = len(os.listdir(frames))\n"
        "np.savez(out, images=np.zeros((t, 8, 8, 3), np.uint8), depths=np.full((t, 8, 8), 3.0, np.float32),\n"
        "         intrinsic=np.array([[8.0, 0, 4], [0, 8, 4], [0, 0, 1]]), cam_c2w=np.tile(np.eye(4), (t, 1, 1)))\n"
    )
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{frames_dir}} {{out_npz}} {{clip_id}}"
    frames = np.random.default_rng(1).integers(0, 255, (4, 8, 8, 3), np.uint8)
    url = s3.url("out/cache/megasam")
    first = run_cached(MegaSaMRunner(cmd, tmp_path / "node1"), MegaSaMCache(url), "re__s__000000", frames)
    second = run_cached(MegaSaMRunner(cmd, tmp_path / "node2"), MegaSaMCache(url), "re__s__000000", frames)
    assert not first.cached and second.cached and calls.read_text().split() == ["re__s__000000"]
    np.testing.assert_array_equal(first.output.depths, second.output.depths)
    keys = s3.objects("out/cache/megasam")
    assert any(k.endswith(f"{first.key}.npz") for k in keys) and any("/logs/" in k for k in keys)


def test_verify_catches_damage_and_resume_repairs_exactly_once(s3, builds):
    from manifests.store import ManifestStore
    from pipeline.runner import resume
    from pipeline.storage import Store
    from pipeline.verify import verify
    from training.config import make_config
    from training.data import resolve_shards

    url = builds["url"]
    shard_keys = s3.objects("out/shards/")
    s3.delete(shard_keys[0])
    raw = bytearray(s3.get(shard_keys[1]))
    raw[700] ^= 0xFF
    s3.put(shard_keys[1], bytes(raw))
    stray = "out/shards/tartanair/tartanair-999999.tar"  # an object no ledger event vouches for
    s3.put(stray, b"not a shard")
    rep = verify(url)
    text = "\n".join(rep.problems)
    assert not rep.ok and "missing" in text and "sha256 mismatch" in text and "tartanair-999999.tar" in text
    # readers trust the ledger (index.parquet), not the listing: the stray object is never read
    by_ds, _, _ = resolve_shards(make_config("tiny", data={"root": url}).data)
    assert not [u for u in by_ds["tartanair"] if u.endswith("tartanair-999999.tar")]
    s3.delete(stray)
    s = resume(url, show_progress=False)
    assert s.ok and s.shards_done == 2 and s.shards_skipped == 1
    rep = verify(url)
    assert rep.ok, rep.problems
    remote = _remote_shards(s3)
    assert remote == _local_shards(builds["local_out"])
    planned = sorted(c["clip_id"] for c in ManifestStore(Store(url)).clips())
    keys = [k for data in remote.values() for k in _tar_keys(data)]
    assert sorted(keys) == planned and len(keys) == len(set(keys))  # every planned clip in exactly one shard


def test_driver_killed_mid_build_then_resume_on_s3(s3, builds, tmp_path):
    """The driver dies after its first shard (a separate process, finding S3 through the environment);
    ``resume`` finishes the output, identical to the uninterrupted build."""
    import os
    import subprocess
    import sys

    from pipeline.runner import resume
    from pipeline.status import collect_status
    from pipeline.verify import verify

    url = s3.url("crashy")
    cfg = _config(url, s3.url("data/tartanair"), max_inflight_shards=1, fault={"driver_exit_after_shards": 1})
    path = tmp_path / "crashy.yaml"
    path.write_text(cfg.to_yaml())
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "RAY_ADDRESS": "local"}  # its own local Ray
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "build", str(path), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 19, r.stderr[-2000:]
    st = collect_status(url)
    assert st["shards"]["done"] == 1 and st["shards"]["pending"] == 2
    s = resume(url, show_progress=False, overrides={"fault": {}})
    assert s.ok and s.shards_skipped == 1 and s.shards_done == 2
    assert verify(url).ok
    crashy = {k[len("crashy/") :]: s3.get(k) for k in s3.objects("crashy/shards/")}
    assert crashy == _local_shards(builds["local_out"])


def test_no_credentials_in_any_output_object(s3, builds):
    """Last, after every build, resume, CLI call and training run: no object in the bucket (outputs,
    manifests, ledger, logs, index, config.resolved.yaml, checkpoints, metrics) holds the credentials."""
    names = s3.objects()
    assert [n for n in names if n.startswith("out/logs/")] and "out/config.resolved.yaml" in names
    for name in names:
        body = s3.get(name)
        assert s3.secret_key.encode() not in body, name
        assert s3.access_key.encode() not in body, name
        assert s3.endpoint.encode() not in body, name
