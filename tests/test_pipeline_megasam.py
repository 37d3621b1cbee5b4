"""A full build whose real-data reference is MegaSaM, run by a stand-in program.

RealEstate10K scenes are rendered (known metric depth and trajectory), written in the official
layout (poses up to scale), and built through ingest -> depth (Video Depth Anything, random
weights) -> align (MegaSaM reference) -> encode -> write. The stand-in "MegaSaM" answers with
the scene's true metric depth and cameras in a world frame of its own; for one scene it crashes,
for another it hangs past the timeout. Checks: the crash and the timeout fail only their clips,
with reasons naming the clip, the exit code / timeout and the log; the good scene's samples
carry MegaSaM-scaled metric poses; status counts drops by reason and shows the QC
distributions; a resume reuses the MegaSaM cache instead of re-running it.
"""
from __future__ import annotations

import io
import json
import shlex
import sys
import tarfile
import textwrap

import numpy as np
import pytest

from pipeline.config import BuildConfig
from pipeline.demo.render import render
from pipeline.demo.writers import realestate10k as writer
from pipeline.plan import key_safe
from pipeline.runner import build, resume
from pipeline.sample_format import decode_sample
from pipeline.status import collect_status
from pipeline.verify import verify

STAND_IN = textwrap.dedent('''
    """Stand-in for MegaSaM: answers with the rendered truth, in its own world frame."""
    import argparse, os, sys, time
    import numpy as np
    p = argparse.ArgumentParser()
    p.add_argument("--frames"); p.add_argument("--out"); p.add_argument("--clip")
    p.add_argument("--truth"); p.add_argument("--log"); p.add_argument("--fail"); p.add_argument("--hang")
    a = p.parse_args()
    with open(a.log, "a") as f:
        f.write(a.clip + "\\n")
    dataset, scene, start = a.clip.split("__")
    if scene == a.fail:
        print("stand-in: simulated MegaSaM crash", file=sys.stderr)
        sys.exit(3)
    if scene == a.hang:
        time.sleep(120)
    truth = np.load(os.path.join(a.truth, scene + ".npz"))
    n = len(os.listdir(a.frames))
    sl = slice(int(start), int(start) + n)
    # Its own world: the truth moved by a rigid transform (MegaSaM's world is arbitrary).
    g = np.eye(4); g[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]; g[:3, 3] = [5.0, -2.0, 1.0]
    k = truth["intrinsics"][0]
    K = np.array([[k[0], 0, k[2]], [0, k[1], k[3]], [0, 0, 1.0]])
    np.savez(a.out, images=truth["rgb"][sl], depths=truth["depth"][sl].astype(np.float32), intrinsic=K,
             cam_c2w=g @ truth["c2w"][sl])
''')

N_SCENES = 3


@pytest.fixture(scope="module")
def re10k(tmp_path_factory):
    base = tmp_path_factory.mktemp("megasam_e2e")
    data, truth = base / "data", base / "truth"
    truth.mkdir()
    scenes = []
    for i in range(N_SCENES):
        rendered = render(writer.demo_spec(i, seed=700 + i))
        ws = writer.write(rendered, data, writer.default_scene_id(i))
        np.savez(truth / f"{key_safe(ws.scene_id)}.npz", rgb=rendered.rgb, depth=rendered.depth,
                 intrinsics=rendered.intrinsics, c2w=rendered.c2w)
        scenes.append((key_safe(ws.scene_id), rendered))
    script = base / "megasam_stand_in.py"
    script.write_text(STAND_IN)
    return base, data, truth, script, scenes


def config(base, data, truth, script, fail: str, hang: str, out: str = "out") -> BuildConfig:
    log = base / f"{out}-megasam-calls.txt"
    template = (f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} --frames {{frames_dir}} --out {{out_npz}} "
                f"--clip {{clip_id}} --truth {shlex.quote(str(truth))} --log {shlex.quote(str(log))} "
                f"--fail {fail} --hang {hang}")
    return BuildConfig.model_validate({
        "output": str(base / out),
        "shard_size": 2,
        "datasets": {"realestate10k": {"root": str(data), "clip_length": 8, "frame_stride": 1, "clip_stride": 2,
                                       "depth_source": "megasam", "track_source": "none"}},
        "stages": {
            # metric head + scale-only fit: a positive prediction always gets a positive scale, so
            # even random weights align (badly; QC records it) and the poses can be checked
            "depth": {"encoder": "vits", "metric": True, "input_size": 56, "dtype": "fp32", "allow_random_weights": True,
                      "resources": {"num_gpus": 0, "actors": 1}},
            # random-weight relative depth fails depth QC; keep the clips so poses can be checked
            "align": {"model": "scale_only", "megasam_command": template, "megasam_timeout_s": 4.0, "megasam_retries": 0,
                      "drop_on_qc": False},
        },
        "ray": {"num_cpus": 2},
    }), log


def read_samples(out) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for tar_path in sorted((out / "shards").rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return samples


def test_megasam_reference_end_to_end(re10k, ray_local):
    base, data, truth, script, scenes = re10k
    (good, rendered), (bad, _), (slow, _) = scenes
    cfg, log = config(base, data, truth, script, fail=bad, hang=slow)
    s = build(cfg, show_progress=False)
    assert s.shards_failed == 0  # a MegaSaM failure fails clips, never the run
    failed = {f["clip_id"]: f for f in s.failures}
    assert {c.split("__")[1] for c in failed} == {bad, slow}
    for cid, f in failed.items():
        assert f["stage"] == "align" and cid in f["reason"]
        if bad in cid:
            assert "exit code 3" in f["reason"] and "megasam" in f["reason"].lower()
        else:
            assert "timed out" in f["reason"]
    assert s.clips_written == 2 and s.clips_failed == 4

    # The good scene: poses scaled into MegaSaM's metric frame, so camera distances are metres.
    samples = read_samples(base / "out")
    assert sorted(k.split("__")[1] for k in samples) == [good, good]
    for key, raw in samples.items():
        clip = decode_sample(raw)
        start = int(key.split("__")[2])
        true_c = rendered.c2w[start:start + 8, :3, 3]
        got_c = clip.c2w[:, :3, 3]
        np.testing.assert_allclose(np.linalg.norm(got_c - got_c[0], axis=-1),
                                   np.linalg.norm(true_c - true_c[0], axis=-1), rtol=1e-3, atol=1e-4)
        qc = clip.meta.qc["align"]
        assert qc["reference"] == "megasam" and clip.meta.depth_source == "aligned"
        assert qc["pose_scale"] == pytest.approx(1 / writer.POSE_SCALE, rel=1e-3)

    # status: drops per reason category, QC distributions from the ledger alone
    st = collect_status(str(base / "out"))
    drops = st["drops"]["realestate10k"]
    assert sum(drops.values()) == 4 and all(k.startswith("align:") for k in drops)
    assert drops == {"align: MegaSaM failed for clip <clip>: exit code #": 2,
                     "align: MegaSaM failed for clip <clip>: timed out after # s": 2}
    assert st["qc"]["realestate10k"]["pose scale"]["p50"] == pytest.approx(1 / writer.POSE_SCALE, rel=1e-3)
    assert st["stages"]["realestate10k"]["align"] == {"done": 2, "failed": 4, "pending": 0, "skipped": 0}
    assert st["stages"]["realestate10k"]["write"]["skipped"] == 4
    assert verify(str(base / "out")).ok

    # Resume after losing the good shard: the cached MegaSaM output is reused, not re-run.
    calls_before = log.read_text().splitlines()
    good_shard = next(p for p in (base / "out" / "shards").rglob("*.tar") if read_one_key(p, good))
    good_shard.unlink()
    r = resume(str(base / "out"), show_progress=False)
    assert r.shards_done == 1 and r.clips_written == 2
    assert log.read_text().splitlines() == calls_before
    assert verify(str(base / "out")).ok


def read_one_key(path, scene) -> bool:
    with tarfile.open(path) as tar:
        return any(m.name.split("__")[1] == scene for m in tar.getmembers())
