"""Failure classes: transient failures are retried, permanent ones are recorded once.

*Transient*: the work could succeed if run again: a Ray worker, actor or node lost, an object
lost with its node, out of memory (host or CUDA), a timeout, a store or network that did not
answer, the node short of a resource (disk or quota full, read-only output, file size limit, no
file descriptors left). A shard with such a failure is never published with the clip missing: it is re-run
with backoff (``ray.shard_retries``, ``ray.retry_backoff_s``) and, if the failure persists, left
``failed`` with ``error_class: transient`` for ``d4s resume`` to rebuild.

*Permanent*: the input itself is bad (a :class:`pipeline.clip.ClipError`: corrupt or missing
file, NaN pose, wrong shape, failed QC) or the code raised something that running it again
would raise again. The clip is recorded once, with its reason, inside its ``done`` shard. A
MegaSaM run that still times out after its own ``stages.align.megasam_retries`` is an
``AlignmentError`` of the clip, hence permanent: an hour-long run is not repeated blindly.

Classification walks the exception, the exception a Ray task error wraps, and its
``__cause__`` / ``__context__`` chain, by class name (Ray, torch and botocore need not be
imported here) and, for ``OSError``, by errno and by the S3 error codes that mean "try later".
A ``MemoryError`` under a ``ClipError`` is permanent: the adapter was decoding the input, whose
header declared an array too large to allocate; a store or network error under it is transient.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

TRANSIENT_NAMES = frozenset(
    {
        # Ray: lost workers, actors, nodes and objects; a full object store; a cancelled or timed-out wait
        "WorkerCrashedError",
        "NodeDiedError",
        "LocalRayletDiedError",
        "RayActorError",
        "ActorDiedError",
        "ActorUnavailableError",
        "ActorUnschedulableError",
        "TaskUnschedulableError",
        "ObjectLostError",
        "OwnerDiedError",
        "ObjectReconstructionFailedError",
        "ObjectReconstructionFailedMaxAttemptsExceededError",
        "ObjectReconstructionFailedLineageEvictedError",
        "ObjectFetchTimedOutError",
        "ObjectStoreFullError",
        "OutOfDiskError",
        "RaySystemError",
        "GetTimeoutError",
        "TaskCancelledError",
        # memory: Ray's memory monitor, torch.cuda.OutOfMemoryError, the host
        "OutOfMemoryError",
        "MemoryError",
        # time and network, including botocore's and aiohttp's own classes
        "TimeoutError",
        "TimeoutExpired",
        "ConnectionError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        # d4s: a shard that holds a transient clip failure
        "TransientShardError",
    }
)
# the node's resources, never the input's: the disk or quota full, a read-only output, a file size
# limit, file descriptors exhausted; once fixed, running again succeeds
NODE_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EMFILE, errno.ENFILE})
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
        errno.ESTALE,
        errno.EAGAIN,
    }
    | NODE_RESOURCE_ERRNOS
)
TRANSIENT_TEXT = (
    "SlowDown",
    "ServiceUnavailable",
    "RequestTimeout",
    "InternalError",
    "Throttl",
    "CUDA out of memory",
    "Connection refused",
    "Connection reset",
)


# A GPU in a fault state (an Xid error: illegal access, launch failure, ECC, a library's internal
# error) fails every later call of its process at once; its clips are not bad input. Transient: the
# shard is re-run, and the model actor that saw it restarts (pipeline/dag.py) with a new CUDA context.
DEVICE_FAULT_TEXT = (
    "CUDA error",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "cuDNN error",
    "illegal memory access",
    "unspecified launch failure",
    "device-side assert",
    "ECC error",
)


def device_fault_text(text: str) -> bool:
    """Whether an error message is a GPU fault's (out of memory is not: the GPU is healthy)."""
    return "out of memory" not in text and any(t in text for t in DEVICE_FAULT_TEXT)


def is_device_fault(exc: BaseException | None, _depth: int = 0) -> bool:
    """Whether ``exc`` (or what caused it) is a GPU fault, not a problem of the input."""
    if exc is None or _depth > 10:
        return False
    if device_fault_text(str(exc)):
        return True
    return any(
        nxt is not None and nxt is not exc and is_device_fault(nxt, _depth + 1)
        for nxt in (getattr(exc, "cause", None), exc.__cause__, exc.__context__)
    )


class TransientShardError(RuntimeError):
    """A shard cannot be published whole now: one of its clips failed transiently."""


@dataclass
class ShardFailure:
    """Why a shard was not published: the message, its class, and after how many runs."""

    message: str
    transient: bool
    attempts: int = 1

    @property
    def error_class(self) -> str:
        return "transient" if self.transient else "permanent"

    def __str__(self) -> str:
        return self.message


def is_transient(exc: BaseException | None, _depth: int = 0, _input_verdict: bool = False) -> bool:
    """True when running the failed work again could succeed (see the module docs)."""
    if exc is None or _depth > 10:
        return False
    if is_device_fault(exc):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    # Under a ClipError (the input's verdict) a failed allocation is the file's: a header that
    # declares an array too large to allocate fails the same way every time. Store and network
    # errors under it still count (reading the input can succeed later).
    if names & TRANSIENT_NAMES and not (_input_verdict and "MemoryError" in names):
        return True
    if isinstance(exc, OSError) and (exc.errno in TRANSIENT_ERRNOS or any(t in str(exc) for t in TRANSIENT_TEXT)):
        return True
    verdict = _input_verdict or "ClipError" in names
    for nxt in (getattr(exc, "cause", None), exc.__cause__, exc.__context__):
        if nxt is not None and nxt is not exc and is_transient(nxt, _depth + 1, verdict):
            return True
    return False


def describe(exc: BaseException, limit: int = 500) -> str:
    """``Class: first line`` of an exception; for a Ray task error, of the exception it wraps."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return describe(cause, limit)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}"
