"""Discovery at full scale: what a plan costs is a few listings per folder level and the few bytes
it reads of each metadata file, never a walk of every frame file or a download of every source byte.

Measured through the filesystem itself (a counting fsspec filesystem; bytes fetched from a local S3
server), never wall time. Before: TartanAir's 4-deep glob, MatrixCity's and Spring's globs listed
and stat-ed every file of every frame folder (480k ``info`` calls to find 80 pose files); on S3,
Stereo4D's read of an npz's small ``timestamps`` array and Kubric's reads of 12-byte record headers
fetched the whole files (s3fs's 50 MiB read-ahead block); RealEstate10K made two serial requests
per camera file.
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.demo.build_demo import write_demo_data
from stages.ingest import get_adapter


class CountingFS(LocalFileSystem):
    """The local filesystem, recording every listing, stat and open (fsspec's own inner calls too:
    ``glob`` -> ``find`` -> ``walk`` -> ``ls`` -> ``info`` per entry all land here)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str]] = []

    def _log(self, op, path):
        self.calls.append((op, path.path if isinstance(path, os.DirEntry) else str(path)))

    def ls(self, path, detail=False, **kwargs):
        self._log("ls", path)
        return super().ls(path, detail=detail, **kwargs)

    def info(self, path, **kwargs):
        self._log("info", path)
        return super().info(path, **kwargs)

    def exists(self, path, **kwargs):
        self._log("exists", path)
        return super().exists(path, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        self._log("open", path)
        return super()._open(path, mode=mode, **kwargs)


def _discover_counting(adapter):
    fs = CountingFS(skip_instance_cache=True)
    adapter.store.fs = fs
    return adapter.discover(), fs.calls


def _pad_frame_folders(root, n):
    """``n`` more files in every folder that holds only files (the per-frame folders)."""
    leaves = [p for p in root.rglob("*") if p.is_dir() and not any(c.is_dir() for c in p.iterdir())]
    assert leaves
    for d in leaves:
        for i in range(n):
            (d / f"zz_pad_{i:04d}.bin").write_bytes(b"")


@pytest.mark.parametrize("dataset", ["tartanair", "matrixcity", "spring"])
def test_discovery_cost_does_not_grow_with_the_frame_files(tmp_path, dataset):
    write_demo_data(tmp_path, [dataset], scenes=2)
    root = tmp_path / dataset
    if dataset == "tartanair":  # the release unpacked with its env folder doubled: found too
        shutil.copytree(root / "demoenv0" / "Easy" / "P000", root / "demoenv7" / "demoenv7" / "Hard" / "P007")
    adapter = get_adapter(dataset, str(root))
    before, calls_before = _discover_counting(adapter)
    _pad_frame_folders(root, 300)
    after, calls_after = _discover_counting(adapter)
    assert after == before and len(before) == (3 if dataset == "tartanair" else 2)
    if dataset == "tartanair":
        assert [s.scene for s in before] == ["demoenv0/Easy/P000", "demoenv0/Hard/P001", "demoenv7/demoenv7/Hard/P007"]
    padded = [c for c in calls_after if "zz_pad" in c[1]]
    assert not padded, f"{len(padded)} calls on frame files, e.g. {padded[:3]}"
    assert len(calls_after) == len(calls_before), (len(calls_before), len(calls_after))
    assert len(calls_after) < 80, calls_after


# -- object storage: bytes fetched ------------------------------------------------------------------


def test_stereo4d_discovery_on_s3_fetches_the_timestamps_not_the_tracks(s3_env, s3_traffic):
    rng = np.random.default_rng(0)
    big = rng.random((2 << 20) // 4, dtype=np.float32)  # 2 MiB before and after the timestamps
    buf = io.BytesIO()
    np.savez(buf, track_coordinates=big, timestamps=np.arange(128, dtype=np.int64) * 33_333, track_indices=big)
    body = buf.getvalue()
    source = 3 * len(body)
    for i in range(3):
        s3_env.put(f"s4/train/vid{i:03d}_1000.npz", body)
    adapter = get_adapter("stereo4d", s3_env.url("s4"))
    scenes = adapter.discover()
    assert [(s.scene, s.num_frames, s.problem) for s in scenes] == [
        (f"train/vid{i:03d}_1000", 128, ()) for i in range(3)
    ]
    assert s3_traffic["bytes"] < 0.1 * source, (s3_traffic["bytes"], source)


def test_kubric_discovery_on_s3_fetches_record_headers_not_records(s3_env, s3_traffic, tmp_path):
    from pipeline.demo.render import render
    from pipeline.demo.writers import kubric_movi_f as writer
    from stages.ingest.kubric import frame_record, iter_record_offsets

    shard = "movi_f/48x48/1.0.0/movi_f-train.tfrecord-00000-of-00001"
    writer.write(render(writer.demo_spec(0, seed=21)), tmp_path, f"{shard}/00000")
    first = (tmp_path / shard).read_bytes()
    assert len(iter_record_offsets(io.BytesIO(first), shard)) == 1
    pad = os.urandom(2 << 20)
    body = first + b"".join(frame_record(pad) for _ in range(4))  # 4 more records of 2 MiB
    s3_env.put(f"ku/{shard}", body)
    adapter = get_adapter("kubric_movi_f", s3_env.url("ku"))
    scenes = adapter.discover()
    assert [s.scene for s in scenes] == [f"{shard}/{k:05d}" for k in range(5)]
    assert all(not s.problem for s in scenes)
    # the first record (read whole: its frame count) and a small block per record header
    head, rest = len(first), len(body) - len(first)
    assert s3_traffic["bytes"] < head + 0.1 * rest, (s3_traffic["bytes"], head, rest)


def test_realestate10k_camera_files_on_s3_one_request_each(s3_env, s3_traffic):
    n = 12
    for i in range(n):
        lines = [f"https://www.youtube.com/watch?v=vid{i:08d}"]
        lines += [f"{1000 + 33_366 * t} 0.5 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0" for t in range(20)]
        s3_env.put(f"re/train/{i:016x}.txt", ("\n".join(lines) + "\n").encode())
    adapter = get_adapter("realestate10k", s3_env.url("re"))
    s3_traffic["requests"] = 0
    scenes = adapter.discover()
    assert [(s.scene, s.num_frames) for s in scenes] == [(f"train/{i:016x}", 20) for i in range(n)]
    # a few listings, then one GET per camera file (was a HEAD and a GET, one file after another)
    assert s3_traffic["requests"] <= n + 6, s3_traffic["requests"]


@pytest.mark.parametrize("dataset", ["tartanair", "spring"])
def test_folder_level_discovery_on_s3_finds_what_it_finds_locally(s3_env, s3_traffic, tmp_path, dataset):
    write_demo_data(tmp_path, [dataset], scenes=2)
    root = tmp_path / dataset
    if dataset == "tartanair":
        shutil.copytree(root / "demoenv0" / "Easy" / "P000", root / "demoenv7" / "demoenv7" / "Hard" / "P007")
    url = s3_env.put_tree(root, dataset)
    local = get_adapter(dataset, str(root)).discover()
    s3_traffic["requests"] = 0
    remote = get_adapter(dataset, url).discover()
    assert [(s.scene, s.num_frames, s.problem) for s in remote] == [(s.scene, s.num_frames, s.problem) for s in local]
    assert len(local) == (3 if dataset == "tartanair" else 2) and not any(s.problem for s in local)
    assert s3_traffic["requests"] < 60, s3_traffic["requests"]
