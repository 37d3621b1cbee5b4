"""Parity of the VDA port against the official recordings in ../shared/parity/vda."""

from pathlib import Path

import pytest

from stages.depth.vda.parity import format_report, run_parity

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "parity" / "vda"
pytestmark = pytest.mark.skipif(
    not (FIXTURE / "state_dict.vits.json").is_file() or not (FIXTURE.parent / "refweights.py").is_file(),
    reason=f"VDA parity fixture not found at {FIXTURE} (needs the shared/ folder beside the repo)",
)


def _check(cases):
    report = format_report(cases)
    assert all(c.ok for c in cases), report
    for c in cases:
        assert c.max_abs <= c.tol_abs and c.mean_abs <= c.tol_mean_abs, report


def test_caseA_raw_forward():
    _check(run_parity(FIXTURE, cases=["caseA"]))


def test_caseB_whole_video_relative_and_metric():
    cases = run_parity(FIXTURE, cases=["caseB_relative", "caseB_metric"])
    assert [c.name for c in cases] == ["caseB_relative", "caseB_metric"]
    _check(cases)


def test_wrong_salt_fails_with_detail():
    """A different weight salt must not pass: the comparison is not vacuous."""
    (case,) = run_parity(FIXTURE, salt="not-the-recorded-salt", cases=["caseA"])
    assert not case.ok and "frame" in case.detail
