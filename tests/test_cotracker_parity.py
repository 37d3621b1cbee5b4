"""CoTracker3 parity against outputs recorded from the official implementation."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.tracks.cotracker.parity import GROUPS, format_report, run_parity

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "parity" / "cotracker3"

pytestmark = pytest.mark.skipif(
    not (FIXTURE / "video.npy").is_file(), reason=f"CoTracker3 parity fixture not found at {FIXTURE}"
)


@pytest.fixture(scope="module")
def results():
    # one run for all groups: the offline cases share the encoded video
    cases = run_parity(FIXTURE)
    print("\n" + format_report(cases))
    return {c.name: c for c in cases}


@pytest.mark.parametrize("group", GROUPS)
def test_parity_group(results, group):
    mine = [c for name, c in results.items() if name.startswith(group + ".")]
    assert mine, f"no outputs for {group}"
    bad = [f"{c.name}: max {c.max_abs:.3g} mean {c.mean_abs:.3g} ({c.detail})" for c in mine if not c.ok]
    assert not bad, "; ".join(bad)


def test_every_fixture_output_is_checked(results):
    outputs = {p.name[: -len(".npy")] for p in FIXTURE.glob("case*.npy")} - {"caseA.queries", "caseC.queries"}
    assert outputs == set(results)


def test_report_and_case_selection(results):
    report = format_report(list(results.values()))
    assert "PASS" in report and "caseB.grid4.tracks" in report
    with pytest.raises(ValueError):
        run_parity(FIXTURE, cases=["nope"])
