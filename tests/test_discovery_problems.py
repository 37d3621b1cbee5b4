"""A file that a dataset's discovery reads (a scene's pose list or transforms.json, a TFRecord
file, a split's annotations, a Stereo4D npz) is bad: the plan keeps every other scene and
dataset, and the bad one's clip fails at ingest with the file and the reason, recorded like any
other bad input. (It used to abort the whole build, every dataset with it; Stereo4D's
unreadable npz was planned no clip, with the note that it had 1 frame; a RealEstate10K camera
file with a bad byte was skipped as if it were no camera file.)"""

from __future__ import annotations

import errno
import gzip
import json
import os

import pytest
from fsspec.implementations.local import LocalFileSystem

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


# -- folders and files that cannot be read (permissions, I/O errors), names that are not UTF-8 -------
#
# Before: fsspec's walk left an unreadable folder out (its default ``on_error="omit"``): the build
# planned without its scenes, with no trace anywhere, and a later resume was refused because the
# plan had changed; a PermissionError on a file that discovery reads (a pose list) aborted the plan
# with a traceback; a scene folder named with bytes that are not UTF-8 passed ``d4s plan`` and
# crashed ``d4s build`` writing the plan (UnicodeEncodeError).


class DenyingFS(LocalFileSystem):
    """The local filesystem as a non-root user sees it after ``chmod 000`` on ``folders`` (no
    listing, no lookup inside) and with ``files`` failing to open with the given errno (the
    machine runs as root, where chmod denies nothing)."""

    folders: tuple = ()
    files: dict = {}

    def _denied(self, path, inside_only=False):
        path = self._strip_protocol(path.path if isinstance(path, os.DirEntry) else path)
        for d in self.folders:
            if path.startswith(d + "/") or (path == d and not inside_only):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return path

    def ls(self, path, detail=False, **kwargs):
        self._denied(path)
        return super().ls(path, detail=detail, **kwargs)

    def info(self, path, **kwargs):
        self._denied(path, inside_only=True)
        return super().info(path, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        path = self._denied(path, inside_only=True)
        if path in self.files:
            eno = self.files[path]
            raise OSError(eno, os.strerror(eno), path)
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def deny(monkeypatch):
    """``deny(folders=[...], files={path: errno})``: every Store opened from now on (the adapters')
    reads local paths through a DenyingFS."""
    import fsspec.core

    real = fsspec.core.url_to_fs

    def install(folders=(), files=None):
        cls = type(
            "Denying",
            (DenyingFS,),
            {"folders": tuple(map(str, folders)), "files": {str(k): v for k, v in (files or {}).items()}},
        )

        def url_to_fs(url, **kwargs):
            fs, root = real(url, **kwargs)
            return (cls(skip_instance_cache=True), root) if isinstance(fs, LocalFileSystem) else (fs, root)

        monkeypatch.setattr(fsspec.core, "url_to_fs", url_to_fs)

    return install


LISTED = ["tartanair", "matrixcity", "spring", "pointodyssey"]


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    out = tmp_path_factory.mktemp("listing") / "out"
    cfg = demo_config(str(out), LISTED, scenes=2).resolved()
    return cfg, make_plan(cfg), out / "demo_data"


def _clips(plan, dataset, scenes=None):
    return {c["clip_id"] for c in plan.clips if c["dataset"] == dataset and (scenes is None or c["scene"] in scenes)}


@pytest.mark.parametrize("dataset", LISTED)
def test_an_unreadable_scene_folder_is_planned_with_its_problem(listed, deny, dataset):
    cfg, good, data = listed
    scene = sorted({s["scene"] for s in good.scenes if s["dataset"] == dataset})[1]
    folder = data / dataset / scene
    deny(folders=[folder])
    plan = make_plan(cfg)
    rows = {s["scene"]: s for s in plan.scenes if s["dataset"] == dataset}
    assert scene in rows, "the unreadable scene was left out of the plan"
    assert rows[scene]["num_clips"] == 1 and "Permission denied" in rows[scene]["note"]
    assert str(folder) in rows[scene]["note"]
    (clip,) = [c for c in plan.clips if c["scene"] == scene and c["dataset"] == dataset]
    got = ingest_clip(clip, plan.scene_refs[(dataset, scene)], cfg)
    assert "Permission denied" in got.reason and str(folder) in got.path and not got.transient
    others = set(rows) - {scene}
    assert others and _clips(plan, dataset, others) == _clips(good, dataset, others)
    assert {c["clip_id"] for c in plan.clips if c["dataset"] != dataset} == {
        c["clip_id"] for c in good.clips if c["dataset"] != dataset
    }


def test_an_unreadable_folder_above_the_scenes_fails_discovery_in_one_line(listed, deny):
    from pipeline.config import ConfigError

    cfg, _, data = listed
    folder = data / "tartanair" / "demoenv0" / "Hard"  # the audit's case: it holds scene P001
    deny(folders=[folder])
    with pytest.raises(ConfigError) as err:
        make_plan(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "tartanair" in msg and str(folder) in msg and "Permission denied" in msg


@pytest.mark.parametrize("eno", [errno.EACCES, errno.EIO])
def test_an_unreadable_pose_file_at_discovery_fails_only_its_scene(listed, deny, eno):
    cfg, good, data = listed
    pose = data / "tartanair" / "demoenv0" / "Hard" / "P001" / "pose_left.txt"
    deny(files={pose: eno})
    plan = make_plan(cfg)  # was: PermissionError, a traceback, no plan
    rows = {s["scene"]: s for s in plan.scenes if s["dataset"] == "tartanair"}
    assert os.strerror(eno) in rows["demoenv0/Hard/P001"]["note"]
    (clip,) = [c for c in plan.clips if c["scene"] == "demoenv0/Hard/P001"]
    got = ingest_clip(clip, plan.scene_refs[("tartanair", clip["scene"])], cfg)
    assert got.path == str(pose) and os.strerror(eno) in got.reason and not got.transient
    assert _clips(plan, "tartanair", {"demoenv0/Easy/P000"}) == _clips(good, "tartanair", {"demoenv0/Easy/P000"})
    assert {c["clip_id"] for c in plan.clips if c["dataset"] != "tartanair"} == {
        c["clip_id"] for c in good.clips if c["dataset"] != "tartanair"
    }


def test_store_listings_raise_on_an_unreadable_folder(tmp_path, deny):
    """Store's walks (shards at resume and verify, dataset globs) never leave a folder out."""
    from pipeline.storage import Store

    for rel in ("a/x.bin", "b/c/y.bin", "b/z.bin"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"1")
    deny(folders=[tmp_path / "b" / "c"])
    store = Store(str(tmp_path))
    for walk in (store.walk_files, store.files_detail, lambda: store.glob("*/*/*.bin")):
        with pytest.raises(PermissionError):
            walk()
    errors = []
    assert store.glob("*/*.bin", errors) == [store.path("a/x.bin"), store.path("b/z.bin")] and not errors
    assert store.glob("*/*/*.bin", errors) == [] and [e[0] for e in errors] == ["b/c"]


def test_a_scene_folder_named_with_bytes_that_are_not_utf8(tmp_path):
    """Planned as a scene with a problem, its id written as UTF-8 (the bytes escaped), failing at
    ingest with the reason; the plan is written (was: UnicodeEncodeError in write_plan)."""
    from manifests.store import ManifestStore
    from pipeline.storage import Store

    cfg = demo_config(str(tmp_path / "out"), ["tartanair"], scenes=4).resolved()
    root = tmp_path / "out" / "demo_data" / "tartanair"
    os.rename(os.fsencode(root / "demoenv1"), os.fsencode(root) + b"/demo\xffenv1")
    plan = make_plan(cfg)
    rows = {s["scene"]: s for s in plan.scenes}
    bad = [s for s in rows if s.startswith("demo\\xffenv1/")]
    assert sorted(bad) == ["demo\\xffenv1/Easy/P002", "demo\\xffenv1/Hard/P003"], sorted(rows)
    for scene in bad:
        assert "not UTF-8" in rows[scene]["note"] and rows[scene]["num_clips"] == 1
        (clip,) = [c for c in plan.clips if c["scene"] == scene]
        got = ingest_clip(clip, plan.scene_refs[("tartanair", scene)], cfg)
        assert "file name is not UTF-8" in got.reason and "demo\\xffenv1" in got.path and not got.transient
    assert {"demoenv0/Easy/P000", "demoenv0/Hard/P001"} <= set(rows)
    ManifestStore(Store(cfg.output)).write_plan(plan.scenes, plan.clips, plan.shards)
    assert {s["scene"] for s in ManifestStore(Store(cfg.output)).scenes()} == set(rows)


def test_write_plan_refuses_a_name_that_is_not_utf8_in_one_line_writing_nothing(tmp_path):
    from manifests.store import ManifestStore
    from pipeline.config import ConfigError
    from pipeline.storage import Store

    scene = {"dataset": "tartanair", "scene": "demo\udcffenv/Easy/P000", "num_frames": 0, "num_clips": 0, "note": ""}
    with pytest.raises(ConfigError, match="not UTF-8"):
        ManifestStore(Store(str(tmp_path))).write_plan([scene], [], [])
    assert not list(tmp_path.rglob("*.parquet"))


def test_an_unreadable_realestate10k_camera_file_is_a_scene_with_its_problem(tmp_path, deny):
    """Read with the split's other camera files at once (Store.read_many); was: a traceback."""
    from stages.ingest import get_adapter

    (tmp_path / "train").mkdir()
    for i in range(3):
        lines = [f"https://www.youtube.com/watch?v=vid{i:08d}"] + ["1000 0.5 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0"]
        (tmp_path / "train" / f"{i:016x}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "train" / "README.txt").write_text("not a camera file")
    bad = tmp_path / "train" / f"{1:016x}.txt"
    deny(files={bad: errno.EACCES, tmp_path / "train" / "README.txt": errno.EACCES})
    scenes = get_adapter("realestate10k", str(tmp_path)).discover()
    assert [(s.scene, s.num_frames) for s in scenes] == [(f"train/{i:016x}", 1 if i != 1 else 0) for i in range(3)]
    assert "Permission denied" in scenes[1].problem[0] and scenes[1].problem[1] == str(bad)
    assert not scenes[0].problem and not scenes[2].problem


@pytest.fixture(scope="module")
def vkitti2_listed(tmp_path_factory):
    out = tmp_path_factory.mktemp("vkitti2") / "out"
    cfg = demo_config(str(out), ["vkitti2", "dynamic_replica"], scenes=2).resolved()
    return cfg, make_plan(cfg), out / "demo_data"


@pytest.mark.parametrize("part", ["variation", "frames", "rgb camera"])
def test_an_unreadable_vkitti2_scene_folder_is_planned_with_its_problem(vkitti2_listed, deny, part):
    """A variation folder (was: left out of the plan in silence, ``exists`` saying no), its frames
    folder (the same) or its camera's image folder (was: the whole discovery failed) that cannot
    be read: the scene is planned with the reason; the others are as before."""
    cfg, good, data = vkitti2_listed
    scene = sorted(s["scene"] for s in good.scenes if s["dataset"] == "vkitti2")[1]
    sc, var, cam = scene.split("/")
    (rgb,) = (data / "vkitti2").rglob(f"{sc}/{var}/frames/rgb/{cam}")
    folder = {"variation": data / "vkitti2" / sc / var, "frames": rgb.parent.parent, "rgb camera": rgb}[part]
    deny(folders=[folder])
    plan = make_plan(cfg)
    rows = {s["scene"]: s for s in plan.scenes if s["dataset"] == "vkitti2"}
    assert scene in rows, "the unreadable scene was left out of the plan"
    assert rows[scene]["num_clips"] == 1 and "Permission denied" in rows[scene]["note"], rows[scene]
    (clip,) = [c for c in plan.clips if c["scene"] == scene and c["dataset"] == "vkitti2"]
    got = ingest_clip(clip, plan.scene_refs[("vkitti2", scene)], cfg)
    assert "Permission denied" in got.reason and got.path.startswith(str(folder)) and not got.transient
    others = set(rows) - {scene}
    assert others and _clips(plan, "vkitti2", others) == _clips(good, "vkitti2", others)
    assert _clips(plan, "dynamic_replica") == _clips(good, "dynamic_replica")


def test_an_unreadable_dynamic_replica_split_folder_fails_discovery_in_one_line(vkitti2_listed, deny):
    """A split folder holds many sequences, which cannot be planned without it: one line naming it
    (was: the split left out in silence, ``exists`` saying no)."""
    from pipeline.config import ConfigError

    cfg, good, data = vkitti2_listed
    ann = sorted((data / "dynamic_replica").rglob("frame_annotations_*.jgz"))[0]
    deny(folders=[ann.parent])
    with pytest.raises(ConfigError) as err:
        make_plan(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "dynamic_replica" in msg and str(ann.parent) in msg and "Permission denied" in msg


def test_listdir_of_a_folder_that_cannot_be_read_raises(tmp_path, deny):
    """Store.listdir said [] for a folder it could not look at (its ``exists`` check swallowed the
    error): a ledger folder that cannot be read then read as an empty ledger, and a resume would
    have taken every done shard for one never built. A folder that is not there is still []."""
    from manifests.store import LEDGER_DIR, ManifestStore
    from pipeline.storage import Store

    ms = ManifestStore(Store(str(tmp_path)))
    ms.append_events([{"shard_id": "s0", "state": "done", "build_id": "b", "sha256": "ab" * 32}])
    assert Store(str(tmp_path)).listdir("nothing/here") == []
    deny(folders=[tmp_path / "manifests"])
    store = Store(str(tmp_path))
    with pytest.raises(PermissionError):
        store.listdir(LEDGER_DIR)
    with pytest.raises(PermissionError):
        ManifestStore(store).ledger()


def test_exists_under_a_folder_that_cannot_be_read_raises(tmp_path, deny):
    """Store.exists said False for a path it could not look at: an output whose manifests folder
    cannot be read was "not a d4s output" (resume: "no recorded plan; nothing to resume"), its
    index absent. Now the error, naming the path; a path that is not there is still False."""
    from manifests.store import ManifestStore
    from pipeline.storage import Store

    ManifestStore(Store(str(tmp_path))).write_plan([], [], [])
    assert ManifestStore(Store(str(tmp_path))).has_plan() and not Store(str(tmp_path)).exists("nothing/here")
    deny(folders=[tmp_path / "manifests"])
    store = Store(str(tmp_path))
    with pytest.raises(PermissionError, match="manifests"):
        ManifestStore(store).has_plan()
    with pytest.raises(PermissionError, match="manifests"):
        store.isdir("manifests/ledger")
    assert store.exists("manifests") and store.isdir("manifests")  # looked at from outside, as with chmod 000


@pytest.mark.parametrize("cmd", ["status", "verify", "resume"])
def test_a_command_on_an_output_it_cannot_read_says_so_in_one_line(tmp_path, deny, cmd):
    """An output whose manifests folder cannot be read: a PermissionError traceback (and, before the
    store stopped hiding it, "no plan recorded"); now one line naming the path, exit 2."""
    from typer.testing import CliRunner

    from manifests.store import ManifestStore
    from pipeline.cli import app
    from pipeline.storage import Store

    ManifestStore(Store(str(tmp_path))).write_plan([], [], [])
    recorded = {"output": str(tmp_path), "datasets": {"tartanair": {"root": str(tmp_path / "data")}}}
    (tmp_path / "config.resolved.yaml").write_text(json.dumps(recorded))
    deny(folders=[tmp_path / "manifests"])
    r = CliRunner().invoke(app, [cmd, str(tmp_path)])
    text = r.output.strip()
    code = 5 if cmd == "resume" else 2  # a driver's store refused it: d4s resume's code for that
    assert r.exit_code == code and len(text.splitlines()) == 1 and "Traceback" not in text, r.output[-2000:]
    assert "ermission denied" in text and str(tmp_path / "manifests") in text, text
