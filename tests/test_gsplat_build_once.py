"""gsplat JIT-builds its CUDA extension at first import and deletes an unfinished build directory, so ranks
of a node importing it at once break each other's build (seen on 2 H200s). One builder per node imports it
first; the other ranks load it only after a barrier that the builder reaches once its import finished."""

import threading
import time

import pytest


def _run_ranks(n_ranks: int, build_s: float):
    from training.render_gsplat import build_backend_once

    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    building = threading.Event()
    built = threading.Event()
    barrier = threading.Barrier(n_ranks)

    def fake_import(rank):
        def imp():
            with lock:
                events.append(("import-start", rank))
            if not built.is_set():
                if building.is_set():  # a second process entering the JIT build while one runs: the race
                    raise ImportError(f"rank {rank}: gsplat_cuda.so: cannot open shared object file")
                building.set()
                time.sleep(build_s)
                built.set()
            with lock:
                events.append(("import-done", rank))

        return imp

    errors = []

    def rank_main(rank):
        try:
            build_backend_once(rank == 0, barrier.wait, import_backend=fake_import(rank))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return events, errors


@pytest.mark.parametrize("n_ranks", [2, 4])
def test_one_builder_per_node_then_the_others(n_ranks):
    events, errors = _run_ranks(n_ranks, build_s=0.2)
    assert errors == []
    assert events[:2] == [("import-start", 0), ("import-done", 0)], events
    assert sorted(r for kind, r in events if kind == "import-done") == list(range(n_ranks))


def test_the_builder_failing_fails_before_the_barrier():
    from training.render_gsplat import build_backend_once

    calls = []

    def bad_import():
        raise ImportError("no CUDA toolkit")

    with pytest.raises(ImportError, match="no CUDA toolkit"):
        build_backend_once(True, lambda: calls.append("barrier"), import_backend=bad_import)
    assert calls == []  # the error surfaces on the builder; the others stop at the barrier's timeout
