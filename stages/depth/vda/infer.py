"""Whole-video inference for Video Depth Anything: the official procedure, batched.

The official ``infer_video_depth`` cuts a video into windows of 32 frames with step 22 (overlap
10); from the second window on, the first 10 inputs are the previous window's *inputs* at the key
frames ``[0, 12, 24..31]``. Unrolled, window ``k >= 1`` therefore reads the video frames
``[0, 22(k-1)+12, 22k+2, ..., 22k+31]`` (padding repeats the last frame): every window's input is
known before any depth is computed. This module uses that to

* preprocess each distinct frame once, on the device (bicubic resize + ImageNet normalisation),
* run the windows of one clip, or of many clips of the same network size, in one forward pass
  (``windows_per_batch``), under optional bf16/fp16 autocast,
* leave only the cheap window-to-window stitching sequential (scale/shift least squares on two
  key frames, linear blend of the 8 overlapping frames, negatives clamped; the metric model uses
  scale 1, shift 0), done on the device at the input resolution.

:func:`infer_video_depth_official_style` keeps the official control flow (one window per
forward, CPU frame-by-frame preprocessing, NumPy stitching) as the benchmark baseline and as an
independent reference in tests.

Outputs are ``(T, H, W)`` float32 at the input frames' resolution: relative *disparity* for the
relative model, metric depth (metres) for the metric model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

INFER_LEN = 32
OVERLAP = 10
STEP = INFER_LEN - OVERLAP
KEYFRAMES = (0, 12, 24, 25, 26, 27, 28, 29, 30, 31)
INTERP_LEN = 8
ALIGN_LEN = OVERLAP - INTERP_LEN  # 2 frames used for the scale/shift fit
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- planning
def network_size(height: int, width: int, input_size: int = 518) -> tuple[int, int]:
    """Network input (h, w) for frames of ``height x width``: the official resize rule.

    Very wide/tall videos (long/short side > 1.78) get a reduced ``input_size``; then the frame is
    scaled keeping its aspect ratio so that the SHORT side is at least ``input_size``, both sides
    rounded to multiples of 14 (rounding up where rounding to nearest would undershoot).
    """
    ratio = max(height, width) / min(height, width)
    if ratio > 1.78:
        input_size = round(int(input_size * 1.777 / ratio) / 14) * 14
    scale = max(input_size / height, input_size / width)

    def fit(x: float) -> int:
        y = int(np.round(x / 14) * 14)
        return y if y >= input_size else int(np.ceil(x / 14) * 14)

    if input_size < 14:
        raise ValueError(
            f"frames of {height}x{width} are too thin for the depth model: at that aspect ratio "
            f"({ratio:.0f}:1) its input size rounds to {input_size} pixels"
        )
    return fit(scale * height), fit(scale * width)


def num_windows(num_frames: int) -> int:
    return max(1, -(-num_frames // STEP))


def window_frame_indices(num_frames: int) -> np.ndarray:
    """``(n_windows, 32)`` video frame index read by each window slot (after key-frame reuse)."""
    n = num_windows(num_frames)
    idx = np.arange(INFER_LEN)[None, :] + STEP * np.arange(n)[:, None]
    for k in range(1, n):  # the first OVERLAP inputs come from the previous window's key frames
        idx[k, :OVERLAP] = idx[k - 1, list(KEYFRAMES)]
    return np.minimum(idx, num_frames - 1)  # padding repeats the last frame


# ----------------------------------------------------------------------------- preprocessing
def _as_uint8_frames(frames) -> np.ndarray | torch.Tensor:
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T,H,W,3) uint8, got {tuple(frames.shape)} {frames.dtype}")
        return frames
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be (T,H,W,3) uint8, got {arr.shape} {arr.dtype}")
    if arr.shape[0] == 0:
        raise ValueError("empty video")
    return arr


def preprocess(frames_uint8: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N,H,W,3)`` uint8 (any device) -> ``(N,3,h,w)`` float32 normalised, on the same device.

    /255, bicubic resize (a=-0.75, half-pixel centres, edge replicate, no antialias: OpenCV's
    INTER_CUBIC), then ImageNet mean/std.
    """
    x = frames_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _autocast(device: torch.device, dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- stitching
def _fit_scale_shift(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``s, t`` minimising ||s*pred + t - target||^2 over all pixels (float64 sums)."""
    p = pred.double().flatten()
    q = target.double().flatten()
    a00, a01, a11 = (p * p).sum(), p.sum(), float(p.numel())
    b0, b1 = (p * q).sum(), q.sum()
    det = a00 * a11 - a01 * a01
    ok = det != 0
    safe = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (a11 * b0 - a01 * b1) / safe, torch.ones_like(det))
    t = torch.where(ok, (-a01 * b0 + a00 * b1) / safe, torch.zeros_like(det))
    return s.float(), t.float()


def stitch_windows(
    window_depth: torch.Tensor,
    num_frames: int,
    out_hw: tuple[int, int],
    metric: bool,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Official window-to-window alignment of ``(n_windows, 32, h, w)`` depth (network size).

    Each window is resized (bilinear, align_corners) to ``out_hw`` on its device, then aligned to
    the frames already kept; finished frames are copied to the ``(num_frames, H, W)`` float32
    result as soon as they can no longer change.
    """
    n = window_depth.shape[0]
    if n != num_windows(num_frames):
        raise ValueError(f"{n} windows for {num_frames} frames, expected {num_windows(num_frames)}")
    H, W = out_hw
    if out is None:
        out = np.empty((num_frames, H, W), dtype=np.float32)
    dev = window_depth.device
    w = torch.linspace(0.0, 1.0, INTERP_LEN, dtype=torch.float64)
    w_post = w.float().to(dev).view(-1, 1, 1)
    w_pre = (1.0 - w).float().to(dev).view(-1, 1, 1)
    written = 0  # frames of `out` already final
    tail = None  # last INTERP_LEN kept frames (may still be blended), video frames written..written+8
    ref0 = ref1 = None

    def flush(frames: torch.Tensor):
        nonlocal written
        take = min(frames.shape[0], num_frames - written)
        if take > 0:
            out[written : written + take] = frames[:take].cpu().numpy()
        written += frames.shape[0]

    for k in range(n):
        d = window_depth[k].float().unsqueeze(1)
        if tuple(d.shape[-2:]) != (H, W):
            d = F.interpolate(d, size=(H, W), mode="bilinear", align_corners=True)
        d = d.squeeze(1)
        if k == 0:
            ref0, ref1 = d[KEYFRAMES[0]], d[KEYFRAMES[1]]
            flush(d[: INFER_LEN - INTERP_LEN])
            tail = d[INFER_LEN - INTERP_LEN :]
            continue
        if metric:
            s = torch.ones((), device=dev)
            t = torch.zeros((), device=dev)
        else:
            s, t = _fit_scale_shift(d[:ALIGN_LEN], torch.stack([ref0, ref1]))
        post = (d[ALIGN_LEN:OVERLAP] * s + t).clamp_min_(0)
        blended = tail * w_pre + post * w_post
        new = (d[OVERLAP:] * s + t).clamp_min_(0)
        ref1 = new[KEYFRAMES[1] - OVERLAP]
        flush(torch.cat([blended, new[:-INTERP_LEN]]))
        tail = new[-INTERP_LEN:]
    flush(tail)
    return out


def stitch_windows_reference(depth_list: list[np.ndarray], metric: bool, num_frames: int) -> np.ndarray:
    """NumPy version of the official stitching on per-frame arrays (window-major, 32 per window)."""
    aligned: list[np.ndarray] = []
    ref: list[np.ndarray] = []
    weights = np.linspace(0.0, 1.0, INTERP_LEN)
    for start in range(0, len(depth_list), INFER_LEN):
        win = depth_list[start : start + INFER_LEN]
        if not aligned:
            aligned += list(win)
            ref = [win[k] for k in KEYFRAMES[:ALIGN_LEN]]
            continue
        if metric:
            s, t = 1.0, 0.0
        else:
            p = np.concatenate(win[:ALIGN_LEN]).astype(np.float64).ravel()
            q = np.concatenate(ref).astype(np.float64).ravel()
            a00, a01, a11, b0, b1 = (p * p).sum(), p.sum(), p.size, (p * q).sum(), q.sum()
            det = a00 * a11 - a01 * a01
            s, t = ((a11 * b0 - a01 * b1) / det, (a00 * b1 - a01 * b0) / det) if det != 0 else (1.0, 0.0)
            s, t = np.float32(s), np.float32(t)
        fix = lambda x: np.maximum(x * s + t, 0).astype(np.float32)  # noqa: E731
        post = [fix(x) for x in win[ALIGN_LEN:OVERLAP]]
        aligned[-INTERP_LEN:] = [
            (a * np.float32(1 - wt) + b * np.float32(wt)).astype(np.float32)
            for a, b, wt in zip(aligned[-INTERP_LEN:], post, weights)
        ]
        aligned += [fix(x) for x in win[OVERLAP:]]
        ref = [ref[0]] + [fix(win[k]) for k in KEYFRAMES[1:ALIGN_LEN]]
    return np.stack(aligned[:num_frames]).astype(np.float32)


# ----------------------------------------------------------------------------- batched path
@dataclass
class _Plan:
    frames: np.ndarray | torch.Tensor  # (T,H,W,3) uint8
    net_hw: tuple[int, int]
    windows: np.ndarray  # (n, 32) frame indices
    depth: torch.Tensor | None = None  # (n, 32, h, w) float32, filled window by window


def forward_windows(model, x: torch.Tensor, index: torch.Tensor | None = None, dtype: str = "fp32") -> torch.Tensor:
    """Windows -> ``(B, 32, h, w)`` float32 depth. ``x`` is either the windows ``(B, 32, 3, h, w)``
    or distinct frames ``(N, 3, h, w)`` with ``index`` ``(B, 32)`` (see ``VideoDepthAnything.forward``)."""
    with torch.inference_mode(), _autocast(x.device, dtype):
        y = model(x) if index is None else model(x, index)
    return y.float()


def _window_inputs(
    plans: list[_Plan], items: list[tuple[int, int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct preprocessed frames ``(N, 3, h, w)`` of the windows ``items`` = [(plan, window)]
    and the ``(len(items), 32)`` index of each window slot into them."""
    frames, index, offset = [], [], 0
    by_plan: dict[int, list[int]] = {}
    for pi, k in items:
        by_plan.setdefault(pi, []).append(k)
    for pi, ks in by_plan.items():  # dicts keep insertion order, so rows follow `items` per plan
        plan = plans[pi]
        idx = plan.windows[ks]  # (len(ks), 32)
        uniq, inv = np.unique(idx, return_inverse=True)
        if isinstance(plan.frames, torch.Tensor):
            raw = plan.frames[torch.as_tensor(uniq, device=plan.frames.device)]
        else:
            raw = torch.from_numpy(np.ascontiguousarray(plan.frames[uniq]))
            if device.type == "cuda":
                raw = raw.pin_memory()
        frames.append(preprocess(raw.to(device, non_blocking=True), plan.net_hw))
        index.append(torch.as_tensor(inv.reshape(idx.shape) + offset))
        offset += len(uniq)
    x = torch.cat(frames) if len(frames) > 1 else frames[0]
    return x, torch.cat(index).to(device)


def infer_videos(
    model,
    videos: Sequence,
    input_size: int = 518,
    *,
    dtype: str = "fp32",
    windows_per_batch: int = 4,
    metric: bool | None = None,
    device: str | torch.device | None = None,
    dedup: bool = True,
) -> list[np.ndarray]:
    """Depth for several videos, windows of all of them batched per forward pass.

    ``videos``: sequence of ``(T_i, H_i, W_i, 3)`` uint8 arrays (NumPy or torch). Windows of
    videos with the same network input size share forward passes (``windows_per_batch`` windows,
    i.e. 32x that many frames, per pass). Returns ``(T_i, H_i, W_i)`` float32 per video.
    ``metric`` defaults to ``model.metric``; ``model`` may be a ``torch.compile``d module.
    ``dedup``: run the per-frame stage once per distinct frame of a batch (overlapping windows
    share 10 of their 32 frames); ``False`` feeds full windows like the official forward.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    if metric is None:
        metric = bool(getattr(model, "metric", False))
    plans = []
    for v in videos:
        v = _as_uint8_frames(v)
        t, h, w = int(v.shape[0]), int(v.shape[1]), int(v.shape[2])
        plans.append(_Plan(v, network_size(h, w, input_size), window_frame_indices(t)))
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for pi, plan in enumerate(plans):
        groups.setdefault(plan.net_hw, []).extend((pi, k) for k in range(plan.windows.shape[0]))
    bsz = max(1, int(windows_per_batch))
    for items in groups.values():
        for i in range(0, len(items), bsz):
            chunk = items[i : i + bsz]
            frames, index = _window_inputs(plans, chunk, device)
            if dedup:
                depth = forward_windows(model, frames, index, dtype)
            else:
                depth = forward_windows(model, frames[index], None, dtype)
            rows = [(pi, k) for pi in dict.fromkeys(p for p, _ in chunk) for p2, k in chunk if p2 == pi]
            for row, (pi, k) in enumerate(rows):  # the row order of _window_inputs
                plan = plans[pi]
                if plan.depth is None:
                    plan.depth = torch.empty((plan.windows.shape[0],) + depth.shape[1:], device=device)
                plan.depth[k] = depth[row]
    results = []
    for plan in plans:
        t, h, w = int(plan.frames.shape[0]), int(plan.frames.shape[1]), int(plan.frames.shape[2])
        results.append(stitch_windows(plan.depth, t, (h, w), metric))
        plan.depth = None
    return results


def infer_video_depth(
    model,
    frames,
    input_size: int = 518,
    *,
    dtype: str = "fp32",
    windows_per_batch: int = 4,
    metric: bool | None = None,
    device: str | torch.device | None = None,
    dedup: bool = True,
) -> np.ndarray:
    """Depth ``(T, H, W)`` float32 of one video ``(T, H, W, 3)`` uint8 RGB (official procedure).

    Relative model: affine-invariant disparity; metric model: metres. See :func:`infer_videos`.
    """
    return infer_videos(
        model,
        [frames],
        input_size,
        dtype=dtype,
        windows_per_batch=windows_per_batch,
        metric=metric,
        device=device,
        dedup=dedup,
    )[0]


# ----------------------------------------------------------------------------- official-style baseline
def preprocess_frame_cpu(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One frame the official way (on the CPU): ``(H,W,3)`` uint8 -> ``(3,h,w)`` float32.

    Uses ``cv2.resize(INTER_CUBIC)`` when OpenCV is importable (as the official code), otherwise
    the same bicubic kernel through torch."""
    img = frame.astype(np.float32) / 255.0
    if img.shape[:2] != tuple(size):
        try:  # what the official code calls, where OpenCV is installed
            import cv2

            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
        except ImportError:
            t = torch.from_numpy(img).permute(2, 0, 1)[None]
            img = F.interpolate(t, size=size, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    img = (img - np.asarray(MEAN)) / np.asarray(STD)
    return np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32)


def infer_video_depth_official_style(
    model,
    frames,
    input_size: int = 518,
    *,
    fp32: bool = True,
    metric: bool | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The official control flow: one 32-frame window per forward, each frame preprocessed on the
    CPU, the previous window's inputs copied in, depth moved to the CPU frame by frame and stitched
    in NumPy. ``fp32=False`` runs under fp16 autocast like the official default."""
    frames = np.asarray(_as_uint8_frames(frames))
    device = torch.device(device) if device is not None else _model_device(model)
    if metric is None:
        metric = bool(getattr(model, "metric", False))
    t, h, w = frames.shape[:3]
    size = network_size(h, w, input_size)
    pad = (STEP - t % STEP) % STEP + OVERLAP
    frame_list = list(frames) + [frames[-1]] * pad
    depth_list: list[np.ndarray] = []
    prev = None
    for start in range(0, t, STEP):
        cur = torch.stack(
            [torch.from_numpy(preprocess_frame_cpu(frame_list[start + i], size)) for i in range(INFER_LEN)]
        )[None].to(device)
        if prev is not None:
            cur[:, :OVERLAP] = prev[:, list(KEYFRAMES)]
        with torch.inference_mode(), _autocast(device, "fp32" if fp32 else "fp16"):
            d = model(cur)
        d = F.interpolate(d.float().flatten(0, 1).unsqueeze(1), size=(h, w), mode="bilinear", align_corners=True)
        depth_list += [d[i, 0].cpu().numpy() for i in range(d.shape[0])]
        prev = cur
    return stitch_windows_reference(depth_list, metric, t)
