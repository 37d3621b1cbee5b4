"""Output and dataset roots are paths, never patterns: a folder named with glob characters
(``run[1]``, ``o*``) is read and written literally, and never reaches a sibling it would match."""

from __future__ import annotations

import pytest

from manifests.store import ManifestStore
from pipeline.storage import Store


@pytest.mark.parametrize("name", ["run[1]", "o*", "a?b"])
def test_reads_removes_and_globs_take_the_root_literally(tmp_path, name):
    root = tmp_path / name
    sibling = {"run[1]": "run1", "o*": "oo", "a?b": "axb"}[name]
    for d in (root, tmp_path / sibling):
        (d / "cache").mkdir(parents=True)
        (d / "cache" / "x.npz").write_bytes(d.name.encode())
    store = Store(str(root))
    # read_many: fsspec's cat expanded the root as a pattern (FileNotFoundError, or the sibling's bytes)
    assert store.read_many(["cache/x.npz"]) == {"cache/x.npz": name.encode()}
    assert store.glob("*/x.npz") == [store.path("cache/x.npz")]  # not the sibling's file
    store.remove("cache/x.npz")  # rm expanded the pattern: it deleted the sibling's file too
    assert not (root / "cache" / "x.npz").exists() and (tmp_path / sibling / "cache" / "x.npz").exists()
    store.remove("cache")
    assert not (root / "cache").exists() and (tmp_path / sibling / "cache").exists()


def test_the_ledger_of_an_output_named_with_brackets(tmp_path):
    """Every command on such an output failed reading the ledger (build: after all its work)."""
    ms = ManifestStore(Store(str(tmp_path / "out[1]")))
    ms.append_events([{"shard_id": "s-0", "state": "running", "build_id": "b", "started_at": 1.0}])
    ms.append_events([{"shard_id": "s-0", "state": "failed", "build_id": "b", "error": "x"}])
    assert [e["state"] for e in ms.ledger_events()] == ["running", "failed"]
