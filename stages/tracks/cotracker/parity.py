"""Parity of d4s's CoTracker3 against outputs recorded from the official implementation.

The fixture folder (``shared/parity/cotracker3``) holds the input video, the queries, the
official outputs and the official state_dict specs; the weights come from
``<fixture_dir>/../refweights.py`` (deterministic, keyed by official parameter name).

Cases (one :class:`ParityCase` per recorded output):

* ``caseA.queries``            offline predictor, explicit queries (+ 6x6 support grid)
* ``caseA.grid4``              offline predictor, 4x4 grid at frame 0
* ``caseA.grid4_backward_q8``  offline predictor, 4x4 grid at frame 8, backward tracking
* ``caseB.grid4``              online predictor over the streaming windows, 4x4 grid at frame 0
* ``caseC``                    raw offline network, 6 iterations, at the model resolution

Tolerances (fixture README): tracks max abs error <= 1e-2 px and mean <= 1e-3 px; thresholded
visibilities must agree exactly; raw visibility/confidence probabilities within 1e-3.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TRACK_MAX_ABS = 1e-2
TRACK_MEAN_ABS = 1e-3
PROB_MAX_ABS = 1e-3

GROUPS = ("caseA.queries", "caseA.grid4", "caseA.grid4_backward_q8", "caseB.grid4", "caseC")


@dataclass
class ParityCase:
    name: str
    max_abs: float
    max_rel: float  # max abs error / max |reference| (visibility: mismatch fraction)
    mean_abs: float
    tol_max_abs: float
    tol_mean_abs: float
    ok: bool
    detail: str
    seconds: float = 0.0


def _load_refweights(fixture_dir: Path):
    path = fixture_dir.parent / "refweights.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference weight generator not found")
    spec = importlib.util.spec_from_file_location("d4s_parity_refweights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference_model(fixture_dir: str | Path, variant: str, salt: str = ""):
    """d4s CoTracker3 filled with the fixture's reference weights (math attention, fp32, eval)."""
    from .load import load_official_state_dict
    from .model import build_model

    fixture_dir = Path(fixture_dir)
    rw = _load_refweights(fixture_dir)
    spec = json.loads((fixture_dir / f"state_dict.{variant}.json").read_text())
    model = build_model(variant, attn_impl="math")
    load_official_state_dict(model, rw.reference_state_dict(spec, salt=salt))
    return model.eval()


def _compare_float(
    name: str, ours: np.ndarray, ref: np.ndarray, tol_max: float, tol_mean: float, axes: str
) -> ParityCase:
    if ours.shape != ref.shape:
        return ParityCase(
            name,
            float("inf"),
            float("inf"),
            float("inf"),
            tol_max,
            tol_mean,
            False,
            f"shape {ours.shape} vs reference {ref.shape}",
        )
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    if not np.all(np.isfinite(err)):
        bad = np.argwhere(~np.isfinite(err))[0]
        return ParityCase(
            name,
            float("inf"),
            float("inf"),
            float("inf"),
            tol_max,
            tol_mean,
            False,
            f"non-finite output at {_where(bad, axes)}",
        )
    max_abs, mean_abs = float(err.max()), float(err.mean())
    max_rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    ok = max_abs <= tol_max and mean_abs <= tol_mean
    idx = np.unravel_index(int(err.argmax()), err.shape)
    detail = f"max error at {_where(idx, axes)}: ours {float(ours[idx]):.6f} ref {float(ref[idx]):.6f}"
    if not ok:
        t_err = err.reshape(err.shape[0], err.shape[1], -1).max(axis=(0, 2)) if err.ndim >= 3 else err
        first = int(np.argmax(t_err > tol_max)) if np.any(t_err > tol_max) else -1
        detail += f"; first frame over tolerance: {first}"
    return ParityCase(name, max_abs, max_rel, mean_abs, tol_max, tol_mean, ok, detail)


def _compare_bool(name: str, ours: np.ndarray, ref: np.ndarray, axes: str) -> ParityCase:
    if ours.shape != ref.shape:
        return ParityCase(
            name,
            float("inf"),
            float("inf"),
            float("inf"),
            0.0,
            0.0,
            False,
            f"shape {ours.shape} vs reference {ref.shape}",
        )
    mism = ours.astype(bool) != ref.astype(bool)
    n = int(mism.sum())
    frac = n / max(mism.size, 1)
    if n:
        detail = f"{n} of {mism.size} visibilities differ; first at {_where(np.argwhere(mism)[0], axes)}"
    else:
        detail = f"all {mism.size} visibilities agree ({float(ref.mean()):.3f} visible)"
    return ParityCase(name, float(n > 0), frac, frac, 0.0, 0.0, n == 0, detail)


def _where(idx, axes: str) -> str:
    names = {"b": "batch", "t": "frame", "n": "track", "c": "coord"}
    return ", ".join(f"{names[a]} {int(i)}" for a, i in zip(axes, idx))


def run_parity(fixture_dir: str | Path, salt: str = "", cases: list[str] | None = None) -> list["ParityCase"]:
    """Reproduce the recorded official outputs; one :class:`ParityCase` per output file.

    ``cases`` selects groups (see :data:`GROUPS`) or individual outputs by name prefix.
    """
    import time

    fixture_dir = Path(fixture_dir)
    if not (fixture_dir / "video.npy").is_file():
        raise FileNotFoundError(f"{fixture_dir}: no video.npy (not a CoTracker3 parity fixture)")

    def _selected(g: str, c: str) -> bool:  # exact group, an output of it, or its case letter
        return g == c or c.startswith(g + ".") or g.split(".")[0] == c

    wanted = list(GROUPS) if cases is None else [g for g in GROUPS if any(_selected(g, c) for c in cases)]
    if cases is not None and not wanted:
        raise ValueError(f"unknown cases {cases}; known: {', '.join(GROUPS)}")

    from .predictor import OfflinePredictor, OnlinePredictor, resize_video

    def load(name):
        return np.load(fixture_dir / f"{name}.npy", allow_pickle=False)

    video = torch.from_numpy(load("video")).float().permute(0, 3, 1, 2)[None]  # 1 T 3 H W
    out: list[ParityCase] = []

    def finish(group: str, results: list[ParityCase], t0: float) -> None:
        dt = time.perf_counter() - t0
        for r in results:
            r.seconds = dt
            out.append(r)

    with torch.inference_mode():
        offline_groups = [g for g in wanted if g.startswith(("caseA", "caseC"))]
        if offline_groups:
            t0 = time.perf_counter()
            model = reference_model(fixture_dir, "offline", salt)
            pred = OfflinePredictor(model)
            resized = resize_video(video, model.model_resolution)
            fmaps = model.encode(resized)  # shared by every offline case (per-frame features)
            calls = {
                "caseA.queries": dict(queries=torch.from_numpy(load("caseA.queries"))[None]),
                "caseA.grid4": dict(grid_size=4),
                "caseA.grid4_backward_q8": dict(grid_size=4, backward_tracking=True, grid_query_frame=8),
            }
            for i, g in enumerate(offline_groups):
                if i:  # the first group also carries the model build and the feature encoding
                    t0 = time.perf_counter()
                if g == "caseC":
                    q = torch.from_numpy(load("caseC.queries"))[None]
                    coords, vis, conf = model(None, q, iters=6, fmaps=fmaps)
                    res = [
                        _compare_float(
                            "caseC.coords", coords.numpy(), load("caseC.coords"), TRACK_MAX_ABS, TRACK_MEAN_ABS, "btnc"
                        ),
                        _compare_float("caseC.vis", vis.numpy(), load("caseC.vis"), PROB_MAX_ABS, PROB_MAX_ABS, "btn"),
                        _compare_float(
                            "caseC.conf", conf.numpy(), load("caseC.conf"), PROB_MAX_ABS, PROB_MAX_ABS, "btn"
                        ),
                    ]
                else:
                    tracks, visible = pred(video, fmaps=fmaps, **calls[g])
                    res = [
                        _compare_float(
                            f"{g}.tracks", tracks.numpy(), load(f"{g}.tracks"), TRACK_MAX_ABS, TRACK_MEAN_ABS, "btnc"
                        ),
                        _compare_bool(f"{g}.visibility", visible.numpy(), load(f"{g}.visibility"), "btn"),
                    ]
                finish(g, res, t0)
        if "caseB.grid4" in wanted:
            t0 = time.perf_counter()
            model = reference_model(fixture_dir, "online", salt)
            tracks, visible = OnlinePredictor(model)(video, grid_size=4, grid_query_frame=0)
            res = [
                _compare_float(
                    "caseB.grid4.tracks",
                    tracks.numpy(),
                    load("caseB.grid4.tracks"),
                    TRACK_MAX_ABS,
                    TRACK_MEAN_ABS,
                    "btnc",
                ),
                _compare_bool("caseB.grid4.visibility", visible.numpy(), load("caseB.grid4.visibility"), "btn"),
            ]
            finish("caseB.grid4", res, t0)
    return out


def format_report(cases: list[ParityCase]) -> str:
    """Markdown table of the cases plus a one-line verdict."""
    lines = [
        "| case | max abs | mean abs | max rel | tolerance (max / mean) | ok | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c.name} | {c.max_abs:.3g} | {c.mean_abs:.3g} | {c.max_rel:.3g} | "
            f"{c.tol_max_abs:g} / {c.tol_mean_abs:g} | {'yes' if c.ok else 'NO'} | {c.detail} |"
        )
    n_ok = sum(c.ok for c in cases)
    verdict = "PASS" if cases and n_ok == len(cases) else "FAIL"
    lines.append("")
    lines.append(f"CoTracker3 parity: {verdict} ({n_ok}/{len(cases)} outputs within tolerance)")
    return "\n".join(lines)
