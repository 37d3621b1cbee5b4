"""Ground-truth self-check: clips read from good fixtures pass; each convention error is caught."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import geometry as geo
from pipeline.clip import ClipError, ClipFailure, ClipMeta
from pipeline.config import BuildConfig, QCConfig
from pipeline.demo.render import render
from pipeline.demo.writers import writer_module
from stages.ingest import get_adapter
from stages.selfcheck import agreement, gt_self_check

SYNTHETIC = ["tartanair", "matrixcity", "pointodyssey", "dynamic_replica", "spring", "vkitti2", "kubric_movi_f"]

# The convention errors the check must catch, applied to a clip as an adapter bug would leave it.
BREAKAGES = {
    "inverted pose": lambda c: setattr(c, "c2w", geo.invert_pose(c.c2w)),
    "flipped y/z": lambda c: setattr(c, "c2w", c.c2w @ geo.GL_TO_CV),
    "transposed rotation": lambda c: c.c2w.__setitem__(
        (slice(None), slice(0, 3), slice(0, 3)), np.swapaxes(c.c2w[:, :3, :3], 1, 2).copy()
    ),
    "depth in millimetres": lambda c: setattr(c, "depth", c.depth * 1000.0),
    "depth in kilometres": lambda c: setattr(c, "depth", c.depth / 1000.0),
}


def _demo_clip(dataset, root, index=0, frames=range(8)):
    """A demo scene of ``dataset`` written in its raw layout and read back by its adapter."""
    w = writer_module(dataset)
    w.write(render(w.demo_spec(index, seed=11 + index)), root, w.default_scene_id(index))
    adapter = get_adapter(dataset, str(root))
    scene = adapter.discover()[0]
    meta = ClipMeta(dataset, scene.scene, f"{dataset}:{index}", list(frames), True, False)
    return adapter.load_clip(scene, list(frames), meta)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return {ds: _demo_clip(ds, tmp_path_factory.mktemp(ds)) for ds in SYNTHETIC}


@pytest.mark.parametrize("dataset", SYNTHETIC)
def test_good_fixtures_pass(clips, dataset):
    res = gt_self_check(clips[dataset], QCConfig())
    assert res["judged"] and res["agreement"] >= QCConfig().selfcheck_min_agreement
    assert res["overlap"] >= QCConfig().selfcheck_min_overlap and res["compared"] > 1000


# Transposition is tested where it changes the geometry: a level camera in a y-up world (the
# PointOdyssey and Dynamic Replica fixtures) has a half-turn rotation, which is its own transpose.
@pytest.mark.parametrize("dataset", ["tartanair", "spring", "vkitti2"])
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_each_convention_error_is_flagged(clips, dataset, breakage):
    import copy

    clip = copy.deepcopy(clips[dataset])
    BREAKAGES[breakage](clip)
    with pytest.raises(ClipError, match="pose/depth convention mismatch"):
        gt_self_check(clip, QCConfig())


@pytest.mark.parametrize(
    "breakage, hint",
    [
        ("inverted pose", "poses were inverted"),
        ("flipped y/z", "y and z axes were flipped"),
        ("depth in millimetres", "depth were in millimetres"),
    ],
)
def test_reason_names_the_error_that_explains_the_clip(clips, breakage, hint):
    import copy

    clip = copy.deepcopy(clips["tartanair"])
    BREAKAGES[breakage](clip)
    with pytest.raises(ClipError, match=hint) as err:
        gt_self_check(clip, QCConfig())
    assert err.value.path.startswith("tartanair/")


def test_thresholds_and_switch_come_from_config(clips, tmp_path):
    clip = clips["spring"]
    with pytest.raises(ClipError, match="convention mismatch"):
        gt_self_check(clip, QCConfig(selfcheck_min_agreement=0.999))
    # Without the self-check, Spring poses read the wrong way round pass every other check.
    _write_spring_with(tmp_path, geo.invert_pose)
    assert not isinstance(_ingest_spring(tmp_path, qc={"selfcheck": False}), ClipFailure)
    assert isinstance(_ingest_spring(tmp_path), ClipFailure)


def test_static_camera_is_not_failed():
    """Without camera motion no convention can be told from another: the clip passes."""
    r = render(writer_module("tartanair").demo_spec(0, seed=5))
    c2w = np.repeat(r.c2w[:1], len(r.c2w), axis=0)
    res = agreement(
        r.rgb[:1].repeat(4, 0),
        r.depth[:1].repeat(4, 0),
        np.ones((4, *r.depth.shape[1:]), bool),
        r.intrinsics[:4],
        geo.invert_pose(c2w[:4]),
        2048,
    )
    assert res["agreement"] == pytest.approx(1.0)


def test_clip_without_valid_depth_is_left_to_the_geometric_qc(clips):
    import copy

    clip = copy.deepcopy(clips["tartanair"])
    clip.depth_valid[:] = False
    res = gt_self_check(clip, QCConfig())
    assert not res["judged"] and res["overlap"] is None
    from stages.qc import geometric_qc

    with pytest.raises(ClipError, match="valid"):
        geometric_qc(clip, QCConfig())


# -- Spring end to end: the extrinsics.txt whose direction and axes its authors never state ------
def _write_spring_with(root, transform):
    w = writer_module("spring")
    ws = w.write(render(w.demo_spec(0, seed=21)), root, w.default_scene_id(0))
    ext = root / ws.scene_id / "cam_data" / "extrinsics.txt"
    rows = np.loadtxt(ext).reshape(-1, 4, 4)
    ext.write_text("\n".join(" ".join(f"{v:.9g}" for v in transform(m).ravel()) for m in rows) + "\n")


def _ingest_spring(root, qc=None):
    from stages.ingest.stage import ingest_clip

    cfg = BuildConfig.model_validate(
        {
            "output": str(root / "out"),
            "qc": qc or {},
            "datasets": {"spring": {"root": str(root), "track_source": "none"}},
        }
    ).resolved()
    adapter = get_adapter("spring", str(root))
    scene = adapter.discover()[0]
    spec = {"dataset": "spring", "scene": scene.scene, "clip_id": "spring__c0", "frames": list(range(8)), "ordinal": 0}
    return ingest_clip(spec, scene, cfg)


@pytest.mark.parametrize(
    "transform, hint",
    [
        (lambda w2c: w2c, None),  # as the writer wrote it: world-to-camera, OpenCV axes
        (geo.invert_pose, "poses were inverted"),  # camera-to-world written
        (lambda w2c: geo.GL_TO_CV @ w2c, "y and z axes were flipped"),  # OpenGL camera axes
        (lambda w2c: geo.invert_pose(geo.GL_TO_CV @ w2c), "inverted with y and z flipped"),  # OpenGL camera-to-world
    ],
    ids=["as-documented", "camera-to-world", "opengl-axes", "both"],
)
def test_spring_extrinsics_conventions_at_ingest(tmp_path, transform, hint):
    _write_spring_with(tmp_path, transform)
    out = _ingest_spring(tmp_path)
    if hint is None:
        assert not isinstance(out, ClipFailure), out
        assert out.meta.qc["selfcheck"]["agreement"] >= QCConfig().selfcheck_min_agreement
        return
    assert isinstance(out, ClipFailure) and out.stage == "ingest"
    assert out.reason.startswith("pose/depth convention mismatch") and hint in out.reason
    assert out.path == "spring/train/0001/spring__c0"


def test_selfcheck_reaches_the_sample_records_status_and_report(tmp_path):
    from manifests.clip_qc import failure_categories, sample_qc
    from pipeline.report import render_report
    from pipeline.status import qc_distributions

    _write_spring_with(tmp_path / "good", lambda w2c: w2c)
    good = _ingest_spring(tmp_path / "good")
    _write_spring_with(tmp_path / "bad", geo.invert_pose)
    bad = _ingest_spring(tmp_path / "bad")
    rec = sample_qc(good, {"x.json": b"{}"})
    assert rec["selfcheck"]["agreement"] == pytest.approx(good.meta.qc["selfcheck"]["agreement"])
    assert 0 < rec["selfcheck"]["overlap"] <= 1
    dist = qc_distributions([rec])["spring"]
    assert dist["GT self-check agreement"]["n"] == 1
    category = failure_categories(bad.stage, bad.reason, bad.clip_id)
    assert category == ["ingest: pose/depth convention mismatch"]
    st = {
        "output": "o",
        "datasets": {"spring": {"clips_done": 1, "clips_failed": 1, "clips_pending": 0}},
        "stages": {},
        "shards": {"done": 1, "failed": 0, "running": 0, "pending": 0},
        "stage_seconds": {},
        "throughput": {"build_id": None, "clips": 0, "seconds": 0.0, "clips_per_s": None, "eta_s": None},
        "qc": {"spring": dist},
        "drops": {"spring": {category[0]: 1}},
        "failures": [],
    }
    events = [{"shard_id": "spring-000000", "state": "done", "build_id": "b", "clip_qc": [rec]}]
    page = render_report(st, events, "o")
    assert 'id="selfcheck"' in page and 'id="fig-selfcheck"' in page
    assert f'<td>spring</td><td class="n">1</td><td class="n">{rec["selfcheck"]["agreement"]:.3f}' in page


def test_inspect_runs_the_self_check(tmp_path):
    from stages.ingest.inspect import inspect_path

    _write_spring_with(tmp_path / "good", lambda w2c: w2c)
    _write_spring_with(tmp_path / "bad", geo.invert_pose)
    good = inspect_path("spring", str(tmp_path / "good" / "train" / "0001"))
    bad = inspect_path("spring", str(tmp_path / "bad" / "train" / "0001"))
    assert good["problems"] == [] and good["selfcheck_min_agreement"] >= QCConfig().selfcheck_min_agreement
    assert any("pose/depth convention mismatch" in p and "poses were inverted" in p for p in bad["problems"])


@pytest.mark.slow
def test_build_with_inverted_spring_poses_writes_nothing_and_says_why(tmp_path, ray_local):
    """A wrong convention stops every clip of the dataset at ingest; status names the reason."""
    from pipeline.runner import build
    from pipeline.status import collect_status

    _write_spring_with(tmp_path / "data", geo.invert_pose)
    cfg = BuildConfig.model_validate(
        {
            "output": str(tmp_path / "out"),
            "shard_size": 2,
            "datasets": {
                "spring": {"root": str(tmp_path / "data"), "track_source": "none", "clip_length": 4, "clip_stride": 2}
            },
            "ray": {"num_cpus": 2},
        }
    )
    summary = build(cfg, show_progress=False)
    assert summary.clips_written == 0 and len(summary.failures) > 0
    st = collect_status(str(tmp_path / "out"))
    assert st["drops"] == {"spring": {"ingest: pose/depth convention mismatch": len(summary.failures)}}
