"""Scene ingest: the clips of one scene pass are read together, each source frame read (decoded) once.

RealEstate10K's default clips (49 frames at stride 2, a clip every 48 source frames) share half
their frames with a neighbour; read clip by clip, those frames were decoded twice (bench/RESULTS.md
§7, session 11: 0.29 CPU-s per clip, 0.27 of it decoding). Read together, the clips must come out
exactly as when each is read alone, and a bad frame must still fail only the clips that use it.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_vda

from pipeline.clip import Clip, ClipError, ClipFailure, ClipMeta
from pipeline.config import BuildConfig
from pipeline.demo.render import render
from pipeline.demo.writers import realestate10k as writer
from pipeline.stage_routes import route
from stages.ingest import get_adapter

SCENE = writer.default_scene_id(0)
CLIPS = [[0, 2, 4, 6], [4, 6, 8], [9, 0, 5]]  # overlapping, one out of order
RUNS = [[0, 2, 4, 6], [4, 6, 8], [6, 8]]  # strided clips, as planned: each a run of their union


@pytest.fixture(scope="module")
def rendered():
    return render(writer.demo_spec(0, seed=3))


@pytest.fixture(scope="module", params=["images", "jpeg", "clip_video", "video", "chunk"])
def layout(request, tmp_path_factory, rendered):
    root = tmp_path_factory.mktemp(f"re10k_{request.param}")
    if request.param == "images":
        writer.write(rendered, root, SCENE)
    elif request.param == "jpeg":
        writer.write(rendered, root, SCENE, image_ext=".jpg", jpeg_quality=90)
    elif request.param == "clip_video":
        writer.write(rendered, root, SCENE, with_frames=False, with_video=True)
    elif request.param == "video":
        writer.write(rendered, root, SCENE, with_frames=False, with_youtube_video=True, video_step=2)
    else:
        writer.write_chunk([(rendered, SCENE)], root)
    return request.param, root


def _meta(scene: str, frames: list[int], i: int) -> ClipMeta:
    return ClipMeta(
        dataset="realestate10k",
        scene=scene,
        clip_id=f"c{i}",
        frame_indices=list(frames),
        dynamic=False,
        real=True,
    )


def _adapter_scene(root):
    adapter = get_adapter("realestate10k", str(root))
    (scene,) = [s for s in adapter.discover() if s.scene == SCENE]
    return adapter, scene


def _same(a: Clip, b: Clip) -> None:
    assert a.rgb.dtype == b.rgb.dtype and a.rgb.shape == b.rgb.shape and a.rgb.tobytes() == b.rgb.tobytes()
    assert np.array_equal(a.intrinsics, b.intrinsics) and np.array_equal(a.c2w, b.c2w)
    assert a.meta == b.meta
    assert list(a.meta.extra) == list(b.meta.extra)  # the order meta.json is written in


@pytest.mark.parametrize("clips", [CLIPS, RUNS], ids=["any", "runs"])
def test_clips_read_together_are_the_clips_read_alone(layout, clips):
    _, root = layout
    adapter, scene = _adapter_scene(root)
    alone = [adapter.load_clip(scene, f, _meta(scene.scene, f, i)) for i, f in enumerate(clips)]
    read = adapter.load_clips(scene, clips, [_meta(scene.scene, f, i) for i, f in enumerate(clips)])
    assert read.frames_read == len(set().union(*clips))  # each distinct frame once
    for got, want in zip(read.clips, alone):
        assert isinstance(got, Clip)
        _same(got, want)


def test_each_frame_the_clips_share_is_decoded_once(rendered, tmp_path, monkeypatch):
    """Counted on image files (the other forms are checked by frames_read above)."""
    writer.write(rendered, tmp_path, SCENE, image_ext=".jpg", jpeg_quality=90)
    adapter, scene = _adapter_scene(tmp_path)
    read_paths = []
    real = adapter.read_image
    monkeypatch.setattr(adapter, "read_image", lambda rel, **kw: read_paths.append(rel) or real(rel, **kw))
    adapter.load_clips(scene, CLIPS, [_meta(scene.scene, f, i) for i, f in enumerate(CLIPS)])
    assert len(read_paths) == len(set(read_paths)) == len(set().union(*CLIPS))


def test_a_bad_frame_fails_only_the_clips_that_use_it(rendered, tmp_path):
    ws = writer.write(rendered, tmp_path, SCENE)
    bad = tmp_path / SCENE / f"{ws.frame_ids[8]}.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: only the second clip uses frame 8
    adapter, scene = _adapter_scene(tmp_path)
    read = adapter.load_clips(scene, CLIPS, [_meta(scene.scene, f, i) for i, f in enumerate(CLIPS)])
    first, second, third = read.clips
    assert isinstance(first, Clip) and isinstance(third, Clip)
    assert isinstance(second, ClipError)
    assert second.path.endswith(f"{ws.frame_ids[8]}.png") and "truncated" in second.reason
    _same(first, adapter.load_clip(scene, CLIPS[0], _meta(scene.scene, CLIPS[0], 0)))


def test_an_adapter_without_union_extras_reads_clip_by_clip(rendered, tmp_path, monkeypatch):
    """An adapter that declares no per-frame extras (and cuts no clips itself) reads each clip
    alone; frames_read then counts every clip's frames. So does a single clip."""
    writer.write(rendered, tmp_path, SCENE)
    adapter, scene = _adapter_scene(tmp_path)
    monkeypatch.setattr(type(adapter), "union_extras", None)  # a class's capability
    assert not adapter.reads_scene_union()
    read = adapter.load_clips(scene, CLIPS, [_meta(scene.scene, f, i) for i, f in enumerate(CLIPS)])
    assert read.frames_read == sum(len(f) for f in CLIPS)
    for got, f, i in zip(read.clips, CLIPS, range(3)):
        _same(got, adapter.load_clip(scene, f, _meta(scene.scene, f, i)))
    one = get_adapter("realestate10k", str(tmp_path)).load_clips(scene, CLIPS[:1], [_meta(scene.scene, CLIPS[0], 0)])
    assert one.frames_read == len(CLIPS[0])


# ------------------------------------------------------------------------------------------------
# The stage and the route


def _cfg(root, **scene) -> BuildConfig:
    return BuildConfig.model_validate(
        {
            "output": str(root / "out"),
            "datasets": {
                "realestate10k": {"root": str(root), "clip_length": 4, "frame_stride": 2, "clip_stride": 4},
                "tartanair": {"root": str(root / "none")},
            },
            "stages": {"scene": scene} if scene else {},
        }
    ).resolved()


def _specs(scene_id: str) -> list[dict]:
    return [
        {
            "dataset": "realestate10k",
            "scene": scene_id,
            "clip_id": f"realestate10k__x__{i:06d}",
            "frames": f,
            "ordinal": i,
        }
        for i, f in enumerate(CLIPS)
    ]


def test_ingest_scene_gives_each_clip_what_ingest_clip_gives_it(rendered, tmp_path):
    from stages.ingest.stage import ingest_clip, ingest_scene

    ws = writer.write(rendered, tmp_path, SCENE)
    bad = tmp_path / SCENE / f"{ws.frame_ids[8]}.png"
    bad.write_bytes(bad.read_bytes()[:200])
    cfg = _cfg(tmp_path)
    _, scene = _adapter_scene(tmp_path)
    specs = _specs(scene.scene)
    together = ingest_scene(specs, scene, cfg)
    alone = [ingest_clip(s, scene, cfg) for s in specs]
    assert [type(c) for c in together] == [Clip, ClipFailure, Clip]
    assert together[1].stage == "ingest" and together[1].path.endswith(f"{ws.frame_ids[8]}.png")
    assert (together[1].reason, together[1].path) == (alone[1].reason, alone[1].path)
    for got, want in ((together[0], alone[0]), (together[2], alone[2])):
        _same(got, want)
        assert got.meta.qc == want.meta.qc
    # frames read, counted once per scene (on its first clip that got through) and once per clip alone
    read = sum(c.aux.get("stats", {}).get("ingest.frames_read", 0) for c in together if isinstance(c, Clip))
    read += sum(c.stats.get("ingest.frames_read", 0) for c in together if isinstance(c, ClipFailure))
    assert read == sum(len(f) for f in CLIPS)  # the union failed, so each clip was read alone
    assert [c.aux["stats"]["ingest.frames_read"] for c in alone if isinstance(c, Clip)] == [4, 3]
    assert alone[1].stats["ingest.frames_read"] == 3
    good = ingest_scene(_specs(scene.scene)[::2], scene, cfg)  # the clips without the bad frame
    assert [type(c) for c in good] == [Clip, Clip]
    assert good[0].aux["stats"]["ingest.frames_read"] == len(set(CLIPS[0]) | set(CLIPS[2]))
    assert "ingest.frames_read" not in good[1].aux.get("stats", {})


def test_route_ingests_per_scene_where_the_depth_model_runs_per_scene(tmp_path):
    cfg = _cfg(tmp_path)
    gran = {s.name: s.granularity for s in route(cfg, "realestate10k")}
    assert gran["ingest"] == "scene" == gran["depth"]
    assert {s.name: s.granularity for s in route(cfg, "tartanair")}["ingest"] == "clip"  # depth of its own
    per_clip = _cfg(tmp_path, granularity="clip")
    assert {s.name: s.granularity for s in route(per_clip, "realestate10k")}["ingest"] == "clip"


@pytest.mark.parametrize("crash", [False, True], ids=["clean", "worker_dies_in_scene_ingest"])
def test_a_build_reads_each_source_frame_once_per_scene(tmp_path, ray_local, crash):
    """Through the DAG: the build's ingest.frames_read is the scenes' distinct frames; a worker
    that dies inside a scene ingest (at its second clip) is retried, every clip once."""
    from test_build import all_keys, planned_ids

    from pipeline.plan import make_plan
    from pipeline.runner import build
    from pipeline.verify import verify

    for i in range(2):
        writer.write(render(writer.demo_spec(i, seed=3 + i)), tmp_path / "data", writer.default_scene_id(i))
    raw = {
        "output": str(tmp_path / "out"),
        "shard_size": 4,
        "datasets": {
            "realestate10k": {
                "root": str(tmp_path / "data"),
                "clip_length": 4,
                "frame_stride": 2,
                "clip_stride": 2,
                "depth_source": "vda_metric",
                "track_source": "none",
            }
        },
        "stages": {"depth": tiny_vda(), "align": {"drop_on_qc": False}},
        "ray": {"num_cpus": 2},
        "fault": {"worker_exit_on_clip": 1, "marker_dir": str(tmp_path / "marks")} if crash else {},
    }
    cfg = BuildConfig.model_validate(raw).resolved()
    plan = make_plan(cfg)
    distinct = len({(c["scene"], f) for c in plan.clips for f in c["frames"]})
    assert distinct < sum(len(c["frames"]) for c in plan.clips)  # the clips do share frames
    s = build(cfg, show_progress=False)
    assert s.clips_failed == 0 and s.clips_written == len(plan.clips)
    assert s.stats["ingest.frames_read"] == distinct
    assert s.stats["ingest.clip_frames"] == sum(len(c["frames"]) for c in plan.clips)
    assert (tmp_path / "marks" / "worker_exit_1").exists() == crash  # the crash really happened
    out = tmp_path / "out"
    keys = all_keys(out)
    assert sorted(keys) == sorted(planned_ids(out)) and len(keys) == len(set(keys)) and verify(str(out)).ok


def test_the_build_summary_says_how_many_frames_were_read(capsys):
    from types import SimpleNamespace

    from pipeline.cli import _print_summary

    s = SimpleNamespace(
        output="out", clips_written=4, clips_failed=0, shards_done=2, shards_skipped=0, shards_failed=0,
        shards_failed_transient=0, seconds=1.0, failures=[], stats={"ingest.frames_read": 40, "ingest.clip_frames": 64},
    )  # fmt: skip
    _print_summary(s)
    assert "ingest: 40 frames read for 64 clip frames" in capsys.readouterr().err
    s.stats = {"ingest.frames_read": 64, "ingest.clip_frames": 64}  # every clip read alone: nothing to say
    _print_summary(s)
    assert "frames read" not in capsys.readouterr().err
