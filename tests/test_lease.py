"""One driver per output: the lease in the output store, on a filesystem and on S3 (moto's server).

A second driver is refused with who holds the output and since when; a stale lease (no heartbeat
for its TTL, judged on the store's clock, so a host with a wrong clock cannot take it early) is
taken over with a larger epoch; a holder that lost its lease finds out before it writes again; a
lease whose driver died on this host is taken at once; of many drivers racing, exactly one wins.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from manifests.lease import LEASE_PATH, Lease, LeaseHeldError, LeaseLostError
from pipeline.storage import Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "out"))
    srv = request.getfixturevalue("s3_env")
    return Store(srv.url(f"out-{tmp_path.name}"))


def test_second_driver_is_refused_with_holder_and_since(store):
    a = Lease(store, command="build", ttl_s=60)
    rec = a.acquire()
    assert rec.epoch == 1 and a.check() is None
    b = Lease(store, command="resume", ttl_s=60)
    with pytest.raises(LeaseHeldError) as err:
        b.acquire()
    msg = str(err.value)
    assert rec.host in msg and f"pid {rec.pid}" in msg and "since" in msg and a.owner in msg
    a.release()
    assert b.acquire().epoch == 2  # a released lease is free at once, with the next epoch


def _past_ttl(store: Store, ttl: float) -> None:
    """Sleep until a lease written now is older than ``ttl`` on the store's clock (S3 stamps whole seconds)."""
    time.sleep(ttl + (0.3 if store.is_local else 1.2))


def test_stale_lease_is_taken_over_after_its_ttl_on_the_stores_clock(store, monkeypatch):
    a = Lease(store, ttl_s=1)
    a.acquire()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)  # the second host's clock is an hour ahead
    b = Lease(store, ttl_s=1, same_host_shortcut=False)
    with pytest.raises(LeaseHeldError):
        b.acquire()  # still fresh on the store's clock: a wrong host clock does not expire it
    _past_ttl(store, 1)  # no heartbeat for longer than the TTL
    rec = b.acquire()
    assert rec.epoch == 2 and rec.owner == b.owner
    assert a.renew() is False  # the old holder cannot renew a lease that is no longer its own
    with pytest.raises(LeaseLostError):
        a.check()


def test_heartbeat_keeps_a_lease_and_the_holder_fences_itself(tmp_path):
    store = Store(str(tmp_path / "out"))
    a = Lease(store, ttl_s=1.0, heartbeat_s=0.2)
    a.acquire()
    a.start_heartbeat()
    try:
        time.sleep(1.6)  # longer than the TTL, renewed all along
        with pytest.raises(LeaseHeldError):
            Lease(store, ttl_s=1.0, same_host_shortcut=False).acquire()
        assert a.check() is None and a.record.beats >= 3
    finally:
        a.stop_heartbeat()
    time.sleep(0.9)  # no renewal for most of the TTL: the holder stops trusting its lease
    with pytest.raises(LeaseLostError):
        a.check()


def test_lease_of_a_dead_driver_on_this_host_is_taken_at_once(store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Lease(store, ttl_s=3600).acquire()
    data, version = store.read_versioned(LEASE_PATH)
    rec = json.loads(data)
    rec["pid"], rec["pid_start"] = dead.pid, ""  # as if a driver with that (now gone) pid held it
    assert store.replace_if_version(LEASE_PATH, json.dumps(rec).encode(), version)
    rec = Lease(store, ttl_s=3600).acquire()
    assert rec.epoch == 2


def test_a_driver_in_another_pid_namespace_is_not_judged_by_this_ones_pids(tmp_path):
    """Containers on one kernel share the boot id and, with host networking, the hostname, but not
    their pids: a live driver in another pid namespace looked gone here and its lease was taken at
    once, so two drivers wrote one output until the holder's next heartbeat. The shortcut now
    needs the holder's pid namespace to be this one; otherwise the TTL decides."""
    store = Store(str(tmp_path / "out"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Lease(store, ttl_s=3600).acquire()
    data, version = store.read_versioned(LEASE_PATH)
    rec = json.loads(data)
    assert rec["pid_ns"]  # recorded by the holder
    rec["pid"], rec["pid_start"], rec["pid_ns"] = dead.pid, "", "pid:[1]"  # its pids are not ours
    assert store.replace_if_version(LEASE_PATH, json.dumps(rec).encode(), version)
    with pytest.raises(LeaseHeldError):
        Lease(store, ttl_s=3600).acquire()
    rec.pop("pid_ns")  # a record of an older d4s: its namespace is unknown, so no shortcut either
    data, version = store.read_versioned(LEASE_PATH)
    assert store.replace_if_version(LEASE_PATH, json.dumps(rec).encode(), version)
    with pytest.raises(LeaseHeldError):
        Lease(store, ttl_s=3600).acquire()


def test_min_epoch_puts_the_lease_after_the_ledger(store):
    assert Lease(store).acquire(min_epoch=41).epoch == 42


@pytest.mark.parametrize("stale", [False, True])
def test_racing_drivers_exactly_one_wins(store, stale):
    if stale:
        Lease(store, ttl_s=1).acquire()
        _past_ttl(store, 1)
    wins, refusals, errors = [], [], []
    barrier = threading.Barrier(6)

    def contend():
        lease = Lease(store, ttl_s=600, same_host_shortcut=False)
        barrier.wait()
        try:
            wins.append(lease.acquire())
        except LeaseHeldError:
            refusals.append(lease)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(wins) == 1 and len(refusals) == 5
    assert Lease(store, same_host_shortcut=False).holder().owner == wins[0].owner


def _lose_reply_once(store: Store, name: str) -> None:
    """The store applies the next ``name`` write but the driver hears a failure, as when a PUT's
    reply is lost and the client's retry of it fails its own precondition (S3 412)."""
    real = getattr(store, name)

    def applied_then_refused(*a, **kw):
        setattr(store, name, real)
        assert real(*a, **kw)
        return False

    setattr(store, name, applied_then_refused)


def test_a_lost_reply_to_the_lease_writes_keeps_the_lease(store):
    """A renewal (or the first create) that the store applied but whose reply was lost read as a
    takeover "by" the driver itself: the build stopped with "lease lost" and never released."""
    lease = Lease(store, ttl_s=60)
    _lose_reply_once(store, "create_exclusive")
    lease.acquire()  # was: LeaseHeldError naming itself
    _lose_reply_once(store, "replace_if_version")
    assert lease.renew() and lease.renew()
    lease.check()
    _lose_reply_once(store, "replace_if_version")
    lease.release()
    assert Lease(store).holder().released  # another driver need not wait for the TTL


def test_a_failed_read_after_a_renewal_does_not_stop_the_heartbeat(store):
    """The read-back after a renewal raised out of renew() and ended the heartbeat thread: the
    driver fenced itself at 80 % of the TTL and its release used a stale version."""
    lease = Lease(store, ttl_s=60)
    lease.acquire()
    real = store.read_versioned
    calls = {"n": 0}

    def fails_once(rel):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("simulated one-off store error")
        return real(rel)

    store.read_versioned = fails_once
    assert lease.renew()  # the hiccup: try again at the next beat
    store.read_versioned = real
    assert lease.renew()
    lease.check()
    lease.release()
    assert Lease(store).holder().released


def test_a_lease_read_while_it_is_rewritten_is_read_again(tmp_path):
    """s3fs raises FileExpired (EBUSY) when the object changes between its HEAD and GET (a
    renewal landing): a second driver crashed with a traceback instead of being refused."""
    import errno

    store = Store(str(tmp_path / "out"))
    Lease(store, ttl_s=60).acquire()
    real = store.fs.open
    calls = {"n": 0}

    def expired_once(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EBUSY, "The remote file no longer exists (ETag changed)")
        return real(*a, **kw)

    store.fs.open = expired_once
    with pytest.raises(LeaseHeldError):
        Lease(store, ttl_s=60).acquire()


def test_a_stuck_lock_neither_freezes_the_driver_nor_its_fence(tmp_path, monkeypatch):
    """Another process holding lease.json.lock (a driver stuck in a takeover, a lock left on NFS)
    blocked the renewal in flock without end, and check() and release() waited on it: the driver
    froze, deaf to Ctrl-C, instead of fencing itself at 80 % of the TTL."""
    import fcntl
    import os

    import pipeline.storage as storage

    monkeypatch.setattr(storage, "LOCK_TIMEOUT_S", 0.3)
    store = Store(str(tmp_path / "out"))
    lease = Lease(store, ttl_s=2.0)
    lease.acquire()
    fd = os.open(store.path(LEASE_PATH) + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: conflicts with the store's own flock
    try:
        t0 = time.monotonic()
        assert lease.renew()  # a hiccup: retried at the next beat
        assert time.monotonic() - t0 < 2.0
        time.sleep(1.7)  # past 0.8 x TTL without a renewal
        with pytest.raises(LeaseLostError, match="not renewed"):
            lease.check()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    lease.release()
    assert Lease(store).holder().released


def test_a_takeover_between_the_reads_of_a_refusal_names_the_new_holder(tmp_path):
    """The refusal read the record, then its age in a second request: a takeover landing in
    between made it name the previous holder with the new record's age ("last renewed 0 s
    ago" for a driver that was in fact dead). A record whose version moved is read again."""
    store = Store(str(tmp_path / "out"))
    old = Lease(store, command="build", ttl_s=60)
    old.acquire()
    new = Lease(store, command="resume", ttl_s=60)
    real = store.modified_time

    def takeover_lands_first(rel):
        if rel.endswith("lease.json") and new.record is None:
            got = store.read_versioned(LEASE_PATH)
            rec = new._new_record(2)
            assert store.replace_if_version(LEASE_PATH, rec.to_bytes(), got[1])
            new.record = rec
        return real(rel)

    store.modified_time = takeover_lands_first
    with pytest.raises(LeaseHeldError) as err:
        Lease(store, command="verify", ttl_s=60).acquire()
    msg = str(err.value)
    assert new.owner in msg and "d4s resume" in msg and old.owner not in msg
