"""Rectified left-eye perspective frames from a side-by-side VR180 equirectangular video.

Stereo4D releases, per clip, the rig calibration (``rectified2rig``: one 3x3 rotation per eye,
mapping a ray of the rectified eye to the raw rig's eye) and the angular extent of each eye's
equirectangular image (``fov_bounds`` = start/end yaw, start/end tilt, degrees). The authors'
``rectify.py`` (github.com/Stereo4d/stereo4d-code) turns a raw frame into the released view in
two resamplings, both OpenCV ``remap`` with bilinear interpolation and a black border:

1. raw eye equirect -> *rectified* equirect of the same size: the pixel in column ``i``, row
   ``j`` looks along yaw ``start + i (end - start) / (W - 1)`` and tilt likewise over ``H - 1``
   (ray ``(cos t sin y, sin t, cos t cos y)``: x right, y down, z forward), that ray is turned
   by ``rectified2rig`` and looked up in the raw eye image with the same angle <-> pixel rule;
2. rectified equirect -> a perspective view, ``S x S`` pixels, horizontal FOV 60 degrees,
   principal point at the centre, focal ``(S/2) / tan(FOV/2)``, rays through pixel centres
   (``x + 0.5``) - exactly the d4s intrinsics convention.

This module does the same two resamplings, with the same arithmetic as OpenCV's bilinear remap
of 8-bit images (sampling positions rounded to 1/32 pixel, weights in 1/32768ths, the result
rounded to 8 bits after each pass), so its output matches the authors' to within a grey level
(measured against their code, docs/datasets/stereo4d.md). Two savings change nothing in the
result: the first pass is computed only over the part of the rectified equirect that the second
pass reads (a 60 degree view needs about a ninth of it), and the sampling maps are computed once
per clip. The resampling is plain integer gathers in torch, so it runs on a CUDA device when
there is one and on the CPU otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.clip import ClipError

SUBPIXEL = 32  # OpenCV's INTER_TAB_SIZE: remap positions are rounded to 1/32 pixel
WEIGHT_BITS = 15  # OpenCV's INTER_REMAP_COEF_BITS: bilinear weights in 1/32768ths
ROTATION_TOL = 1e-3


@dataclass(frozen=True)
class RectifySpec:
    """Everything that fixes the sampling maps of one clip (hashable, so maps are cached)."""

    eye_hw: tuple[int, int]  # one eye of the raw equirect: (H, W), W = half the frame width
    rectified2rig: tuple[float, ...]  # 9 numbers, row-major, the left eye's rotation
    fov_bounds: tuple[float, float, float, float]  # start/end yaw, start/end tilt, degrees
    size: int = 512  # output S x S
    hfov_deg: float = 60.0

    def focal(self) -> float:
        return self.size * 0.5 / np.tan(np.deg2rad(self.hfov_deg) * 0.5)


def check_calibration(rectified2rig: np.ndarray, fov_bounds: np.ndarray, where: str) -> None:
    """The release's rig calibration: two rotations and an increasing yaw/tilt range."""
    r = np.asarray(rectified2rig, dtype=np.float64)
    if r.shape != (2, 3, 3):
        raise ClipError(f"'rectified2rig' must be (2,3,3) (left, right eye), got {r.shape}", where)
    if not np.all(np.isfinite(r)):
        raise ClipError("'rectified2rig' contains NaN/inf", where)
    err = np.abs(r @ np.swapaxes(r, 1, 2) - np.eye(3)).max(axis=(1, 2))
    if np.any(err > ROTATION_TOL) or np.any(np.linalg.det(r) < 0):
        raise ClipError(f"'rectified2rig' is not a pair of rotations (orthonormality error {err.max():.2e})", where)
    b = np.asarray(fov_bounds, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        raise ClipError(
            f"'fov_bounds' must be 4 finite numbers (start/end yaw, start/end tilt, degrees), got "
            f"{np.asarray(fov_bounds).tolist()}",
            where,
        )
    if not (b[1] > b[0] and b[3] > b[2]) or b[1] - b[0] > 360 or b[3] - b[2] > 180:
        raise ClipError(
            f"'fov_bounds' {b.tolist()} is not an increasing yaw range <= 360 and tilt range <= 180 degrees", where
        )


def check_layout(width: int, height: int, where: str, min_height: int = 0) -> tuple[int, int]:
    """A VR180 side-by-side frame is two square 180x180-degree eyes: width = 2 x height."""
    if width != 2 * height:
        shape = "top-bottom or monoscopic 360" if width <= height else "not two square eyes"
        raise ClipError(
            f"video is {width}x{height}: not a side-by-side VR180 equirectangular layout (expected "
            f"width = 2 x height, two 180x180-degree eyes side by side; this looks {shape})",
            where,
        )
    if height < min_height:
        raise ClipError(
            f"VR180 video is only {height} pixels high (minimum {min_height}, as the authors' rectify.py "
            "requires; lower it with options.min_vr180_height)",
            where,
        )
    return height, width // 2


# -- sampling maps ---------------------------------------------------------------------------------


def _to_equirect(rays: np.ndarray, fov_bounds, hw) -> tuple[np.ndarray, np.ndarray]:
    """Unit rays (..., 3) -> (column, row) in an equirect whose ends are the bound angles."""
    yaw0, yaw1, tilt0, tilt1 = np.deg2rad(np.asarray(fov_bounds, dtype=np.float64))
    lon = np.arctan2(rays[..., 0], rays[..., 2])
    lat = np.arcsin(np.clip(rays[..., 1], -1.0, 1.0))
    return (lon - yaw0) / (yaw1 - yaw0) * (hw[1] - 1), (lat - tilt0) / (tilt1 - tilt0) * (hw[0] - 1)


def _equirect_rays(rows: np.ndarray, cols: np.ndarray, fov_bounds, hw) -> np.ndarray:
    """Rays of equirect pixels (row, col) under the same angle <-> pixel rule."""
    yaw0, yaw1, tilt0, tilt1 = np.deg2rad(np.asarray(fov_bounds, dtype=np.float64))
    lon = yaw0 + cols * (yaw1 - yaw0) / (hw[1] - 1)
    lat = tilt0 + rows * (tilt1 - tilt0) / (hw[0] - 1)
    return np.stack([np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)], axis=-1)


def _fixed_point(map_x: np.ndarray, map_y: np.ndarray):
    """Float sampling positions -> integer top-left neighbour and 1/32 fractions, as remap does."""
    sx = np.rint(map_x.astype(np.float32) * SUBPIXEL).astype(np.int64)
    sy = np.rint(map_y.astype(np.float32) * SUBPIXEL).astype(np.int64)
    return sx // SUBPIXEL, sy // SUBPIXEL, sx % SUBPIXEL, sy % SUBPIXEL


@dataclass
class _Pass:
    """One bilinear resampling: for each output pixel, 4 source indices and integer weights."""

    index: np.ndarray  # (4, h*w) int64 flat source index (clamped)
    weight: np.ndarray  # (4, h*w) int64 weights, 0 for taps outside the source
    out_hw: tuple[int, int]


def _make_pass(x0, y0, fx, fy, src_hw) -> _Pass:
    h, w = src_hw
    idx, wts = [], []
    for dy, dx, wgt in (
        (0, 0, (SUBPIXEL - fx) * (SUBPIXEL - fy)),
        (0, 1, fx * (SUBPIXEL - fy)),
        (1, 0, (SUBPIXEL - fx) * fy),
        (1, 1, fx * fy),
    ):
        xx, yy = x0 + dx, y0 + dy
        inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        idx.append((np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1)).reshape(-1))
        # (32 - fx)(32 - fy) * 32 etc. are the 15-bit weights exactly (they sum to 32768).
        wts.append((wgt * (1 << WEIGHT_BITS) // (SUBPIXEL * SUBPIXEL) * inside).reshape(-1))
    return _Pass(np.stack(idx), np.stack(wts), tuple(x0.shape))


@dataclass
class _Maps:
    region: tuple[int, int, int, int]  # rows r0:r1, cols c0:c1 of the rectified equirect computed
    first: _Pass  # raw eye -> rectified equirect region
    second: _Pass  # rectified equirect region -> perspective


@lru_cache(maxsize=8)
def _maps(spec: RectifySpec) -> _Maps:
    hw = spec.eye_hw
    s = spec.size
    # Pass 2: perspective pixel centres -> rectified equirect positions.
    f = spec.focal()
    c = np.arange(s, dtype=np.float64) + 0.5
    u, v = np.meshgrid((c - s / 2) / f, (c - s / 2) / f)
    rays = np.stack([u, v, np.ones_like(u)], axis=-1)
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    x0, y0, fx, fy = _fixed_point(*_to_equirect(rays, spec.fov_bounds, hw))
    # Only the rectified-equirect pixels that pass 2 reads (its taps inside the image).
    r0, r1 = max(int(y0.min()), 0), min(int(y0.max()) + 2, hw[0])
    c0, c1 = max(int(x0.min()), 0), min(int(x0.max()) + 2, hw[1])
    if r0 >= r1 or c0 >= c1:
        raise ValueError(f"the {spec.hfov_deg} degree view falls outside fov_bounds {spec.fov_bounds}")
    second = _make_pass(x0 - c0, y0 - r0, fx, fy, (r1 - r0, c1 - c0))
    # Pass 1 over that region: rectified ray -> rig ray -> raw eye position.
    rows, cols = np.meshgrid(np.arange(r0, r1, dtype=np.float64), np.arange(c0, c1, dtype=np.float64), indexing="ij")
    rect = _equirect_rays(rows, cols, spec.fov_bounds, hw)
    rig = rect @ np.asarray(spec.rectified2rig, dtype=np.float64).reshape(3, 3).T
    first = _make_pass(*_fixed_point(*_to_equirect(rig, spec.fov_bounds, hw)), hw)
    return _Maps((r0, r1, c0, c1), first, second)


# -- resampling ---------------------------------------------------------------------------------------


def _device(device: str):
    """``auto``: CUDA when this process may use it (inside a Ray task, only a GPU Ray assigned)."""
    import torch

    if device == "auto":
        from stages.ingest.video_decoders import cuda_available

        return torch.device("cuda" if cuda_available() else "cpu")
    return torch.device(device)


def _apply(p: tuple, src):
    """src (N, h*w, C) int32 -> (N, out_h*out_w, C) int32, OpenCV's rounding."""
    index, weight = p
    acc = None
    for k in range(4):
        term = src[:, index[k], :] * weight[k][None, :, None]
        acc = term if acc is None else acc + term
    return (acc + (1 << (WEIGHT_BITS - 1))) >> WEIGHT_BITS


class Rectifier:
    """The left-eye rectification of one clip's calibration, its maps on one device."""

    def __init__(self, spec: RectifySpec, device: str = "auto"):
        import torch

        self.spec = spec
        self.device = _device(device)
        maps = _maps(spec)
        self.passes = [
            (
                torch.as_tensor(p.index, device=self.device),
                torch.as_tensor(p.weight, dtype=torch.int32, device=self.device),
            )
            for p in (maps.first, maps.second)
        ]

    def __call__(self, frames, batch: int = 8) -> np.ndarray:
        """(N, H, 2H, 3) uint8 side-by-side frames (numpy, or a torch tensor on any device) ->
        (N, S, S, 3) uint8 numpy: the left eye's rectified perspective view."""
        import torch

        h, w = self.spec.eye_hw
        size = self.spec.size
        out = []
        for s in range(0, len(frames), batch):
            chunk = torch.as_tensor(frames[s : s + batch]).to(self.device)
            if chunk.ndim != 4 or chunk.shape[1] != h or chunk.shape[2] != 2 * w or chunk.shape[3] != 3:
                raise ValueError(f"frames must be (N,{h},{2 * w},3), got {tuple(chunk.shape)}")
            left = chunk[:, :, :w, :].reshape(chunk.shape[0], h * w, 3).to(torch.int32)
            view = _apply(self.passes[1], _apply(self.passes[0], left))
            out.append(view.to(torch.uint8).reshape(-1, size, size, 3).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def rectifier(spec: RectifySpec, device: str = "auto") -> Rectifier:
    """A cached Rectifier: the maps of a clip are made once per process and device. ``auto`` is
    resolved first: a worker process runs tasks given a GPU and tasks given none in turn."""
    return _rectifier(spec, str(_device(device)))


@lru_cache(maxsize=4)
def _rectifier(spec: RectifySpec, device: str) -> Rectifier:
    return Rectifier(spec, device)


def rectify_left_eye(frames, spec: RectifySpec, device: str = "auto") -> np.ndarray:
    return rectifier(spec, device)(frames)
