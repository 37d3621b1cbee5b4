"""Every JSON d4s writes is strict (RFC 8259): no NaN/Infinity tokens, which strict parsers reject.
A number that could not be computed is written as null (docs/FORMAT.md, docs/MANIFESTS.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from manifests.store import ManifestStore
from pipeline.storage import Store


def strict_loads(text):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def test_meta_json_of_a_clip_without_kept_tracks_is_strict():
    """Static-track QC of a clip whose tracks are never visible twice has no drift to report."""
    from test_sample_format import _clip

    from pipeline.sample_format import decode_sample, encode_clip
    from stages.tracks.lift import static_drift_qc

    clip = _clip()
    qc = static_drift_qc(clip.tracks, np.zeros_like(clip.track_visible), clip.c2w)
    assert qc["median_drift_m"] is None and qc["checked"] is False  # premise: nothing to measure
    clip.meta.qc["tracks"] = qc
    clip.meta.qc["align"] = {"scale": np.float32(1.5), "abs_rel": float("inf"), "per_frame": [1.0, float("nan")]}
    sample = encode_clip(clip)
    meta = strict_loads(sample["meta.json"])
    assert meta["qc"]["tracks"]["median_drift_m"] is None and meta["qc"]["tracks"]["kept_fraction"] is None
    assert meta["qc"]["align"] == {"scale": 1.5, "abs_rel": None, "per_frame": [1.0, None]}
    assert decode_sample(sample).meta.qc["tracks"]["median_drift_rel"] is None


def test_ledger_json_columns_are_strict(tmp_path):
    ms = ManifestStore(Store(str(tmp_path)))
    ms.append_events(
        [
            {
                "shard_id": "s-0",
                "state": "done",
                "timings": {"ingest": float("nan")},
                "clip_qc": [{"key": "k", "tracks": {"median_drift_m": float("nan")}}],
                "clips_failed": [{"clip_id": "c", "stage": "align", "reason": "r", "path": None}],
            }
        ]
    )
    import pyarrow.parquet as pq

    (name,) = [p for p in (tmp_path / "manifests" / "ledger").iterdir()]
    row = pq.read_table(name).to_pylist()[0]
    for col in ("timings", "clip_qc", "clips_failed", "samples"):
        strict_loads(row[col])
    assert strict_loads(row["timings"]) == {"ingest": None}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float64("nan")])
def test_dumps_writes_null_for_non_finite_numbers(value):
    from pipeline.strict_json import dumps

    text = dumps({"a": [value, 1.0, np.int64(3), (np.float32(0.5),)], "b": np.array([value, 2.0])})
    assert strict_loads(text) == {"a": [None, 1.0, 3, [0.5]], "b": [None, 2.0]}


def test_dumps_keeps_finite_output_byte_identical():
    """Shards stay byte-reproducible across this change: finite meta serialises exactly as before."""
    from pipeline.strict_json import dumps

    obj = {"z": 1, "a": [0.1, 1e-300, 123456789.125, True, None, "x"], "m": {"k": np.float64(2.5)}}
    assert dumps(obj, sort_keys=True) == json.dumps(obj, sort_keys=True)


def test_training_metrics_lines_are_strict(tmp_path):
    """A diverged loss is logged as null, and the metrics file stays readable line by line."""
    from training.trainer import _append_jsonl

    url = str(tmp_path / "metrics.jsonl")
    _append_jsonl(url, {"step": 1, "loss": float("nan"), "lr": 1e-4})
    _append_jsonl(url, {"step": 2, "loss": 0.5, "lr": 1e-4})
    rows = [strict_loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": None, "lr": 1e-4}, {"step": 2, "loss": 0.5, "lr": 1e-4}]


def test_cli_json_output_is_strict(tmp_path, monkeypatch):
    """``d4s status --json`` (and every --json command, through the same writer) prints strict JSON."""
    from typer.testing import CliRunner

    import pipeline.status
    from pipeline.cli import app

    monkeypatch.setattr(pipeline.status, "collect_status", lambda output: {"output": output, "x": float("nan")})
    res = CliRunner().invoke(app, ["status", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert strict_loads(res.stdout) == {"output": str(tmp_path), "x": None}
