"""A small run of the synthetic alignment accuracy benchmark (bench/align_accuracy.py): good
clips of every reference kind are kept, and every clip whose output scale is wrong (> 10 %) is
dropped. The full run (100 clips per scenario) and its table are in docs/ALIGNMENT.md."""

from __future__ import annotations

from bench.align_accuracy import SCENARIOS, WRONG_SCALE, run


def test_small_accuracy_run_keeps_good_clips_and_drops_wrong_scales():
    res = run(trials=3, seed=1, lifting=False)
    s = res["summary"]
    per = s["per_scenario"]
    assert s["good_kept"] >= 0.99, {k: (v["kept"], v["reasons"]) for k, v in per.items() if v["good"]}
    assert s["wrong_scale_clips"] >= 6  # the corruptions do produce wrong scales
    assert s["wrong_scale_dropped"] >= 0.99, [
        r for r in res["rows"] if r["kept"] and r.get("scale_error", 0) > WRONG_SCALE
    ]
    for name, (_, _, _, _, good) in SCENARIOS.items():
        if good:
            assert per[name]["abs_rel"] < 0.04 and per[name]["sky_with_depth"] < 0.03, (name, per[name])
        elif good is False:
            assert per[name]["kept"] <= 1 / 3, (name, per[name])
