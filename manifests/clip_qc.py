"""Per-sample QC summaries kept in the ledger, and failure reasons grouped into categories.

A done shard's ledger event carries one small record per written sample (``clip_qc``): its size,
depth range, the alignment / track QC numbers, the ground-truth self-check's agreement and the
counts of ground-truth track points the adapters' filters removed. ``d4s status`` and
``d4s report`` draw their distributions from these records alone, so they never have to open a
shard.
"""

from __future__ import annotations

import math
import re

import numpy as np

# Scalar fields copied from meta.qc['align'] / meta.qc['tracks'] (see stages/align/qc.py,
# stages/tracks/lift.py); anything else in those dicts stays in the sample's meta.json only.
ALIGN_FIELDS = (
    "scale",
    "shift",
    "inlier_ratio",
    "residual",
    "abs_rel",
    "delta_1_25",
    "pose_scale",
    "consistency_error",
    "pixel_error",
    "keep",
)
TRACK_FIELDS = ("kept_fraction", "median_drift_m", "median_drift_rel", "num_tracks", "checked")
# From meta.qc['selfcheck'] (stages/selfcheck.py) and meta.qc['gt_tracks'] (the adapters' track filters).
SELFCHECK_FIELDS = ("agreement", "overlap")
GT_TRACK_FIELDS = ("dropped_jumps", "hidden_off_image")


def _scalar(v):
    """A JSON-safe scalar: per-frame lists become their median, NaN/inf become None."""
    if isinstance(v, (list, tuple, np.ndarray)):
        arr = np.asarray(v, dtype=np.float64)
        v = float(np.median(arr)) if arr.size else None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    return None


def sample_qc(clip, sample: dict) -> dict:
    """The ledger's QC record of one encoded sample (``sample``: the webdataset dict)."""
    rec: dict = {
        "key": clip.key,
        "dataset": clip.meta.dataset,
        "frames": int(clip.num_frames),
        "bytes": int(
            sum(len(v) for k, v in sample.items() if not k.startswith("__") and isinstance(v, (bytes, bytearray)))
        ),
        "depth_source": clip.meta.depth_source,
    }
    if clip.depth is not None and clip.depth_valid is not None and clip.depth_valid.any():
        d = np.asarray(clip.depth[clip.depth_valid], dtype=np.float64)
        p5, p50, p95 = np.percentile(d, [5, 50, 95])
        rec.update(
            depth_p5_m=float(p5),
            depth_median_m=float(p50),
            depth_p95_m=float(p95),
            valid_depth_fraction=float(clip.depth_valid.mean()),
        )
    align = clip.meta.qc.get("align")
    if align:
        rec["align"] = {k: _scalar(align.get(k)) for k in ALIGN_FIELDS if k in align}
        rec["align"]["reference"] = align.get("reference")
    tracks = clip.meta.qc.get("tracks")
    if tracks:
        rec["tracks"] = {k: _scalar(tracks.get(k)) for k in TRACK_FIELDS if k in tracks}
    for name, fields in (("selfcheck", SELFCHECK_FIELDS), ("gt_tracks", GT_TRACK_FIELDS)):
        part = clip.meta.qc.get(name)
        if isinstance(part, dict) and any(k in part for k in fields):
            rec[name] = {k: _scalar(part.get(k)) for k in fields if k in part}
    return rec


# Reasons whose leading words name their category (measures and hints follow in parentheses).
NAMED_REASONS = ("pose/depth convention mismatch",)  # stages/selfcheck.py
_NUMBER = re.compile(r"(?<![\w.])[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?(?![\w])")
_PATHLIKE = re.compile(r"\S*/\S*")
_PARENS = re.compile(r"\s*\([^()]*\)")


def failure_categories(stage: str, reason: str, clip_id: str | None = None) -> list[str]:
    """Stable categories of a failure reason, for counting drops by reason.

    QC drops list several failed checks (``align QC: inlier_ratio 0.31 < 0.5; residual ...``):
    each check is one category named by its measure. Other reasons lose their numbers and paths
    so that the same problem in different clips counts once.
    """
    reason = reason or ""
    for name in NAMED_REASONS:
        if reason.startswith(name):
            return [f"{stage}: {name}"]
    for prefix in ("align QC:", "track QC:"):
        if reason.startswith(prefix):
            parts = [p.strip() for p in reason[len(prefix) :].split(";") if p.strip()]
            names = (
                sorted({re.split(r"[:<>]|\s[-+x]?\d", p)[0].strip() for p in parts})
                if prefix == "align QC:"
                else ["static drift"]
            )
            return [f"{prefix} {n}" for n in names] or [prefix.rstrip(":")]
    text = reason.split("; log:")[0]
    if clip_id:
        text = text.replace(clip_id, "<clip>")
    text = _PARENS.sub("", text)
    text = _PATHLIKE.sub("<path>", text)
    text = _NUMBER.sub("#", text)
    text = re.sub(r"\s+", " ", text).strip()
    return [f"{stage}: {text[:90]}"]
