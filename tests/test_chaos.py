"""The chaos script, short: seeded kills of Ray workers and of the driver, second drivers, skewed
clocks and killed compactions during a demo build and its resumes; every trial must end verified,
byte-identical to a clean build, nothing lost or twice.

More trials: ``python -m pytest -q -m slow tests/test_chaos.py`` or ``python bench/chaos.py --trials N``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parents[1] / "bench" / "chaos.py"


def _chaos():
    spec = importlib.util.spec_from_file_location("d4s_bench_chaos", CHAOS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(s: dict, trials: int) -> None:
    assert s["trials"] == trials and s["all_finished"], s["per_trial"]
    assert s["faults_injected"] > 0, "no fault was injected"
    for t in s["per_trial"]:
        assert t["verify_ok"], t["verify_problems"]
        assert t["identical"], f"trial {t['trial']}: shards differ from the clean build"
        assert t["failed_as_reference"]
        assert t["lost"] == 0 and t["duplicated"] == 0 and t["ledger_rows_twice"] == 0
        assert t["hangs"] == 0
        assert all(
            f.get("outcome") in ("refused", "ran after the first ended")
            for f in t["faults"]
            if f["kind"] == "second_driver"
        )
    assert s["clips_lost"] == 0 and s["clips_duplicated"] == 0


def test_chaos_two_trials(tmp_path):
    s = _chaos().main(["--trials", "2", "--seed", "4", "--datasets", "tartanair,pointodyssey", "--out", str(tmp_path)])
    _check(s, 2)
    assert (tmp_path / "chaos.json").exists() and (tmp_path / "chaos.md").exists()


@pytest.mark.slow
def test_chaos_more_trials(tmp_path):
    s = _chaos().main(["--trials", "6", "--seed", "11", "--out", str(tmp_path)])
    _check(s, 6)
    assert set(s["faults_by_kind"]) >= {"driver", "worker"}


@pytest.mark.slow
def test_chaos_with_scene_passes_and_megasam(tmp_path):
    """Kills during scene passes (depth actor, MegaSaM tasks, align tasks) and of MegaSaM runs."""
    s = _chaos().main(["--trials", "3", "--seed", "5", "--datasets", "tartanair", "--megasam", "--out", str(tmp_path)])
    _check(s, 3)
    assert set(s["faults_by_kind"]) & {"megasam", "scene"}, s["faults_by_kind"]


@pytest.mark.slow
def test_chaos_on_a_cluster_with_the_output_on_s3(tmp_path):
    """Node kills, S3 outages, second drivers, clock skew and compaction kills, drivers joining one
    multi-node cluster and writing to the S3 server."""
    pytest.importorskip("moto.server")
    s = _chaos().main(
        [
            "--trials",
            "3",
            "--seed",
            "6",
            "--datasets",
            "tartanair,pointodyssey",
            "--nodes",
            "2",
            "--num-cpus",
            "1",
            "--s3",
            "--out",
            str(tmp_path),
        ]
    )
    _check(s, 3)
    assert s["ledger_rows_twice"] == 0
