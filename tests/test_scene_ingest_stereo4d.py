"""Stereo4D scene ingest: a scene pass's clips decoded from one read of their frames.

Stereo4D's clips overlap (9 of 49 frames at the defaults) and its frames are video frames, from
the rectified left video or rectified here from the raw VR180 video (the costlier path). Read
together, each clip must come out exactly as read alone, tracks included: they are chosen per clip,
from the scene's annotations, for the clip's own frames.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_adapter_stereo4d import EYE, RAW_OPTIONS, _meta

from pipeline.clip import Clip, ClipError
from pipeline.config import BuildConfig
from pipeline.demo.render import render
from pipeline.demo.writers import stereo4d as writer
from pipeline.stage_routes import route
from stages.ingest import get_adapter

SCENE = writer.default_scene_id(0)
CLIPS = [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [6, 7, 8, 9]]  # overlapping runs, as planned
ODD = [[0, 2, 4, 6], [9, 3, 5]]  # strided, and out of order


@pytest.fixture(scope="module")
def rendered():
    return render(writer.demo_spec(0, seed=11))


@pytest.fixture(scope="module", params=["rectified", "raw"])
def layout(request, tmp_path_factory, rendered):
    root = tmp_path_factory.mktemp(f"s4d_{request.param}")
    if request.param == "rectified":
        ws = writer.write(rendered, root, SCENE)
    else:
        ws = writer.write_raw(rendered, root, eye_size=EYE)
    return request.param, root, ws.scene_id, RAW_OPTIONS if request.param == "raw" else None


def _adapter_scene(root, scene_id, options):
    adapter = get_adapter("stereo4d", str(root), options)
    (scene,) = [s for s in adapter.discover() if s.scene == scene_id]
    return adapter, scene


def _same(a: Clip, b: Clip) -> None:
    assert a.rgb.shape == b.rgb.shape and a.rgb.tobytes() == b.rgb.tobytes()
    assert np.array_equal(a.intrinsics, b.intrinsics) and np.array_equal(a.c2w, b.c2w)
    assert a.tracks.shape == b.tracks.shape and np.array_equal(a.tracks, b.tracks, equal_nan=True)
    assert np.array_equal(a.track_visible, b.track_visible)
    assert a.meta == b.meta and list(a.meta.extra) == list(b.meta.extra)  # meta.json's bytes


@pytest.mark.parametrize("clips", [CLIPS, ODD], ids=["runs", "any"])
def test_clips_read_together_are_the_clips_read_alone(layout, clips):
    _, root, scene_id, options = layout
    adapter, scene = _adapter_scene(root, scene_id, options)
    alone = [adapter.load_clip(scene, f, _meta(scene.scene, f)) for f in clips]
    read = adapter.load_clips(scene, clips, [_meta(scene.scene, f) for f in clips])
    assert read.frames_read == len(set().union(*clips))
    for got, want in zip(read.clips, alone):
        assert isinstance(got, Clip)
        _same(got, want)
    # each clip's tracks are its own: seen in at least one of its frames, not the union's
    assert all(c.track_visible.any(axis=0).all() for c in read.clips)


def test_the_video_is_decoded_once_for_the_union(layout, monkeypatch):
    import stages.ingest.video as video

    form, root, scene_id, options = layout
    if form != "rectified":
        pytest.skip("counted on the rectified video's reader (the raw form: frames_read above)")
    asked: list[list[int]] = []
    real = video.read_video
    monkeypatch.setattr(video, "read_video", lambda *a, **kw: asked.append(list(kw["frames"])) or real(*a, **kw))
    adapter, scene = _adapter_scene(root, scene_id, options)
    adapter.load_clips(scene, CLIPS, [_meta(scene.scene, f) for f in CLIPS])
    assert asked == [sorted(set().union(*CLIPS))]


def test_a_clip_past_the_scene_fails_alone(layout):
    """A clip the union read cannot serve (a frame past the scene's end): the union read fails, each
    clip is read alone, and only that clip fails, with the reason."""
    _, root, scene_id, options = layout
    adapter, scene = _adapter_scene(root, scene_id, options)
    past = [scene.num_frames - 2, scene.num_frames - 1, scene.num_frames]
    clips = [CLIPS[0], past]
    read = adapter.load_clips(scene, clips, [_meta(scene.scene, f) for f in clips])
    first, second = read.clips
    _same(first, adapter.load_clip(scene, CLIPS[0], _meta(scene.scene, CLIPS[0])))
    assert isinstance(second, ClipError) and str(scene.num_frames) in str(second)


def test_route_ingests_stereo4d_per_scene_in_scene_passes(tmp_path):
    def cfg(**scene):
        raw = {
            "output": str(tmp_path / "out"),
            "datasets": {"stereo4d": {"root": str(tmp_path), "depth_source": "vda"}},
            "stages": {"scene": scene} if scene else {},
        }
        return BuildConfig.model_validate(raw).resolved()

    gran = {s.name: s.granularity for s in route(cfg(), "stereo4d")}
    assert gran["ingest"] == "scene" == gran["depth"]
    assert {s.name: s.granularity for s in route(cfg(granularity="clip"), "stereo4d")}["ingest"] == "clip"
