"""Failure classes (pipeline/failures.py): what is retried (transient) and what is recorded once
(permanent), and that a shard holding a transient clip failure is never published."""

from __future__ import annotations

import errno

import pytest
import ray.exceptions as rex
import torch
from conftest import tartanair_config
from PIL import UnidentifiedImageError

from pipeline.clip import ClipError, ClipFailure
from pipeline.failures import TransientShardError, describe, is_transient


def _wrapped(cause: BaseException) -> BaseException:
    """What ``ray.get`` raises for an exception inside a task."""
    return rex.RayTaskError("write_task", "Traceback ...", cause).as_instanceof_cause()


@pytest.mark.parametrize(
    "exc",
    [
        rex.WorkerCrashedError(),
        rex.NodeDiedError("node gone"),
        rex.OutOfMemoryError("killed by the memory monitor"),
        rex.ObjectLostError("0" * 56, "owner", "call site"),
        rex.ActorDiedError(),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
        TimeoutError("read timed out"),
        ConnectionResetError(),
        OSError(errno.ECONNREFUSED, "Connection refused"),
        OSError("An error occurred (SlowDown) when calling the PutObject operation"),
        _wrapped(TimeoutError("slow")),
        _wrapped(TransientShardError("1 clip failed transiently")),
    ],
)
def test_transient(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ClipError("truncated PNG", "/data/x.png"),
        ValueError("NaN pose"),
        FileNotFoundError("/data/missing.npy"),
        UnidentifiedImageError("cannot identify image file"),
        KeyError("depth"),
        _wrapped(ValueError("bug")),
    ],
)
def test_permanent(exc):
    assert not is_transient(exc)


def test_cause_decides_and_failures_carry_their_class():
    try:
        try:
            raise ConnectionError("store unreachable")
        except ConnectionError as inner:
            raise ClipError("cannot read frame 3", "s3://b/x.png") from inner
    except ClipError as exc:
        assert is_transient(exc) and ClipFailure.from_exception("c", "ingest", exc).transient
    oom = ClipFailure.from_exception("c", "depth", torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert oom.transient and oom.to_json()["transient"] is True
    assert not ClipFailure.from_exception("c", "ingest", ClipError("NaN pose")).transient
    assert describe(_wrapped(TimeoutError("slow\nmore"))) == "TimeoutError: slow"


def test_shard_with_a_transient_clip_failure_is_not_published(tmp_path):
    from stages.write import write_shard

    cfg = tartanair_config(tmp_path, tmp_path / "data")
    shard = {"shard_id": "tartanair-000000", "dataset": "tartanair", "path": "shards/tartanair/tartanair-000000.tar"}
    clips = [
        ClipFailure("a", "ingest", "truncated PNG"),
        ClipFailure("b", "depth", "OutOfMemoryError: CUDA", transient=True),
    ]
    with pytest.raises(TransientShardError, match="b at depth"):
        write_shard(shard, clips, cfg)
    assert not (tmp_path / "out").exists()
    result = write_shard(shard, clips[:1], cfg)  # a permanent failure alone: published, recorded once
    assert result["samples_written"] == 0 and [f["clip_id"] for f in result["clips_failed"]] == ["a"]
    assert (tmp_path / "out" / shard["path"]).exists() and result["fingerprint"]
