"""A full build whose real-data reference is MegaSaM, run by a stand-in program, in scene passes.

RealEstate10K scenes are rendered (known metric depth and trajectory), written in the official
layout (poses up to scale), and built through ingest -> depth (Video Depth Anything, random
weights) | MegaSaM -> align -> encode -> write with one pass per scene. The stand-in "MegaSaM"
answers with the scene's true metric depth and cameras in a world frame of its own, with one
metric-scale error per run (as real MegaSaM runs have) (``pipeline/demo/megasam_stand_in.py``);
for one scene it crashes, for another it hangs past the timeout. Checks: the model saw each
source frame once and MegaSaM ran once per scene; the crash and the timeout fail only their
scene's clips, with the reason; the clips of the good scene carry one scale (``qc.align.scale``,
``extra.pose_scale``) and MegaSaM-scaled metric poses; status counts drops by reason; a resume
reuses the MegaSaM cache in the output store instead of re-running it.
"""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from conftest import tiny_vda
from test_task_dependencies import early_starts, task_spans

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


def config(base, data, truth, fail: str, hang: str, out: str = "out", jitter: float = 0.0) -> BuildConfig:
    log = base / f"{out}-megasam-calls.txt"
    template = command_template(truth, log=log, fail=fail, hang=hang, scale_jitter=jitter)
    return BuildConfig.model_validate(
        {
            "output": str(base / out),
            "shard_size": 2,
            "datasets": {
                "realestate10k": {
                    "root": str(data),
                    "clip_length": 8,
                    "frame_stride": 1,
                    "clip_stride": 2,
                    "depth_source": "megasam",
                    "track_source": "none",
                }
            },
            "stages": {
                # metric head + scale-only fit: a positive prediction always gets a positive scale, so
                # even random weights align (badly; QC records it) and the poses can be checked
                "depth": tiny_vda(),
                # random-weight relative depth fails depth QC; keep the clips so poses can be checked
                "align": {
                    "model": "scale_only",
                    "megasam_command": template,
                    "megasam_timeout_s": 4.0,
                    "megasam_retries": 0,
                    "drop_on_qc": False,
                    "megasam_num_gpus": 0,
                },  # the stand-in needs no GPU
            },
            "ray": {"num_cpus": 2},
        }
    ), log


def read_samples(out) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for tar_path in sorted((out / "shards").rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return samples


def test_megasam_scene_passes_end_to_end(re10k, ray_local):
    base, data, truth, scenes = re10k
    (good, rendered), (bad, _), (slow, _) = scenes
    cfg, log = config(base, data, truth, fail=bad, hang=slow, jitter=0.05)
    cfg.fault.trace_dir = str(base / "trace")
    s = build(cfg, show_progress=False)
    assert s.shards_failed == 0  # a MegaSaM failure fails clips, never the run
    # every stage (depth actor, MegaSaM, align, encode, write) began once its inputs existed
    assert {"ingest", "depth", "megasam", "align", "encode", "write"} <= {
        st for v in task_spans(base / "trace").values() for st in v
    }
    assert early_starts(base / "trace") == []
    # the depth actor's holds on its model, as wall-clock intervals (the scene bench's GPU steady state)
    [holds] = list((base / "trace" / "holds").iterdir())
    spans = sorted(tuple(map(float, line.split())) for line in holds.read_text().splitlines())
    assert holds.name.startswith("depth.") and spans and all(a <= b for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # one model, one hold at a time
    assert sum(b - a for a, b in spans) == pytest.approx(s.stats["depth.model_held_s"], rel=0.05, abs=0.05)
    # the seconds the model waited between its calls: the gaps between the holds
    gaps = sum(a2 - b1 for (_, b1), (a2, _) in zip(spans, spans[1:]))
    assert s.stats["depth.model_idle_s"] == pytest.approx(gaps, abs=0.05)
    # scene passes: every source frame through the depth model once, one MegaSaM call per scene
    n_frames = rendered.rgb.shape[0]
    assert s.stats["depth.passes"] == N_SCENES and s.stats["depth.model_frames"] == N_SCENES * n_frames
    assert s.stats["depth.clip_frames"] == 6 * 8 > s.stats["depth.source_frames"] == N_SCENES * n_frames
    assert sorted(c.split("__")[1] for c in log.read_text().split()) == sorted([good, bad, slow])
    failed = {f["clip_id"]: f for f in s.failures}
    assert {c.split("__")[1] for c in failed} == {bad, slow}
    for cid, f in failed.items():
        assert f["stage"] == "megasam" and cid.rsplit("__", 1)[0] in f["reason"]  # names the scene's run
        assert "exit code 3" in f["reason"] if bad in cid else "timed out" in f["reason"]
        assert f["path"].startswith(str(base / "out" / "cache" / "megasam" / "logs"))
    assert s.clips_written == 2 and s.clips_failed == 4

    # The good scene: one metric scale for both clips, poses scaled into MegaSaM's metric frame
    # (the stand-in's run is off by its scale error: both clips share it, rather than each its own)
    samples = read_samples(base / "out")
    assert sorted(k.split("__")[1] for k in samples) == [good, good]
    metas = []
    for key, raw in samples.items():
        clip = decode_sample(raw)
        start = int(key.split("__")[2])
        true_c = rendered.c2w[start : start + 8, :3, 3]
        got_c = clip.c2w[:, :3, 3]
        qc = clip.meta.qc["align"]
        assert qc["reference"] == "megasam" and clip.meta.depth_source == "aligned"
        assert qc["scene"]["clips"] == 2 and qc["scene"]["frames"] == n_frames
        run_scale = qc["pose_scale"] * writer.POSE_SCALE  # the stand-in's scale error for this run
        assert run_scale != pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose(
            np.linalg.norm(got_c - got_c[0], axis=-1),
            run_scale * np.linalg.norm(true_c - true_c[0], axis=-1),
            rtol=1e-3,
            atol=1e-4,
        )
        metas.append(clip.meta)
    assert metas[0].qc["align"]["scale"] == metas[1].qc["align"]["scale"]
    assert metas[0].extra["pose_scale"] == metas[1].extra["pose_scale"]

    # status: drops per reason category, QC distributions from the ledger alone
    st = collect_status(str(base / "out"))
    drops = st["drops"]["realestate10k"]
    assert drops == {"megasam: MegaSaM failed: exit code #": 2, "megasam: MegaSaM failed: timed out after # s": 2}
    assert st["stages"]["realestate10k"]["megasam"] == {"done": 2, "failed": 4, "pending": 0, "skipped": 0}
    assert st["stages"]["realestate10k"]["align"]["skipped"] == 4
    assert verify(str(base / "out")).ok

    # Resume after losing the good shard: the cached MegaSaM output is reused, not re-run, and the
    # shard comes back byte for byte.
    calls_before = log.read_text().splitlines()
    good_shard = next(p for p in (base / "out" / "shards").rglob("*.tar") if read_one_key(p, good))
    before = good_shard.read_bytes()
    good_shard.unlink()
    r = resume(str(base / "out"), show_progress=False)
    assert (
        r.shards_done == 1
        and r.clips_written == 2
        and r.stats["megasam.cached"] == 1
        and "megasam.runs" not in {k for k, v in r.stats.items() if v}
    )
    assert log.read_text().splitlines() == calls_before
    assert good_shard.read_bytes() == before
    assert verify(str(base / "out")).ok


def read_one_key(path, scene) -> bool:
    with tarfile.open(path) as tar:
        return any(m.name.split("__")[1] == scene for m in tar.getmembers())
