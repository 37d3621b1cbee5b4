"""gsplat JIT-builds its CUDA extension at first import and deletes an unfinished build directory, so
processes importing it at once into one cache break each other's build (seen on 2 H200s: every rank
failed). The cache is per node (~/.cache/torch_extensions), or one for all nodes when home is shared:
rank 0 builds first, then the first rank of each other node (its own cache, or loads the shared one),
then everyone else; each step after a barrier."""

import threading
import time

import pytest


def _run(ranks: list[tuple[int, int]], shared_cache: bool, build_s: float = 0.15):
    """ranks: (rank, local_rank) per process; caches keyed by node (or one shared)."""
    from training.render_gsplat import build_backend_once

    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    caches: dict[str, dict[str, threading.Event]] = {}
    barrier = threading.Barrier(len(ranks))
    node_of = {}
    node = -1
    for rank, local in ranks:
        node += local == 0
        node_of[rank] = node

    def fake_import(rank):
        key = "shared" if shared_cache else f"node{node_of[rank]}"

        def imp():
            with lock:
                c = caches.setdefault(key, {"building": threading.Event(), "built": threading.Event()})
                events.append(("start", rank))
            if not c["built"].is_set():
                if c["building"].is_set():  # a second process in the JIT build of the same cache: the race
                    raise ImportError(f"rank {rank}: gsplat_cuda.so: cannot open shared object file")
                c["building"].set()
                time.sleep(build_s)
                c["built"].set()
            with lock:
                events.append(("done", rank))

        return imp

    errors = []

    def main(rank, local):
        try:
            build_backend_once(rank, local, barrier.wait, import_backend=fake_import(rank))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=main, args=rl) for rl in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return events, errors


@pytest.mark.parametrize("shared_cache", [False, True])
@pytest.mark.parametrize(
    "layout", [[(0, 0), (1, 1)], [(0, 0), (1, 1), (2, 0), (3, 1)], [(0, 0), (1, 1), (2, 2), (3, 3)]]
)
def test_every_rank_loads_without_racing_the_build(layout, shared_cache):
    events, errors = _run(layout, shared_cache)
    assert errors == []
    assert events[:2] == [("start", 0), ("done", 0)], events  # rank 0 alone first
    assert sorted(r for kind, r in events if kind == "done") == [r for r, _ in layout]


def test_the_builder_failing_fails_before_the_barrier():
    from training.render_gsplat import build_backend_once

    calls = []

    def bad_import():
        raise ImportError("no CUDA toolkit")

    with pytest.raises(ImportError, match="no CUDA toolkit"):
        build_backend_once(0, 0, lambda: calls.append("barrier"), import_backend=bad_import)
    assert calls == []  # the error surfaces on rank 0; the others stop at the barrier's timeout
