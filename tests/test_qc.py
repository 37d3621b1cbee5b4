"""Geometric QC after ingest: each check fails a clip with a reason, thresholds from config."""

import numpy as np
import pytest

from pipeline.clip import Clip, ClipError, ClipMeta
from pipeline.config import QCConfig
from pipeline.demo.render import random_scene, render
from stages.qc import geometric_qc


def _clip(tracks=True):
    r = render(random_scene("q", 2, dynamic=False, num_frames=5, height=24, width=32, num_tracks=20))
    meta = ClipMeta("tartanair", "q", "tartanair__q__000000", list(range(5)), False, False)
    return Clip(
        meta,
        r.rgb,
        r.intrinsics,
        r.c2w.copy(),
        r.depth,
        np.ones_like(r.depth, bool),
        r.tracks_world.astype(np.float32) if tracks else None,
        r.tracks_visible if tracks else None,
    )


def test_clean_clip_passes_and_reports():
    qc = geometric_qc(_clip(), QCConfig())
    assert qc["rotation_error"] < 1e-9 and qc["tracks_off_image_fraction"] == 0
    assert qc["tracks_depth_rel_error_median"] < 0.02 and qc["depth_min_m"] > 0


@pytest.mark.parametrize(
    "breakage, reason",
    [
        (lambda c: c.c2w.__setitem__((2, slice(0, 3), 0), c.c2w[2, :3, 0] * 1.1), "orthonormal"),
        (lambda c: c.c2w.__setitem__((3, slice(0, 3), 3), c.c2w[3, :3, 3] + 100.0), "moves"),
        (lambda c: c.depth_valid.__setitem__(slice(None), False), "valid"),
        (lambda c: c.tracks.__setitem__((slice(None), slice(None), 1), c.tracks[..., 1] + 0.3), "track"),
    ],
)
def test_each_check_fails_with_its_reason(breakage, reason):
    clip = _clip()
    breakage(clip)
    with pytest.raises(ClipError, match=reason):
        geometric_qc(clip, QCConfig())


def test_thresholds_come_from_config():
    clip = _clip(tracks=False)
    clip.c2w[3, :3, 3] += 2.0
    geometric_qc(clip, QCConfig())  # 2 m step is fine by default
    with pytest.raises(ClipError, match="moves"):
        geometric_qc(clip, QCConfig(max_step_translation_m=1.0))
