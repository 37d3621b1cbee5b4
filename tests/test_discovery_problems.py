"""A file that a dataset's discovery reads (a scene's pose list or transforms.json, a TFRecord
file, a split's annotations, a Stereo4D npz) is bad: the plan keeps every other scene and
dataset, and the bad one's clip fails at ingest with the file and the reason, recorded like any
other bad input. (It used to abort the whole build, every dataset with it; Stereo4D's
unreadable npz was planned no clip, with the note that it had 1 frame; a RealEstate10K camera
file with a bad byte was skipped as if it were no camera file.)"""

from __future__ import annotations

import gzip
import json

import pytest

from pipeline.demo.build_demo import demo_config
from pipeline.plan import make_plan
from stages.ingest.stage import ingest_clip

DATASETS = ["tartanair", "matrixcity", "kubric_movi_f", "dynamic_replica", "realestate10k", "stereo4d"]


def _tartanair_bad_byte(root):
    (pose,) = sorted(root.rglob("pose_left.txt"))[:1]
    raw = bytearray(pose.read_bytes())
    raw[10] = 0xFF
    pose.write_bytes(bytes(raw))
    return pose.name, "not a number"


def _matrixcity_truncated(root):
    tj = sorted(root.rglob("transforms.json"))[0]
    tj.write_text('{"frames": [')
    return tj.name, "not a MatrixCity transforms.json"


def _kubric_length_crc(root):
    rec = sorted(root.rglob("movi_f-*"))[0]
    raw = bytearray(rec.read_bytes())
    raw[9] ^= 0xFF  # the masked CRC of the first record's length
    rec.write_bytes(bytes(raw))
    return rec.name, "CRC"


def _dynamic_replica_entry(root):
    (ann,) = sorted(root.rglob("frame_annotations_valid.jgz"))
    entries = json.loads(gzip.decompress(ann.read_bytes()))
    del entries[0]["image"]
    ann.write_bytes(gzip.compress(json.dumps(entries).encode(), mtime=0))
    return ann.name, "lacks sequence_name/frame_number/image.path"


def _realestate10k_bad_byte(root):
    txt = sorted(p for p in root.rglob("*.txt") if len(p.stem) == 16)[0]
    raw = bytearray(txt.read_bytes())
    raw[raw.index(b"\n") + 3] = 0xFF  # in the first camera line: the URL line is intact
    txt.write_bytes(bytes(raw))
    return txt.name, "not UTF-8"


def _stereo4d_npz(root):
    npz = sorted(root.rglob("*.npz"))[0]
    npz.write_bytes(npz.read_bytes()[:100])
    return npz.name, "unreadable"


CORRUPT = {
    "tartanair": _tartanair_bad_byte,
    "matrixcity": _matrixcity_truncated,
    "kubric_movi_f": _kubric_length_crc,
    "dynamic_replica": _dynamic_replica_entry,
    "realestate10k": _realestate10k_bad_byte,
    "stereo4d": _stereo4d_npz,
}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("discovery") / "out"
    cfg = demo_config(str(out), DATASETS, scenes=2).resolved()
    good = make_plan(cfg)
    expected = {name: CORRUPT[name](out / "demo_data" / name) for name in DATASETS}
    return cfg, good, make_plan(cfg), expected


@pytest.mark.parametrize("dataset", DATASETS)
def test_a_bad_file_read_at_discovery_fails_only_its_clips(planned, dataset):
    cfg, good, bad, (file_name, reason) = planned[0], planned[1], planned[2], planned[3][dataset]
    scenes = {s["scene"]: s for s in bad.scenes if s["dataset"] == dataset}
    failed, kept = [], []
    for c in (c for c in bad.clips if c["dataset"] == dataset):
        got = ingest_clip(c, bad.scene_refs[(dataset, c["scene"])], cfg)
        (failed if hasattr(got, "reason") else kept).append((c, got))
    assert failed, f"no clip of {dataset} failed"
    for _, f in failed:
        assert file_name in f.path and reason in f.reason and not f.transient, f
    problem_scenes = {c["scene"] for c, _ in failed}
    for scene in problem_scenes:
        assert scenes[scene]["num_clips"] >= 1
    # every other scene of the dataset is planned and read as before; the damaged file held one
    # scene, which is either the failing one or replaced by a scene named after the file
    good_scenes = {c["scene"] for c in good.clips if c["dataset"] == dataset}
    assert len(good_scenes - set(scenes)) <= 1 and len(problem_scenes) == 1
    before = {
        c["clip_id"] for c in good.clips if c["dataset"] == dataset and c["scene"] in set(scenes) - problem_scenes
    }
    assert before and before == {c["clip_id"] for c, _ in kept}


def test_a_dataset_whose_listing_fails_is_one_failing_clip_and_the_others_go_on(planned, monkeypatch):
    """Any adapter whose discovery still raises (a file that lists the whole dataset): that dataset
    is planned one clip, which fails with the file and the reason; every other dataset is planned."""
    from pipeline.clip import ClipError
    from stages.ingest.stereo4d import Stereo4DAdapter

    cfg = planned[0]

    def broken(self):
        raise ClipError("the listing is damaged", "/data/stereo4d/listing.json")

    monkeypatch.setattr(Stereo4DAdapter, "discover", broken)
    plan = make_plan(cfg)
    (clip,) = [c for c in plan.clips if c["dataset"] == "stereo4d"]
    got = ingest_clip(clip, plan.scene_refs[("stereo4d", clip["scene"])], cfg)
    assert got.reason == "the listing is damaged" and got.path == "/data/stereo4d/listing.json"
    others = {c["clip_id"] for c in plan.clips if c["dataset"] != "stereo4d"}
    assert others and others == {c["clip_id"] for c in planned[2].clips if c["dataset"] != "stereo4d"}
