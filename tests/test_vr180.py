"""The VR180 rectifier (stages/ingest/vr180.py) against the Stereo4D authors' own rectify.py.

tests/fixtures/stereo4d_rectify/ holds the left view their code made from a synthetic 3840x1920
side-by-side frame (pattern.py, bit-identical everywhere) with OpenCV 4 and with OpenCV 5
(make_reference.py says how; docs/datasets/stereo4d.md records the figures). d4s resamples
with OpenCV 4's arithmetic; its maps are computed in float64 where theirs are float32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.clip import ClipError
from stages.ingest.vr180 import RectifySpec, check_calibration, check_layout, rectify_left_eye

FIXTURE = Path(__file__).parent / "fixtures" / "stereo4d_rectify"
sys.path.insert(0, str(FIXTURE))
import pattern  # noqa: E402


@pytest.fixture(scope="module")
def rectified():
    meta = json.loads((FIXTURE / "reference_opencv4.json").read_text())
    h = meta["height"]
    spec = RectifySpec(
        (h, h),
        tuple(np.asarray(meta["rectified2rig"][0], np.float64).reshape(-1)),
        tuple(meta["fov_bounds"]),
        meta["size"],
        meta["hfov_deg"],
    )
    return rectify_left_eye(pattern.sbs_frame(h, meta["frame"])[None], spec, device="cpu")[0]


def _ref(major: int) -> np.ndarray:
    return np.asarray(Image.open(FIXTURE / f"reference_opencv{major}.png").convert("RGB")).astype(int)


def test_matches_the_authors_rectify_opencv4(rectified):
    diff = np.abs(rectified.astype(int) - _ref(4))
    # Measured: 519 of 786,432 values differ (0.07%), max 6, mean 0.0013. They are where a
    # 1-pixel line of full contrast meets a sampling position that their float32 maps and our
    # float64 maps round to neighbouring 1/32 pixels; everything else is bit-identical.
    assert (diff > 0).mean() < 0.002 and diff.max() <= 8 and diff.mean() < 0.005


def test_close_to_the_authors_rectify_opencv5(rectified):
    diff = np.abs(rectified.astype(int) - _ref(5))
    # OpenCV 5 interpolates in floating point instead of on a 1/32-pixel grid: measured max 6,
    # mean 0.099 (62,211 values differ by mostly 1).
    assert diff.max() <= 8 and diff.mean() < 0.2


def test_layout_and_calibration_checks():
    assert check_layout(3840, 1920, "v.mp4", 1920) == (1920, 1920)
    with pytest.raises(ClipError, match="top-bottom or monoscopic"):
        check_layout(1920, 1920, "v.mp4")
    with pytest.raises(ClipError, match="only 1080 pixels high"):
        check_layout(2160, 1080, "v.mp4", 1920)
    good = pattern.rectified2rig()
    check_calibration(good, pattern.FOV_BOUNDS, "c.npz")
    with pytest.raises(ClipError, match=r"must be \(2,3,3\)"):
        check_calibration(good[0], pattern.FOV_BOUNDS, "c.npz")
    with pytest.raises(ClipError, match="not a pair of rotations"):
        check_calibration(good * 1.1, pattern.FOV_BOUNDS, "c.npz")
    with pytest.raises(ClipError, match="increasing"):
        check_calibration(good, [90, -90, -90, 90], "c.npz")
