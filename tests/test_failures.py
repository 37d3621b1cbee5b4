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
        # the node's resources, never the input's fault: a full disk or quota, a read-only output, a
        # file size limit, no file descriptors left (were permanent: clips lost in published shards)
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError(errno.EROFS, "Read-only file system"),
        OSError(errno.EFBIG, "File too large"),
        OSError(errno.EMFILE, "Too many open files"),
        OSError(errno.ENFILE, "Too many open files in system"),
        _wrapped(OSError(errno.ENOSPC, "No space left on device")),
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


def test_a_header_declaring_an_array_too_large_to_allocate_is_the_files_fault(tmp_path):
    """A corrupt .npy header that declares a 256 TiB array: allocating it fails every time, so the
    clip fails permanently, naming the file, and its shard is published without it. (The
    MemoryError under the adapter's ClipError made it transient: the shard was re-run, then left
    failed, and every resume failed it again, losing the shard's good clips with it.)"""
    import struct

    from conftest import write_tartanair

    from pipeline.clip import ClipMeta
    from stages.ingest import get_adapter

    write_tartanair(tmp_path / "data", n_scenes=1, frames=6)
    (npy,) = (tmp_path / "data").rglob("000001_left_depth.npy")
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1048576, 1048576, 64), }"
    header += " " * (118 - len(header) - 1) + "\n"
    npy.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(4096))
    adapter = get_adapter("tartanair", str(tmp_path / "data"))
    (scene,) = adapter.discover()
    meta = ClipMeta("tartanair", scene.scene, "c", [0, 1, 2], dynamic=False, real=False)
    with pytest.raises(ClipError) as caught:
        adapter.load_clip(scene, [0, 1, 2], meta)
    failure = ClipFailure.from_exception("c", "ingest", caught.value)
    assert "000001_left_depth.npy" in failure.path and "MemoryError" in failure.reason
    assert not failure.transient
    # a MemoryError that is no ClipError's (a stage's own allocation) stays transient
    assert is_transient(MemoryError()) and ClipFailure.from_exception("c", "depth", MemoryError()).transient


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


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: unspecified launch failure",
        "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`",
        "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
        "CUDA error: uncorrectable ECC error encountered",
    ],
)
def test_a_gpu_fault_is_the_gpus_not_the_clips(message):
    """A GPU in a sticky error state (an Xid: every later call fails at once) made its clips
    permanent failures, recorded as bad input in a published shard that resume never redoes."""
    from pipeline.failures import is_device_fault

    exc = RuntimeError(message)
    assert is_transient(exc) and is_device_fault(exc)
    failure = ClipFailure.from_exception("c", "depth", exc)
    assert failure.transient
    assert not is_device_fault(RuntimeError("shape mismatch")) and not is_transient(RuntimeError("shape mismatch"))
