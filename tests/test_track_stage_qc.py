"""Track-stage QC in the pipeline: static scenes' tracks must stay put; QC goes into meta."""

import numpy as np
import pytest

from pipeline.clip import Clip, ClipMeta
from pipeline.config import BuildConfig
from pipeline.demo.render import random_scene, render
from stages.tracks.stage import apply_static_track_qc, tracks_from_depth


def _cfg(**tracks):
    return BuildConfig.model_validate(
        {
            "output": "/tmp/x",
            "datasets": {"tartanair": {"root": "/tmp"}},
            "stages": {"tracks": {"grid_size": 6, **tracks}},
        }
    )


def _static_clip():
    r = render(random_scene("s", 5, dynamic=False, num_frames=6, height=24, width=32))
    meta = ClipMeta("tartanair", "s", "tartanair__s__000000", list(range(6)), False, False, depth_source="gt")
    return Clip(meta, r.rgb, r.intrinsics, r.c2w, r.depth, np.ones_like(r.depth, bool))


def test_depth_static_tracks_pass_qc_with_no_drift():
    clip = tracks_from_depth(_static_clip(), _cfg())
    assert isinstance(clip, Clip) and clip.meta.track_source == "depth_static"
    qc = clip.meta.qc["tracks"]
    assert qc["median_drift_m"] < 1e-4 and qc["kept_fraction"] > 0.95


def test_drifting_tracks_in_a_static_scene_are_dropped_with_reason():
    clip = tracks_from_depth(_static_clip(), _cfg())
    rng = np.random.default_rng(0)
    clip.tracks = clip.tracks + rng.normal(0, 0.5, clip.tracks.shape).astype(np.float32)  # 50 cm jitter
    with pytest.raises(ValueError, match="track QC"):
        apply_static_track_qc(clip, _cfg())
    apply_static_track_qc(clip, _cfg(drop_on_qc=False))  # recorded, kept
    assert clip.meta.qc["tracks"]["kept_fraction"] < 0.5


def test_a_clip_whose_tracks_cannot_be_checked_is_not_dropped_as_drifting():
    """With no track visible in two frames (a 1-frame clip, which the config allows) drift cannot be
    measured: the clip was dropped as "only 0 % of tracks stay put (median drift nan m)". QC now
    records that it could not check, and keeps the clip."""
    c = _static_clip()
    one = Clip(c.meta, c.rgb[:1], c.intrinsics[:1], c.c2w[:1], c.depth[:1], c.depth_valid[:1])
    one.meta.frame_indices = [0]
    clip = tracks_from_depth(one, _cfg())
    assert isinstance(clip, Clip), clip
    assert clip.meta.qc["tracks"]["checked"] is False and clip.meta.qc["tracks"]["num_tracks"] == 0
    clip.track_visible[:] = False  # tracked, but never seen twice: the same
    apply_static_track_qc(clip, _cfg())
    assert clip.meta.qc["tracks"]["checked"] is False
    from manifests.clip_qc import sample_qc

    # the ledger's QC record says so too (docs/MANIFESTS.md, clip_qc): it had the null figures only
    assert sample_qc(clip, {})["tracks"]["checked"] is False
    assert sample_qc(tracks_from_depth(_static_clip(), _cfg()), {})["tracks"]["checked"] is True
