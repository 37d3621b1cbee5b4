"""A full build whose real-data reference is MegaSaM, run by a stand-in program.

RealEstate10K scenes are rendered (known metric depth and trajectory), written in the official
layout (poses up to scale), and built through ingest -> depth (Video Depth Anything, random
weights) -> align (MegaSaM reference) -> encode -> write. The stand-in "MegaSaM" answers with
the scene's true metric depth and cameras in a world frame of its own
(``pipeline/demo/megasam_stand_in.py``); for one scene it crashes,
for another it hangs past the timeout. Checks: the crash and the timeout fail only their clips,
with reasons naming the clip, the exit code / timeout and the log; the good scene's samples
carry MegaSaM-scaled metric poses; status counts drops by reason and shows the QC
distributions; a resume reuses the MegaSaM cache instead of re-running it.
"""
from __future__ import annotations

import tarfile

import numpy as np
import pytest

from pipeline.config import BuildConfig
from pipeline.demo.megasam_stand_in import command_template, save_truth
from pipeline.demo.render import render
from pipeline.demo.writers import realestate10k as writer
from pipeline.plan import key_safe
from pipeline.runner import build, resume
from pipeline.sample_format import decode_sample
from pipeline.status import collect_status
from pipeline.verify import verify

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
        save_truth(truth, key_safe(ws.scene_id), rendered)
        scenes.append((key_safe(ws.scene_id), rendered))
    return base, data, truth, scenes


def config(base, data, truth, fail: str, hang: str, out: str = "out") -> BuildConfig:
    log = base / f"{out}-megasam-calls.txt"
    template = command_template(truth, log=log, fail=fail, hang=hang)
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
    base, data, truth, scenes = re10k
    (good, rendered), (bad, _), (slow, _) = scenes
    cfg, log = config(base, data, truth, fail=bad, hang=slow)
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
