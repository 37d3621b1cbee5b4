"""The training loader uses a shard only if its bytes are the ones its build recorded.

A zombie write attempt (a Ray retry while the first attempt still runs) can publish after the
ledger committed ``done``; ``verify`` and ``resume`` catch the checksum mismatch, and so must the
trainer, before it reads a single sample of that shard."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from conftest import tartanair_config, write_tartanair

import training.data as data_mod
from pipeline.runner import build
from training.config import make_config
from training.data import ShardChecksumError, ShardStream, iter_tar, resolve_shards, shard_checksums


@pytest.fixture(scope="module")
def built_once(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("checksums")
    write_tartanair(tmp / "data")
    build(tartanair_config(tmp, tmp / "data"), show_progress=False)
    return tmp / "out"


@pytest.fixture()
def built(built_once, tmp_path):
    """A copy of one build per test (each damages its own)."""
    shutil.copytree(built_once, tmp_path / "out")
    return tmp_path / "out"


def test_loader_checks_each_shard_against_the_index_and_refuses_a_changed_one(built):
    cfg = make_config("tiny", data={"root": str(built)})
    by_ds, _, _ = resolve_shards(cfg.data)
    sums = shard_checksums(cfg.data)
    urls = by_ds["tartanair"]
    assert set(sums) == set(urls) and len(urls) == 3
    assert [s["__key__"] for s in iter_tar(urls[0], sums[urls[0]])]  # intact: read as before
    # checked once per process: a later read compares the stored object's fingerprint, not the bytes
    hashed = []
    real = data_mod._checked_copy
    data_mod._checked_copy = lambda url, sha: hashed.append(url) or real(url, sha)
    try:
        assert [s["__key__"] for s in iter_tar(urls[0], sums[urls[0]])] and hashed == []
        assert [s["__key__"] for s in iter_tar(urls[2], sums[urls[2]])] and hashed == [urls[2]]
    finally:
        data_mod._checked_copy = real
    (built / urls[0].split("/out/", 1)[1]).write_bytes((built / urls[1].split("/out/", 1)[1]).read_bytes())
    with pytest.raises(ShardChecksumError) as err:
        next(iter_tar(urls[0], sums[urls[0]]))
    assert urls[0] in str(err.value) and sums[urls[0]] in str(err.value)
    stage = cfg.stages[0].model_copy(update={"num_frames": 4})  # the build's clips have 4 frames
    stream = ShardStream(cfg.data, stage, 0, 4, 1)
    with pytest.raises(ShardChecksumError):
        for _ in zip(range(50), stream):
            pass


def test_checksums_come_from_the_ledger_when_the_index_predates_them(built):
    cfg = make_config("tiny", data={"root": str(built)})
    expected = shard_checksums(cfg.data)
    index = pq.read_table(built / "index.parquet")
    pq.write_table(index.drop(["shard_sha256"]), built / "index.parquet")
    assert shard_checksums(cfg.data) == expected


def test_without_an_index_only_shards_the_ledger_records_done_are_read(built):
    """An output whose driver stopped before writing the index: the loader takes the shards the
    ledger records done (each checked against its sha256), not every tar under ``shards/``: a
    shard whose rebuild is running (here: its bytes replaced by another shard's) was read
    unchecked, duplicating that shard's clips."""
    from manifests.store import ManifestStore
    from pipeline.storage import Store

    (built / "index.parquet").unlink()
    ms = ManifestStore(Store(str(built)))
    shards = ms.shards()
    ms.append_events([{"shard_id": shards[1]["shard_id"], "dataset": shards[1]["dataset"], "state": "running"}])
    (built / shards[1]["path"]).write_bytes((built / shards[0]["path"]).read_bytes())
    cfg = make_config("tiny", data={"root": str(built)})
    by_ds, _, _ = resolve_shards(cfg.data)
    urls = [u for v in by_ds.values() for u in v]
    assert sorted(u.rsplit("/", 1)[1] for u in urls) == sorted(
        sh["path"].rsplit("/", 1)[1] for sh in (shards[0], shards[2])
    )
    sums = shard_checksums(cfg.data)
    assert set(sums) == set(urls)


@pytest.mark.parametrize("where", ["../elsewhere/x.tar", "/etc/x.tar", "s3://other-bucket/x.tar"])
def test_an_index_naming_a_shard_outside_the_output_is_refused(built, where):
    """index.parquet's shard_path is relative to the output; one leaving it ('..', absolute, a URL)
    was read as given, its checksum taken from the same index: an edited or foreign index made a
    training job read files or buckets outside the output with the job's credentials."""
    import pyarrow as pa

    index = pq.read_table(built / "index.parquet")
    paths = index.column("shard_path").to_pylist()
    paths[0] = where
    pq.write_table(
        index.set_column(index.schema.get_field_index("shard_path"), "shard_path", pa.array(paths)),
        built / "index.parquet",
    )
    cfg = make_config("tiny", data={"root": str(built)})
    with pytest.raises(ValueError) as err:
        resolve_shards(cfg.data)
    assert "index.parquet" in str(err.value) and where in str(err.value) and "outside" in str(err.value)
    with pytest.raises(ValueError):
        shard_checksums(cfg.data)


def test_a_latest_pointer_leaving_the_checkpoint_folder_is_refused(tmp_path):
    """ckpt/latest names the checkpoint to resume or use; '../../elsewhere.pt' in it was followed
    out of the workdir (a shared workdir is not trusted). Only a checkpoint name is accepted."""
    from training.load import CheckpointError, resolve_checkpoint
    from training.trainer import latest_checkpoint

    (tmp_path / "outside.pt").write_bytes(b"x")
    wd = tmp_path / "wd"
    (wd / "ckpt").mkdir(parents=True)
    for bad in ("../../outside.pt", "/etc/passwd", "sub/step-00000001.pt", "s3://b/step-00000001.pt"):
        (wd / "ckpt" / "latest").write_text(bad)
        with pytest.raises(CheckpointError, match="latest") as err:
            resolve_checkpoint(str(wd))
        assert "not a checkpoint name" in str(err.value)
    (wd / "ckpt" / "latest").write_text("step-00000012.pt\n")
    assert latest_checkpoint(str(wd)) == str(wd / "ckpt" / "step-00000012.pt")


def test_a_shard_as_its_build_published_it_is_trusted_without_hashing(built_once, tmp_path):
    """The index records each shard's fingerprint at publication (taken after it was hashed): a
    shard whose stored object still shows it is read without downloading it to hash it again; a
    copy of the output elsewhere (other inodes) or a rewritten shard is hashed before use."""
    cfg = make_config("tiny", data={"root": str(built_once)})
    cat = data_mod.resolve_catalog(cfg.data)
    urls = cat.shards["tartanair"]
    assert cat.fingerprints is not None and set(cat.fingerprints) == set(urls)
    stage = cfg.stages[0].model_copy(update={"num_frames": 4})
    hashed: list[str] = []
    real = data_mod._checked_copy
    data_mod._checked_copy = lambda url, sha: hashed.append(url) or real(url, sha)
    for u in urls:
        data_mod._VERIFIED.pop(u, None)
    try:
        assert sum(1 for _ in zip(range(6), ShardStream(cfg.data, stage, 0, 4, 1))) == 6 and hashed == []
        copy = tmp_path / "copy"
        shutil.copytree(built_once, copy)
        moved = make_config("tiny", data={"root": str(copy)})
        assert sum(1 for _ in zip(range(6), ShardStream(moved.data, stage, 0, 4, 1))) == 6
        assert sorted(set(hashed)) == sorted(data_mod.resolve_catalog(moved.data).shards["tartanair"])
    finally:
        data_mod._checked_copy = real
