"""End-to-end builds on local Ray: exactly-once, determinism, faults, resume, verify, bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import tartanair_config, write_tartanair

from manifests.store import ManifestStore
from pipeline.runner import build, resume
from pipeline.sample_format import DEPTH_REL_ERROR_BOUND, decode_sample
from pipeline.status import collect_status
from pipeline.storage import Store
from pipeline.verify import verify


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "shards").rglob("*.tar"))}


def all_keys(out: Path) -> list[str]:
    keys = []
    for p in sorted((out / "shards").rglob("*.tar")):
        keys += [s["__key__"] for s in wds.WebDataset(str(p), shardshuffle=False, empty_check=False)]
    return keys


def planned_ids(out: Path) -> list[str]:
    return [c["clip_id"] for c in ManifestStore(Store(str(out))).clips()]


def test_build_roundtrip_equals_ground_truth(tmp_path, tartan_data, ray_local):
    data, scenes = tartan_data
    cfg = tartanair_config(tmp_path, data)
    s = build(cfg, show_progress=False)
    out = tmp_path / "out"
    assert s.ok and s.clips_failed == 0 and s.clips_written == len(planned_ids(out)) == 6
    assert verify(str(out)).ok
    # rendered truth -> raw TartanAir files -> adapter -> shard -> reader
    truth = {ws.scene_id: (r, ws) for r, ws in scenes}
    for p in sorted((out / "shards").rglob("*.tar")):
        for sample in wds.WebDataset(str(p), shardshuffle=False):
            clip = decode_sample(sample)
            r, ws = truth[clip.meta.scene]
            fr = clip.meta.frame_indices
            np.testing.assert_allclose(clip.c2w, ws.expected_c2w(r.c2w[fr]), atol=1e-5)
            np.testing.assert_allclose(clip.intrinsics, r.intrinsics[fr], atol=1e-9)
            rel = np.abs(clip.depth - r.depth[fr]) / r.depth[fr]
            assert clip.depth_valid.all() and rel.max() <= DEPTH_REL_ERROR_BOUND * 1.001 + 1e-6
            assert np.abs(clip.rgb.astype(int) - r.rgb[fr]).mean() < 6  # JPEG q95
            assert clip.meta.depth_source == "gt" and clip.meta.adapter_version == "tartanair/1"
    st = collect_status(str(out))
    assert st["datasets"]["tartanair"] == {"clips_done": 6, "clips_failed": 0, "clips_pending": 0}
    assert st["shards"] == {"done": 3, "failed": 0, "running": 0, "pending": 0}
    index = ManifestStore(Store(str(out))).index()
    assert sorted(r["key"] for r in index) == sorted(planned_ids(out))
    # the index offsets point at each sample's first tar member
    import tarfile

    for row in index:
        with open(out / row["shard_path"], "rb") as f:
            f.seek(row["offset"])
            hdr = tarfile.TarInfo.frombuf(f.read(512), tarfile.ENCODING, "surrogateescape")
            assert hdr.name.startswith(row["key"] + ".")


def test_two_builds_are_byte_identical_and_rebuild_is_a_noop(tmp_path, tartan_data, ray_local):
    """The same data under another root, built into another output: the same bytes in every shard."""
    data, _ = tartan_data
    moved = tmp_path / "elsewhere" / "tartanair"
    shutil.copytree(data, moved)
    build(tartanair_config(tmp_path, data, "a"), show_progress=False)
    build(tartanair_config(tmp_path, moved, "b", max_inflight_shards=1), show_progress=False)
    a, b = shard_files(tmp_path / "a"), shard_files(tmp_path / "b")
    assert a and a == b
    again = build(tartanair_config(tmp_path, data, "a"), show_progress=False)
    assert again.shards_skipped == 3 and again.shards_done == 0


def test_build_continues_from_a_moved_dataset_root(tmp_path, tartan_data, ray_local):
    """Datasets moved to another mount: building the same output from the new root is a resume
    (roots are not content), it redoes only what is missing, and later resumes read the new root."""
    data, _ = tartan_data
    build(tartanair_config(tmp_path, data), show_progress=False)
    out = tmp_path / "out"
    before = shard_files(out)
    lost = sorted((out / "shards").rglob("*.tar"))[1]
    lost.unlink()
    moved = tmp_path / "mnt2" / "tartanair"
    shutil.move(str(data), str(moved))
    s = build(tartanair_config(tmp_path, moved), show_progress=False)
    assert s.ok and s.shards_skipped == 2 and s.shards_done == 1
    assert shard_files(out) == before and verify(str(out)).ok
    assert str(moved) in (out / "config.resolved.yaml").read_text()


def test_worker_crash_is_retried_every_clip_exactly_once(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    cfg = tartanair_config(tmp_path, data, fault={"worker_exit_on_clip": 3, "marker_dir": str(tmp_path / "marks")})
    s = build(cfg, show_progress=False)
    assert (tmp_path / "marks" / "worker_exit_3").exists()  # the crash really happened
    out = tmp_path / "out"
    keys = all_keys(out)
    assert sorted(keys) == sorted(planned_ids(out)) and len(keys) == len(set(keys))
    assert s.clips_failed == 0 and verify(str(out)).ok


def _run_cli(*args, cwd=None):
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_driver_killed_between_shards_then_resume_matches_clean_build(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    build(tartanair_config(tmp_path, data, "clean"), show_progress=False)
    cfg = tartanair_config(tmp_path, data, "crashy", fault={"driver_exit_after_shards": 1}, max_inflight_shards=1)
    cfg_path = tmp_path / "crashy.yaml"
    cfg_path.write_text(cfg.to_yaml())
    r = _run_cli("build", str(cfg_path), "--no-progress")
    assert r.returncode == 19, r.stderr[-2000:]
    st = collect_status(str(tmp_path / "crashy"))
    assert st["shards"]["done"] == 1 and st["shards"]["pending"] == 2
    tp = st["throughput"]  # rate of the crashed build; stopped, so no ETA for the two pending shards
    assert tp["clips"] == 2 and tp["clips_per_s"] > 0
    assert tp["stopped"] and tp["eta_s"] is None
    assert tp["clips_left"] == st["datasets"]["tartanair"]["clips_pending"] > 0
    # resume must not re-inject the fault: clear it as an operator would
    s = resume(str(tmp_path / "crashy"), show_progress=False, overrides={"fault": {}})
    assert s.shards_skipped == 1 and s.shards_done == 2
    assert shard_files(tmp_path / "crashy") == shard_files(tmp_path / "clean")
    assert verify(str(tmp_path / "crashy")).ok


def test_verify_catches_flipped_byte_and_missing_shard_and_resume_repairs(tmp_path, tartan_data, ray_local):
    data, _ = tartan_data
    build(tartanair_config(tmp_path, data), show_progress=False)
    out = tmp_path / "out"
    tars = sorted((out / "shards").rglob("*.tar"))
    raw = bytearray(tars[0].read_bytes())
    raw[700] ^= 0xFF
    tars[0].write_bytes(bytes(raw))
    tars[1].unlink()
    (out / "shards" / "tartanair" / "stray.tar.tmp-1234").write_bytes(b"partial")
    rep = verify(str(out))
    text = "\n".join(rep.problems)
    assert not rep.ok and "sha256 mismatch" in text and "missing" in text and "stray" in text
    s = resume(str(out), show_progress=False)
    assert s.shards_done == 2 and s.shards_skipped == 1
    assert verify(str(out)).ok


def test_a_copied_output_is_resumed_where_it_is_and_a_stale_index_is_caught(tmp_path, tartan_data, ray_local):
    """``d4s resume COPY`` repairs the copy, not the output its recorded config names (it used to
    take that output's lease and leave the copy broken); ``verify`` compares the index with the
    ledger (a driver that dies between the last shard and the index leaves a stale one, which
    training then refuses while verify said OK)."""
    data, _ = tartan_data
    build(tartanair_config(tmp_path, data), show_progress=False)
    out, copy = tmp_path / "out", tmp_path / "copy"
    shutil.copytree(out, copy)
    original = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    tars = sorted((copy / "shards").rglob("*.tar"))
    tars[0].write_bytes(tars[0].read_bytes()[:1000])
    s = resume(str(copy), show_progress=False)
    assert s.shards_done == 1 and s.output == str(copy)
    assert verify(str(copy)).ok
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == original

    ms = ManifestStore(Store(str(copy)))
    rows = ms.index()
    rows[1] = {**rows[1], "shard_sha256": "0" * 64}
    rows[2] = {**rows[2], "offset": rows[2]["offset"] + 512}
    ms.write_index(rows)
    rep = verify(str(copy))
    assert not rep.ok and any("index.parquet" in p and "2 rows" in p for p in rep.problems), rep.problems
    resume(str(copy), show_progress=False)
    assert verify(str(copy)).ok


def test_bad_inputs_are_reported_and_skipped(tmp_path, ray_local):
    data = tmp_path / "data"
    write_tartanair(data, n_scenes=3, frames=10)
    scenes = sorted(p for p in data.glob("*/*/P*"))
    # scene 0: truncated PNG in frame 1; scene 1: NaN pose on frame 5; scene 2: missing depth of frame 8
    png = scenes[0] / "image_left" / "000001_left.png"
    png.write_bytes(png.read_bytes()[:200])
    lines = (scenes[1] / "pose_left.txt").read_text().splitlines()
    lines[5] = "nan " + lines[5].split(" ", 1)[1]
    (scenes[1] / "pose_left.txt").write_text("\n".join(lines) + "\n")
    (scenes[2] / "depth_left" / "000008_left_depth.npy").unlink()
    cfg = tartanair_config(tmp_path, data)
    s = build(cfg, show_progress=False)
    out = tmp_path / "out"
    reasons = {f["clip_id"]: f for f in s.failures}
    assert len(reasons) == 3 and s.clips_written == 6
    by_scene = {f["clip_id"].split("__")[1]: f for f in s.failures}
    assert "truncated" in by_scene["demoenv0-Easy-P000"]["reason"] and by_scene["demoenv0-Easy-P000"]["path"].endswith(
        "000001_left.png"
    )
    assert "NaN" in by_scene["demoenv0-Hard-P001"]["reason"] and by_scene["demoenv0-Hard-P001"]["path"].endswith(
        "pose_left.txt"
    )
    assert "missing" in by_scene["demoenv1-Easy-P002"]["reason"] and by_scene["demoenv1-Easy-P002"]["path"].endswith(
        "000008_left_depth.npy"
    )
    keys = set(all_keys(out))
    assert not keys & set(reasons) and len(keys) == 6
    st = collect_status(str(out))
    assert st["datasets"]["tartanair"]["clips_failed"] == 3
    assert verify(str(out)).ok  # failed clips are recorded, so the output is consistent


@pytest.mark.slow
def test_two_demo_builds_in_different_folders_are_byte_identical(tmp_path, ray_local):
    """The demo renders its data under OUT/demo_data: two outputs read two roots. All nine layouts,
    model stages included, give the same shard bytes (meta.json's config_hash too)."""
    from pipeline.demo.build_demo import demo_config

    summaries = [build(demo_config(str(tmp_path / name)), show_progress=False) for name in ("a", "b")]
    for s in summaries:
        assert s.ok and s.clips_written > 0 and s.shards_done == s.shards_total
    a, b = shard_files(tmp_path / "a"), shard_files(tmp_path / "b")
    assert len(a) == summaries[0].shards_total and a == b


def test_an_output_and_a_root_named_with_glob_characters(tmp_path, tartan_data, ray_local):
    """`output: run[1]` built every shard, then crashed writing the index (fsspec read the ledger's
    paths as patterns); status, verify and resume failed the same way."""
    data, _ = tartan_data
    shutil.copytree(data, tmp_path / "data[1]")
    s = build(tartanair_config(tmp_path, tmp_path / "data[1]", "run[1]"), show_progress=False)
    assert s.shards_done == 3 and (tmp_path / "run[1]" / "index.parquet").exists()
    assert verify(str(tmp_path / "run[1]")).ok
    assert collect_status(str(tmp_path / "run[1]"))["shards"]["done"] == 3
    assert resume(str(tmp_path / "run[1]"), show_progress=False).shards_skipped == 3


def test_a_build_from_relative_paths_resumes_from_anywhere(tmp_path, tartan_data, ray_local, monkeypatch):
    """Relative output and dataset roots were recorded as written: `d4s resume` from another folder
    found no scenes ("no scenes found under tartanair_data"). They are recorded absolute."""
    data, _ = tartan_data
    (tmp_path / "a").mkdir()
    shutil.copytree(data, tmp_path / "a" / "data")
    monkeypatch.chdir(tmp_path / "a")
    cfg = tartanair_config(Path("."), Path("data"), "out", fault={"driver_exit_after_shards": 1})
    cfg_path = tmp_path / "a" / "rel.yaml"
    cfg_path.write_text(cfg.to_yaml().replace(str(tmp_path / "a") + "/", ""))
    assert "root: data" in cfg_path.read_text() and "output: out" in cfg_path.read_text()
    assert _run_cli("build", str(cfg_path), "--no-progress").returncode == 19  # stopped after one shard
    monkeypatch.chdir(tmp_path)
    s = resume("a/out", show_progress=False)
    assert s.shards_skipped == 1 and s.shards_done == 2
    recorded = (tmp_path / "a" / "out" / "config.resolved.yaml").read_text()
    assert f"root: {tmp_path / 'a' / 'data'}" in recorded and f"output: {tmp_path / 'a' / 'out'}" in recorded
