"""``d4s verify`` reads each shard once: the sha256 of every byte and the tar's sample keys in
order (shards are read in parallel within a memory budget; one after another, the full build
took hours). A shard larger than the budget is read alone, never waits for ever."""

from __future__ import annotations

import hashlib
import io
import tarfile

from pipeline.storage import Store
from pipeline.verify import _read_shard


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_shard_streamed_gives_its_hash_and_keys_in_order(tmp_path):
    data = _tar([("b__1.meta.json", b"{}"), ("b__1.rgb.000.jpg", b"x" * 3000), ("a__0.meta.json", b"{}" * 9000)])
    store = Store(str(tmp_path))
    store.write_bytes_atomic("shards/s.tar", data)
    sha, order, why = _read_shard(store, "shards/s.tar")
    assert sha == hashlib.sha256(data).hexdigest() and why is None
    assert order == [("b__1", {"meta.json", "rgb.000.jpg"}), ("a__0", {"meta.json"})]


def test_a_truncated_shard_is_an_unreadable_tar_with_the_hash_of_what_is_there(tmp_path):
    data = _tar([("a__0.meta.json", b"{}" * 9000), ("a__0.c2w.npy", b"y" * 5000)])[:10_000]
    store = Store(str(tmp_path))
    store.write_bytes_atomic("shards/s.tar", data)
    sha, order, why = _read_shard(store, "shards/s.tar")
    assert order is None and why and sha == hashlib.sha256(data).hexdigest()


def test_the_memory_budget_lets_a_shard_larger_than_it_through_alone():
    import threading

    from pipeline.verify import _ByteBudget

    b = _ByteBudget(100)
    assert b.take(60) == 60
    got = []
    t = threading.Thread(target=lambda: got.append(b.take(500)))  # larger than the budget: waits for all
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got
    b.give(60)
    t.join(5)
    assert got == [100] and b.used == 100
    b.give(100)
    assert b.used == 0
