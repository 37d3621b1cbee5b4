"""MegaSaMRunner end to end with a stand-in program (no MegaSaM needed); the cache in the output
store is tested in tests/test_scene_passes.py and tests/test_s3.py."""

from __future__ import annotations

import os
import shlex
import sys
import textwrap

import numpy as np
import pytest

from pipeline.clip import ClipError
from stages.align.fit import AlignmentError
from stages.align.megasam import MegaSaMConfigError, MegaSaMRunner, load_megasam_npz, resize_nearest
from stages.align.references import reference_from_megasam

STAND_IN = textwrap.dedent("""
    import argparse, os, sys, time
    import numpy as np
    from PIL import Image
    p = argparse.ArgumentParser()
    p.add_argument("--frames"); p.add_argument("--out"); p.add_argument("--clip"); p.add_argument("--count")
    a = p.parse_args()
    with open(a.count, "a") as f:
        f.write(a.clip + "\\n")
    if "fail" in a.clip:
        print("stand-in: simulated crash", file=sys.stderr)
        sys.exit(3)
    if "slow" in a.clip:
        time.sleep(60)
    names = sorted(os.listdir(a.frames))
    imgs = np.stack([np.asarray(Image.open(os.path.join(a.frames, n))) for n in names])
    t, h, w, _ = imgs.shape
    h2, w2 = h // 2, w // 2  # MegaSaM working at half resolution
    depths = np.stack([np.full((h2, w2), 2.0 + i, np.float32) for i in range(t)])
    depths[:, :, : w2 // 2] = 1.0
    k = np.array([[w2 * 0.8, 0, w2 / 2], [0, w2 * 0.8, h2 / 2], [0, 0, 1.0]])
    c2w = np.tile(np.eye(4), (t, 1, 1)); c2w[:, 0, 3] = 0.1 * np.arange(t)
    np.savez(a.out, images=imgs[:, ::2, ::2], depths=depths, intrinsic=k, cam_c2w=c2w)
""")


@pytest.fixture()
def stand_in(tmp_path):
    script = tmp_path / "megasam_stand_in.py"
    script.write_text(STAND_IN)
    counter = tmp_path / "invocations.txt"
    template = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} --frames {{frames_dir}} "
        f"--out {{out_npz}} --clip {{clip_id}} --count {shlex.quote(str(counter))}"
    )
    return template, counter


def frames(t=4, h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (t, h, w, 3), dtype=np.uint8)


def invocations(counter):
    return counter.read_text().splitlines() if counter.exists() else []


def test_end_to_end_and_cache(stand_in, tmp_path):
    from stages.align.megasam import MegaSaMCache, run_cached

    template, counter = stand_in
    runner = MegaSaMRunner(template, tmp_path / "work", timeout_s=60, retries=0)
    clip_id = "re10k/abc 1;echo pwned $(x)"  # spaces and shell syntax stay one argument
    out = runner.run(clip_id, frames())
    assert out.depths.shape == (4, 12, 16) and out.cam_c2w.shape == (4, 4, 4) and not out.cached
    assert invocations(counter) == [clip_id]
    assert os.path.exists(runner.log_path(clip_id))
    # Through the cache: the second call (a new runner, as on another node) does not run.
    cache = MegaSaMCache(str(tmp_path / "cache"), max_side=0)
    first = run_cached(runner, cache, clip_id, frames())
    again = run_cached(MegaSaMRunner(template, tmp_path / "work2"), cache, clip_id, frames())
    assert not first.cached and again.cached and len(invocations(counter)) == 2
    np.testing.assert_allclose(again.output.depths, out.depths, rtol=1e-4)

    # Resized to the clip's resolution: nearest neighbour, intrinsics scaled by 2.
    ref = reference_from_megasam(out, 24, 32, expected_frames=4)
    assert ref.depth.shape == (4, 24, 32) and ref.kind == "megasam"
    assert np.all(ref.depth[:, :, :16] == 1.0) and np.all(ref.depth[2, :, 16:] == 4.0)
    np.testing.assert_allclose(ref.intrinsics[0], [2 * 16 * 0.8, 2 * 16 * 0.8, 16.0, 12.0])
    assert ref.c2w.shape == (4, 4, 4)


def test_failure_and_timeout_reported_per_run(stand_in, tmp_path):
    template, counter = stand_in
    runner = MegaSaMRunner(
        template, tmp_path / "work", timeout_s=4.0, retries=1
    )  # a loaded machine starts Python slowly
    assert not isinstance(runner.run("good_clip", frames()), Exception)
    with pytest.raises(AlignmentError) as fail:
        runner.run("fail_clip", frames())
    assert isinstance(fail.value, ClipError)
    assert "fail_clip" in str(fail.value) and "exit code 3" in str(fail.value)
    assert str(runner.log_path("fail_clip")) in str(fail.value)
    assert "simulated crash" in runner.log_path("fail_clip").read_text()
    with pytest.raises(AlignmentError) as slow:
        runner.run("slow_clip", frames())
    assert "timed out" in str(slow.value) and "slow_clip" in str(slow.value)
    assert invocations(counter).count("fail_clip") == 2  # one retry
    assert invocations(counter).count("slow_clip") == 2


def test_missing_executable_is_a_config_error(tmp_path):
    with pytest.raises(MegaSaMConfigError, match="not found"):
        MegaSaMRunner("/nonexistent/megasam_run --out {out_npz}", tmp_path)
    with pytest.raises(MegaSaMConfigError, match="placeholder"):
        MegaSaMRunner(f"{shlex.quote(sys.executable)} x.py {{out_npz}} {{bogus}}", tmp_path)
    # Vanishes between construction and first use.
    exe = tmp_path / "megasam_run"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    runner = MegaSaMRunner(f"{exe} {{frames_dir}} {{out_npz}}", tmp_path / "work")
    exe.unlink()
    with pytest.raises(MegaSaMConfigError):
        runner.run("clip", frames())
    assert not issubclass(MegaSaMConfigError, ClipError)


def test_option_like_clip_id_refused(stand_in, tmp_path):
    template, _ = stand_in
    runner = MegaSaMRunner(template, tmp_path / "work")
    with pytest.raises(AlignmentError, match="refusing"):
        runner.run("--help", frames())


def test_bad_npz_rejected(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(
        p,
        images=np.zeros((2, 4, 4, 3), np.uint8),
        depths=np.ones((3, 4, 4), np.float32),
        intrinsic=np.eye(3),
        cam_c2w=np.tile(np.eye(4), (2, 1, 1)),
    )
    with pytest.raises(AlignmentError, match="images"):
        load_megasam_npz(p)
    np.savez(p, depths=np.ones((2, 4, 4), np.float32))
    with pytest.raises(AlignmentError, match="lacks"):
        load_megasam_npz(p)
    obj = tmp_path / "pickle.npz"
    np.savez(
        obj,
        images=np.array([{"a": 1}], dtype=object),
        depths=np.ones((1, 4, 4)),
        intrinsic=np.eye(3),
        cam_c2w=np.eye(4)[None],
    )
    with pytest.raises(AlignmentError, match="cannot read"):
        load_megasam_npz(obj)


def test_resize_nearest_pixel_centres():
    a = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    up = resize_nearest(a, 4, 4)
    np.testing.assert_array_equal(up[0], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


def test_a_failed_cache_read_keeps_the_entry(stand_in, tmp_path):
    """A store error reading a cached result (S3 timeout, throttling) removed the entry as if it
    were damaged, and MegaSaM ran again: GPU time lost on every throttled read. The error now
    propagates (the scene pass marks it transient); only an entry that reads but does not decode
    is removed."""
    from stages.align.megasam import MegaSaMCache, run_cached

    template, counter = stand_in
    cache = MegaSaMCache(str(tmp_path / "cache"), max_side=0)
    first = run_cached(MegaSaMRunner(template, tmp_path / "w"), cache, "c", frames())
    rel = cache.rel(first.key)
    real = cache.store.read_bytes

    def timeout(r):
        raise TimeoutError("read timed out")

    cache.store.read_bytes = timeout
    with pytest.raises(TimeoutError):
        cache.get(first.key, 4)
    cache.store.read_bytes = real
    assert cache.store.exists(rel) and cache.get(first.key, 4) is not None
    cache.store.write_bytes_atomic(rel, b"PK\x03\x04 not a whole npz")  # damaged: removed, recomputed
    assert cache.get(first.key, 4) is None and not cache.store.exists(rel)
    assert len(invocations(counter)) == 1


def test_a_cache_that_cannot_be_written_does_not_fail_the_run(stand_in, tmp_path, caplog):
    """A full cache store (ENOSPC) failed the scene's clips permanently after MegaSaM had run and
    succeeded: the result was thrown away because the optional cache could not keep it, and the
    clips were recorded failed inside published shards. Now the result is used, uncached, with a
    warning; the next run stores it."""
    import errno

    from stages.align.megasam import MegaSaMCache, run_cached

    template, counter = stand_in
    cache = MegaSaMCache(str(tmp_path / "cache"), max_side=0)
    real = cache.store.write_bytes_atomic

    def full(rel, data):
        if rel.endswith(".npz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(rel, data)

    cache.store.write_bytes_atomic = full
    with caplog.at_level("WARNING"):
        got = run_cached(MegaSaMRunner(template, tmp_path / "w"), cache, "c", frames())
    assert not got.cached and got.bytes == 0 and got.output.num_frames == 4
    assert "could not be cached" in caplog.text and "No space left" in caplog.text
    assert not cache.store.exists(cache.rel(got.key))
    cache.store.write_bytes_atomic = real
    again = run_cached(MegaSaMRunner(template, tmp_path / "w"), cache, "c", frames())
    assert not again.cached and again.bytes > 0 and cache.store.exists(cache.rel(again.key))
    np.testing.assert_array_equal(again.output.depths, got.output.depths)  # the same (compact) result
    assert len(invocations(counter)) == 2


def test_a_full_scratch_disk_is_the_nodes_fault_and_named(stand_in, tmp_path, monkeypatch):
    """Frames written to a full TMPDIR failed the scene's clips permanently with 'No space left on
    device' and no path; now transient (resume redoes the shard) and naming the file."""
    import errno

    from PIL import Image

    from pipeline.failures import is_transient

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    template, _ = stand_in
    with pytest.raises(OSError) as err:
        MegaSaMRunner(template, tmp_path / "w").run("c", frames())
    assert is_transient(err.value) and str(tmp_path / "w") in str(err.value) and "000000.png" in str(err.value)


def test_killing_a_run_waits_for_it_with_a_deadline(caplog):
    """After SIGKILL the runner waited without a timeout: a MegaSaM stuck in the GPU driver
    (uninterruptible) would hold the task until the shard deadline, hours later."""
    import subprocess

    from stages.align.megasam import _kill_group

    class Unkillable:
        pid = 2**22 + 12345  # no such process group: killpg fails, kill() is called

        def kill(self):
            pass

        def wait(self, timeout=None):
            assert timeout is not None, "an unbounded wait"
            raise subprocess.TimeoutExpired("megasam", timeout)

    _kill_group(Unkillable())
    assert "did not end" in caplog.text
