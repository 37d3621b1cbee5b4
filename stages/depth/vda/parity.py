"""Parity of the d4s Video Depth Anything port against the official implementation's recordings.

A fixture folder (``shared/parity/vda``) holds the official outputs, recorded on CPU in float32,
and ``state_dict.vits.json`` (names and shapes); the weights are regenerated on both sides by
``../refweights.py`` (``reference_state_dict(spec, salt)``). Cases:

* ``caseA`` - raw network forward of one 32-frame window (relative model),
* ``caseB_relative`` / ``caseB_metric`` - whole-video inference (60 frames, input size 112,
  3 windows, stitching) of the relative and the metric model.

Tolerances (fixture README): max abs error <= 1e-4 and mean abs error <= 1e-5 (float32, CPU).
``max_rel`` is reported, not gated: near-zero outputs make it meaningless (the official code's own
thread-count noise reaches 1.6e-3 there); it is measured where |ref| >= 1% of the output range.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .infer import STEP, infer_video_depth, num_windows
from .load import load_official_state_dict
from .model import build_vda

TOL_ABS = 1e-4
TOL_MEAN_ABS = 1e-5
CASE_NAMES = ("caseA", "caseB_relative", "caseB_metric")
CASEB_INPUT_SIZE = 112


@dataclass
class ParityCase:
    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    tol_abs: float
    tol_rel: float | None  # not gated (see module docstring)
    tol_mean_abs: float
    ok: bool
    detail: str
    seconds: float = 0.0


def load_refweights(fixture_dir: str | Path):
    """Import ``fixture_dir/../refweights.py`` as a module (without touching sys.path)."""
    path = Path(fixture_dir).resolve().parent / "refweights.py"
    if not path.is_file():
        raise FileNotFoundError(f"refweights.py not found beside the fixture: {path}")
    name = "_d4s_parity_refweights"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses/pickling inside the module may look it up
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def reference_model(fixture_dir: str | Path, salt: str = "", metric: bool = False, encoder: str = "vits"):
    """The model built as the fixture's official run built it, with the reference weights."""
    fixture_dir = Path(fixture_dir)
    spec = json.loads((fixture_dir / f"state_dict.{encoder}.json").read_text())
    weights = load_refweights(fixture_dir).reference_state_dict(spec, salt=salt)
    model = build_vda(encoder, metric=metric)
    return load_official_state_dict(model, weights)


def _compare(name: str, ours: np.ndarray, ref: np.ndarray, where, seconds: float) -> ParityCase:
    if ours.shape != ref.shape:
        return ParityCase(
            name,
            float("inf"),
            float("inf"),
            float("inf"),
            TOL_ABS,
            None,
            TOL_MEAN_ABS,
            False,
            f"shape {ours.shape} != reference {ref.shape}",
            seconds,
        )
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_abs, mean_abs = float(err.max()), float(err.mean())
    scale = float(ref.max() - ref.min()) or 1.0
    big = np.abs(ref) >= 0.01 * scale
    max_rel = float((err[big] / np.abs(ref[big])).max()) if big.any() else 0.0
    at = np.unravel_index(int(err.argmax()), err.shape)
    ok = bool(np.isfinite(ours).all() and max_abs <= TOL_ABS and mean_abs <= TOL_MEAN_ABS)
    over = int((err > TOL_ABS).sum())
    detail = (
        f"max |err| at {where(at)}: ours {float(ours[at]):.6f} ref {float(ref[at]):.6f}; "
        f"{over} of {err.size} values over {TOL_ABS:g}"
    )
    if not ok:
        per_frame = err.reshape(-1, *err.shape[-2:]).max(axis=(1, 2))
        bad = np.flatnonzero(per_frame > TOL_ABS)
        if bad.size:
            detail += f"; first frame over tolerance: {int(bad[0])}, frames over: {bad.size}/{per_frame.size}"
    return ParityCase(name, max_abs, max_rel, mean_abs, TOL_ABS, None, TOL_MEAN_ABS, ok, detail, seconds)


def _where_video(num_frames: int):
    def where(at) -> str:
        f = int(at[0])
        k = max(0, (f - 2) // STEP)  # the last window whose output set (or blended into) this frame
        return f"frame {f} (window {min(k, num_windows(num_frames) - 1)}), y {int(at[1])}, x {int(at[2])}"

    return where


def run_parity(fixture_dir: str | Path, salt: str = "", cases: list[str] | None = None) -> list[ParityCase]:
    """Reproduce every (or the named) fixture case with the d4s model; one ParityCase each."""
    fixture_dir = Path(fixture_dir)
    wanted = list(cases) if cases else list(CASE_NAMES)
    unknown = [c for c in wanted if c not in CASE_NAMES]
    if unknown:
        raise ValueError(f"unknown parity cases {unknown}; known: {list(CASE_NAMES)}")
    out: list[ParityCase] = []
    models: dict[bool, torch.nn.Module] = {}

    def model(metric: bool):
        if metric not in models:
            models[metric] = reference_model(fixture_dir, salt, metric=metric)
        return models[metric]

    for name in wanted:
        t0 = time.perf_counter()
        if name == "caseA":
            x = torch.from_numpy(np.load(fixture_dir / "caseA.input.npy", allow_pickle=False))
            ref = np.load(fixture_dir / "caseA.vits.output.npy", allow_pickle=False)
            with torch.inference_mode():
                ours = model(False)(x).numpy()
            where = lambda at: f"window {int(at[0])}, frame {int(at[1])}, y {int(at[2])}, x {int(at[3])}"  # noqa: E731
        else:
            metric = name == "caseB_metric"
            frames = np.load(fixture_dir / "caseB.frames.npy", allow_pickle=False)
            ref = np.load(fixture_dir / f"caseB.{'metric_vits' if metric else 'vits'}.depth.npy", allow_pickle=False)
            ours = infer_video_depth(
                model(metric), frames, CASEB_INPUT_SIZE, windows_per_batch=num_windows(len(frames)), device="cpu"
            )
            where = _where_video(len(frames))
        out.append(_compare(name, ours, ref, where, time.perf_counter() - t0))
    return out


def format_report(cases: list[ParityCase]) -> str:
    lines = [
        "VDA parity (d4s vs official recordings)",
        f"{'case':<16} {'max_abs':>10} {'mean_abs':>10} {'max_rel':>10} {'tol_abs':>8} {'tol_mean':>8} {'s':>6}  result",
    ]
    for c in cases:
        lines.append(
            f"{c.name:<16} {c.max_abs:>10.3e} {c.mean_abs:>10.3e} {c.max_rel:>10.3e} {c.tol_abs:>8.0e} "
            f"{c.tol_mean_abs:>8.0e} {c.seconds:>6.1f}  {'PASS' if c.ok else 'FAIL'}"
        )
        lines.append(f"    {c.detail}")
    n_ok = sum(c.ok for c in cases)
    lines.append(f"{n_ok}/{len(cases)} cases pass")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m stages.depth.vda.parity FIXTURE_DIR [SALT]
    res = run_parity(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
    print(format_report(res))
    sys.exit(0 if all(c.ok for c in res) else 1)
