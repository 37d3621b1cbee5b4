"""One driver per output: a lease object in the output store.

``OUT/manifests/lease.json`` names the driver that may write the output (the ledger, the plan,
the recorded config, compactions, the sweep of temporary files): its owner token, host, pid,
command, epoch, when it was acquired and when it last renewed. A driver

* **acquires** it before anything else: created only if absent (a conditional write, see
  :class:`pipeline.storage.Store`), or taken over, with a compare-and-swap on the version it
  read, when the holder released it or is stale; otherwise it is refused with
  :class:`LeaseHeldError`, which says who holds the output and since when;
* **renews** it every ``heartbeat_s`` from a background thread, again by compare-and-swap, so a
  renewal fails once another driver has taken the lease over;
* **checks** it before every ledger write (:meth:`Lease.check`): a lease taken over, or not
  renewed for ``0.8 * ttl_s`` of the holder's own monotonic clock, raises
  :class:`LeaseLostError` (the holder fences itself before a taker may consider it stale);
* **releases** it when it ends, so the next driver need not wait.

A conditional write whose reply is lost (the client retries it, and the retry fails its own
precondition: S3 answers 412 to a write it already applied) is told apart from a takeover by
reading the lease back: a record with this driver's owner token and epoch is its own. Store
errors during a renewal are hiccups the next beat retries; only a lease in another's hands, or
no renewal for ``FENCE_FRACTION`` of the TTL, stops the driver.

Staleness is judged on **the store's clock**, never a host's: the lease's age is the difference
between the modification time of a probe object written now and that of the lease object, both
stamped by the store. A host whose clock is hours off can neither take a live lease early nor
keep a dead one. A lease held by a process of this very host (same host name, boot id and pid
namespace: containers on one kernel share the first two) that no longer runs is stale at once: a killed driver can be resumed without waiting for its TTL.

The epoch grows by one with every acquisition (and is larger than every epoch already in the
ledger, ``min_epoch``): the ledger numbers a driver's events in its epoch, so the events of a
driver that lost its lease sort before those of the one that took it over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from pipeline.config import ConfigError
from pipeline.storage import Store

log = logging.getLogger("d4s")

LEASE_PATH = "manifests/lease.json"
FENCE_FRACTION = 0.8  # a holder stops trusting its lease after this fraction of the TTL without renewal


class LeaseHeldError(ConfigError):
    """Another live driver holds the output (the CLI prints it as one line and exits 3)."""


class LeaseLostError(RuntimeError):
    """This driver's lease was taken over or could not be renewed in time: it must stop writing."""


@dataclass
class LeaseRecord:
    owner: str
    epoch: int
    host: str
    pid: int
    pid_start: str
    boot_id: str
    command: str
    ttl_s: float
    acquired_at: float
    renewed_at: float
    beats: int = 0
    released: bool = False
    extra: dict = field(default_factory=dict)
    pid_ns: str = ""  # the holder's pid namespace ('' in records of older versions: unknown)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseRecord":
        raw = json.loads(data)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in names})


def _record(store: Store, data: bytes) -> LeaseRecord:
    try:
        return LeaseRecord.from_bytes(data)
    except (ValueError, TypeError) as exc:  # JSON damaged, or not a lease record
        raise ConfigError(
            f"{store.display(LEASE_PATH)}: not a readable lease ({type(exc).__name__}: {exc}); it was damaged "
            "after it was written: if no driver works on this output, remove it"
        ) from None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    """This process's pid namespace ('pid:[inode]'; '' when unknown). Containers on one kernel
    share the boot id and, with host networking, the hostname: only in the same pid namespace
    does a pid name the same process."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """Start time of a process in clock ticks since boot ('' when unknown): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _process_gone(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(start) and _pid_start(pid) not in ("", start)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Lease:
    """The lease of one driver on one output store (see the module docs)."""

    def __init__(
        self,
        store: Store,
        command: str = "build",
        ttl_s: float = 300.0,
        heartbeat_s: float | None = None,
        owner: str | None = None,
        same_host_shortcut: bool = True,
        read_only: bool = False,
    ):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.store = store
        self.command = command
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else self.ttl_s / 5
        self.owner = owner or uuid.uuid4().hex[:12]
        self.same_host_shortcut = same_host_shortcut
        # a reader's view (status, report, verify): ages on this host's clock, nothing written
        self.read_only = read_only
        self.record: LeaseRecord | None = None
        self._version: str | None = None
        self._renewed_mono = 0.0
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ---------------------------------------------------------------------------
    def holder(self) -> LeaseRecord | None:
        got = self.store.read_versioned(LEASE_PATH)
        return _record(self.store, got[0]) if got else None

    def _age_on_store_clock(self) -> float:
        """The lease object's age on the store's clock (a probe object written and removed); a
        read-only view takes this host's clock instead, off by its skew, and writes nothing."""
        now = time.time() if self.read_only else self.store.clock("manifests")
        return now - self.store.modified_time(LEASE_PATH)

    def _stale_reason(self, rec: LeaseRecord) -> tuple[str | None, float | None]:
        """(why the lease is free to take, or None; its age on the store's clock when measured)."""
        if rec.released:
            return "released", None
        if (
            self.same_host_shortcut
            and rec.host == socket.gethostname()
            and rec.boot_id
            and rec.boot_id == _boot_id()
            and rec.pid_ns
            and rec.pid_ns == _pid_ns()
            and rec.pid != os.getpid()
            and _process_gone(rec.pid, rec.pid_start)
        ):
            return f"its driver (pid {rec.pid} on this host) is gone", None
        age = self._age_on_store_clock()
        if age > rec.ttl_s:
            return f"not renewed for {age:.0f} s (TTL {rec.ttl_s:g} s, on the store's clock)", age
        return None, age

    # -- acquiring -------------------------------------------------------------------------
    def _new_record(self, epoch: int) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(
            owner=self.owner,
            epoch=epoch,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=_pid_start(os.getpid()),
            boot_id=_boot_id(),
            pid_ns=_pid_ns(),
            command=self.command,
            ttl_s=self.ttl_s,
            acquired_at=now,
            renewed_at=now,
        )

    def acquire(self, min_epoch: int = 0) -> LeaseRecord:
        """Take the lease or raise :class:`LeaseHeldError`; returns the record now stored."""
        for _ in range(5):  # a lost compare-and-swap means another driver moved: look again
            cur = self.store.read_versioned(LEASE_PATH)
            if cur is None:
                rec = self._new_record(max(0, min_epoch) + 1)
                if self.store.create_exclusive(LEASE_PATH, rec.to_bytes()) or self._stored_is(rec):
                    return self._won(rec, "created")
                continue
            old = _record(self.store, cur[0])
            why, age = self._stale_reason(old)
            if why is None:
                again = self.store.read_versioned(LEASE_PATH)
                if again is None or again[1] != cur[1]:
                    continue  # rewritten while its age was read: that age is the new record's
                raise LeaseHeldError(self._held_message(old, age))
            rec = self._new_record(max(old.epoch, min_epoch) + 1)
            if self.store.replace_if_version(LEASE_PATH, rec.to_bytes(), cur[1]) or self._stored_is(rec):
                if not old.released:
                    log.warning(
                        "took over the lease of %s from %s (pid %s, %s): %s",
                        self.store.display(),
                        old.host,
                        old.pid,
                        old.owner,
                        why,
                    )
                return self._won(rec, f"taken over ({why})")
        raise LeaseHeldError(f"{self.store.display()}: other drivers keep changing the lease; try again")

    def _stored_is(self, rec: LeaseRecord) -> bool:
        """Whether the stored lease is exactly ``rec``: a conditional write this driver was told
        failed may have been applied (its reply lost, the client's retry then failing its own
        precondition: S3 answers 412). The record holds this driver's owner token and clock
        reading, so no other writer stores the same bytes."""
        got = self.store.read_versioned(LEASE_PATH)
        return got is not None and got[0] == rec.to_bytes()

    def _stored_mine(self) -> tuple[LeaseRecord, str] | None:
        """(record, version) of the stored lease when it is still this driver's acquisition (its
        owner and epoch, not released), else None. Only this driver writes such records, so one
        at another version than ours is a write of ours whose reply or read-back was lost."""
        got = self.store.read_versioned(LEASE_PATH)
        if got is None:
            return None
        rec = _record(self.store, got[0])
        mine = self.record is not None and rec.owner == self.owner and rec.epoch == self.record.epoch
        return (rec, got[1]) if mine and not rec.released else None

    def _won(self, rec: LeaseRecord, how: str) -> LeaseRecord:
        got = self.store.read_versioned(LEASE_PATH)
        if got is None or _record(self.store, got[0]).owner != self.owner:
            # only stores without conditional writes get here: two writers raced and the other won
            holder = _record(self.store, got[0]) if got else None
            raise LeaseHeldError(
                self._held_message(holder) if holder else f"{self.store.display()}: lost the lease race"
            )
        with self._lock:
            self.record, self._version = rec, got[1]
            self._renewed_mono = time.monotonic()
            self._lost = None
        log.info("lease on %s %s: owner %s, epoch %d", self.store.display(), how, self.owner, rec.epoch)
        return rec

    def _held_message(self, rec: LeaseRecord, age: float | None = None) -> str:
        beat = f"last renewed {max(0.0, age):.0f} s ago" if age is not None else "renewed"
        return (
            f"{self.store.display()} is held by another driver: `d4s {rec.command}` {rec.owner} on host "
            f"{rec.host} (pid {rec.pid}), epoch {rec.epoch}, since {_when(rec.acquired_at)} (its clock), {beat} "
            f"(TTL {rec.ttl_s:g} s). Wait for it to finish, or stop it; a lease whose "
            f"driver died is taken over once it is {rec.ttl_s:g} s old on the store's clock "
            f"(at once on the same host)"
        )

    # -- holding ---------------------------------------------------------------------------
    def renew(self) -> bool:
        """Extend the lease (compare-and-swap); False, and lost for good, when it is not ours any
        more. A store error anywhere in a renewal is a hiccup: the next beat tries again (the
        holder fences itself if they go on for ``FENCE_FRACTION`` of the TTL)."""
        with self._lock:
            if self.record is None or self._lost:
                return False
            try:
                return self._renew_locked(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - a store hiccup: try again at the next beat
                log.warning("could not renew the lease on %s: %s: %s", self.store.display(), type(exc).__name__, exc)
                return True

    def _renew_locked(self, t0: float) -> bool:
        for _ in range(2):
            nxt = LeaseRecord(**{**asdict(self.record), "renewed_at": time.time(), "beats": self.record.beats + 1})
            if self.store.replace_if_version(LEASE_PATH, nxt.to_bytes(), self._version):
                got = self.store.read_versioned(LEASE_PATH)
                if got is None or _record(self.store, got[0]).owner != self.owner:
                    self._lost = f"the lease on {self.store.display()} changed hands during renewal"
                    return False
                self.record, self._version, self._renewed_mono = nxt, got[1], t0
                return True
            mine = self._stored_mine()
            if mine is None:
                holder = self.holder()
                self._lost = f"the lease on {self.store.display()} was taken over by " + (
                    f"{holder.owner} on {holder.host} (pid {holder.pid})" if holder else "another driver"
                )
                log.error(self._lost)
                return False
            # still ours, at a version we did not see: a renewal applied whose reply (or read-back)
            # was lost. Adopt it; when it is this very renewal, it is done, else write again
            self.record, self._version = mine
            if mine[0] == nxt:
                self._renewed_mono = t0
                return True
        return True  # written twice, seen twice at another version of ours: the next beat goes on

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this driver may still write the output. Never waits
        for a renewal in progress (its store call may block): it reads what the last one left."""
        record, lost, renewed = self.record, self._lost, self._renewed_mono
        if record is None:
            raise LeaseLostError(f"no lease held on {self.store.display()}")
        if lost:
            raise LeaseLostError(lost)
        idle = time.monotonic() - renewed
        if idle > FENCE_FRACTION * self.ttl_s:
            raise LeaseLostError(
                f"the lease on {self.store.display()} was not renewed for {idle:.0f} s "
                f"(TTL {self.ttl_s:g} s): another driver may take it over"
            )

    def start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="d4s-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.renew():
                return

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.heartbeat_s))
            self._thread = None

    def release(self) -> None:
        """Give the lease up (a compare-and-swap to a released record: a taker needs no wait). A
        lease this driver fenced itself from is still released when the store shows it unchanged
        in its hands; one taken over is left alone."""
        self.stop_heartbeat()
        if not self._lock.acquire(timeout=min(self.ttl_s, 60.0)):  # a renewal stuck in the store: TTL frees it
            log.warning("could not release the lease on %s: a renewal is stuck", self.store.display())
            return
        try:
            if self.record is None:
                return
            try:
                for _ in range(2):
                    done = LeaseRecord(**{**asdict(self.record), "renewed_at": time.time(), "released": True})
                    if self.store.replace_if_version(LEASE_PATH, done.to_bytes(), self._version) or self._stored_is(
                        done
                    ):
                        break
                    mine = self._stored_mine()  # a renewal of ours landed unseen: release that version
                    if mine is None:
                        break
                    self.record, self._version = mine
            except Exception as exc:  # noqa: BLE001 - the TTL frees it anyway
                log.warning("could not release the lease on %s: %s", self.store.display(), exc)
            self.record = None
        finally:
            self._lock.release()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lease_status(store: Store) -> dict | None:
    """The lease record of an output for ``d4s status`` (read only; None when none was ever taken):
    who holds it, since when, whether it was released, and ``stale``: why a lease not released is
    no longer held (its driver gone, not renewed within its TTL), None while a driver holds it.
    Times are the holder's clock."""
    got = store.read_versioned(LEASE_PATH)
    if got is None:
        return None
    rec = _record(store, got[0])
    stale = None if rec.released else Lease(store, read_only=True)._stale_reason(rec)[0]
    return {
        "owner": rec.owner,
        "command": rec.command,
        "host": rec.host,
        "pid": rec.pid,
        "epoch": rec.epoch,
        "acquired_at": rec.acquired_at,
        "renewed_at": rec.renewed_at,
        "ttl_s": rec.ttl_s,
        "released": rec.released,
        "stale": stale,
    }


def live_owner(store: Store) -> str | None:
    """The owner (the build id) of the lease on an output when a driver holds it now: not released,
    renewed within its TTL (on this host's clock: a reader writes no clock probe), and on this host
    not a driver known gone. None otherwise. Read only (``d4s verify`` tells a live build's shards
    from a dead driver's)."""
    probe = Lease(store, read_only=True)
    rec = probe.holder()
    if rec is None:
        return None
    why, _ = probe._stale_reason(rec)
    return None if why else rec.owner
