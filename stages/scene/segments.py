"""Long scenes in overlapping segments, and the results of the segments joined into one.

A scene sequence longer than ``stages.scene.max_frames`` is cut into segments of that length
that share at least ``overlap_frames`` frames with the previous one (the last segment is moved
back to end at the scene's end, so it overlaps more). Memory and the MegaSaM run time stay
bounded; each source frame still goes through the model once per segment that holds it.

Joining follows Video Depth Anything's window joining (``stages/depth/vda/infer.py``,
``stitch_windows``): the next segment is brought onto what is already joined by a least-squares
fit on the shared frames, then the shared frames are blended linearly from the old values to
the new ones. Where VDA fits on two key frames and blends eight, a segment join fits on every
shared frame and blends all of them.

* relative disparity (the relative depth model): scale and shift (``fit="affine"``);
* metric depth (the metric model, MegaSaM): scale only (``fit="scale"``), because each MegaSaM
  run picks its own metric scale;
* values that are no measurement stay out of the fit and keep their value: 0 (no depth, or
  relative disparity 0: the sky) and, with ``ceiling``, values at it (MegaSaM writes the far field
  at 100 m: a marker meaning "that far or farther", which scaling would turn into a false depth
  and which, over a large sky, would pull the fitted scale towards 1). On shared frames a pixel
  measured in only one of the two results takes that one's value;
* MegaSaM cameras: each run has its own world frame too; the next segment's poses are mapped by
  the similarity (scale from the depth fit, rotation and translation averaged over the shared
  frames) that puts its shared cameras onto the joined ones; the joined poses keep the earlier
  segment's value on shared frames (poses are not blended).
"""

from __future__ import annotations

import numpy as np


def plan_segments(num_frames: int, max_frames: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` positions of the segments of a sequence of ``num_frames``."""
    if num_frames <= 0:
        raise ValueError("a sequence needs at least one frame")
    if num_frames <= max_frames:
        return [(0, num_frames)]
    if not 0 < overlap <= max_frames // 2:
        raise ValueError(f"overlap {overlap} must be in 1..{max_frames // 2}")
    step = max_frames - overlap
    starts = list(range(0, num_frames - max_frames, step)) + [num_frames - max_frames]
    return [(a, a + max_frames) for a in starts]


def _measured(x: np.ndarray, ceiling: float | None) -> np.ndarray:
    """Where ``x`` holds a measurement: finite, positive and (with a ceiling) below it by more
    than 0.1 % (the tolerance the MegaSaM reference reads its ceiling with)."""
    ok = np.isfinite(x) & (x > 0)
    if ceiling is not None:
        ok &= x < ceiling * (1 - 1e-3)
    return ok


def _fit(new: np.ndarray, old: np.ndarray, fit: str, ceiling: float | None = None) -> tuple[float, float]:
    ok = _measured(new, ceiling) & _measured(old, ceiling)
    if ok.sum() < 16:
        raise ValueError(f"segments share only {int(ok.sum())} valid pixels: cannot join them")
    x, y = new[ok].astype(np.float64), old[ok].astype(np.float64)
    if fit == "scale":
        # the ratio's median: robust to the pixels where the two runs disagree (occlusions, sky)
        return float(np.median(y / x)), 0.0
    a = np.vstack([x, np.ones_like(x)]).T
    (s, t), *_ = np.linalg.lstsq(a, y, rcond=None)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"segments disagree: joining them needs a non-positive scale ({s:.3g})")
    return float(s), float(t)


def join_maps(
    parts: list[np.ndarray], segments: list[tuple[int, int]], fit: str, ceiling: float | None = None
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """One ``(T, H, W)`` map from per-segment maps; returns it and each segment's ``(scale, shift)``.

    ``ceiling``: the value that marks "this far or farther" (MegaSaM's), kept as it is (module doc)."""
    if len(parts) != len(segments):
        raise ValueError(f"{len(parts)} results for {len(segments)} segments")
    if fit not in ("affine", "scale"):
        raise ValueError(f"fit must be 'affine' or 'scale', got {fit!r}")
    total = segments[-1][1]
    out = np.empty((total,) + parts[0].shape[1:], dtype=np.float32)
    a0, b0 = segments[0]
    out[a0:b0] = parts[0]
    done, coeffs = b0, [(1.0, 0.0)]
    for part, (a, b) in zip(parts[1:], segments[1:]):
        n_ov = done - a
        s, t = _fit(part[:n_ov], out[a:done], fit, ceiling)
        raw = part.astype(np.float32)
        measured = _measured(raw, ceiling)
        new = np.where(measured, np.maximum(raw * np.float32(s) + np.float32(t), 0.0), raw)
        w = np.linspace(0.0, 1.0, n_ov + 2, dtype=np.float32)[1:-1].reshape((-1,) + (1,) * (part.ndim - 1))
        old = out[a:done]
        blend = old * (1.0 - w) + new[:n_ov] * w
        old_measured = _measured(old, ceiling)
        out[a:done] = np.where(old_measured & measured[:n_ov], blend, np.where(measured[:n_ov], new[:n_ov], old))
        out[done:b] = new[n_ov:]
        done = b
        coeffs.append((s, t))
    return out, coeffs


def _project_rotation(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r


def join_trajectories(parts: list[np.ndarray], segments: list[tuple[int, int]], scales: list[float]) -> np.ndarray:
    """One ``(T, 4, 4)`` camera-to-world trajectory from per-segment ones, each in its own world.

    ``scales[k]`` maps segment k's units onto the joined ones (from :func:`join_maps` on its
    metric depth, composed along the chain by the caller's order: segment k is fitted against the
    already joined result, so its scale is absolute)."""
    total = segments[-1][1]
    out = np.empty((total, 4, 4))
    a0, b0 = segments[0]
    out[a0:b0] = parts[0]
    done = b0
    for part, (a, b), s in zip(parts[1:], segments[1:], scales[1:]):
        n_ov = done - a
        scaled = np.array(part, dtype=np.float64)
        scaled[:, :3, 3] *= s
        # g maps the segment's (scaled) world into the joined world: g @ scaled[j] ~= out[a + j]
        gs = [out[a + j] @ np.linalg.inv(scaled[j]) for j in range(n_ov)]
        g = np.eye(4)
        g[:3, :3] = _project_rotation(np.sum([x[:3, :3] for x in gs], axis=0))
        # translation: put the shared camera centres on the joined ones on average
        c_new = scaled[:n_ov, :3, 3] @ g[:3, :3].T
        g[:3, 3] = np.mean(out[a:done, :3, 3] - c_new, axis=0)
        mapped = g @ scaled
        out[done:b] = mapped[n_ov:]
        done = b
    return out
