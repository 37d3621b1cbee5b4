"""Pictures and videos of a model's output: colourised depth, PNG strips for HTML pages, mp4 files."""

from __future__ import annotations

import base64
import io

import numpy as np


def to_uint8(rgb) -> np.ndarray:
    """(…,3) floats in [0,1] (numpy or torch) -> uint8."""
    a = rgb.detach().cpu().numpy() if hasattr(rgb, "detach") else np.asarray(rgb)
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def depth_range(depth: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    """A robust display range (2nd and 98th percentile) of the valid positive depths."""
    d = np.asarray(depth, dtype=np.float64)
    m = np.isfinite(d) & (d > 0) & (np.ones_like(d, bool) if valid is None else np.asarray(valid, bool))
    if not m.any():
        return 0.1, 10.0
    lo, hi = np.percentile(d[m], [2, 98])
    return float(max(lo, 1e-3)), float(max(hi, lo * 1.01 + 1e-3))


def colourise_depth(depth, lo: float, hi: float, valid=None) -> np.ndarray:
    """(…,H,W) metres -> (…,H,W,3) uint8, log scale between ``lo`` and ``hi`` (near warm), invalid black."""
    import matplotlib

    d = depth.detach().cpu().numpy() if hasattr(depth, "detach") else np.asarray(depth)
    x = (np.log(np.clip(d, lo, hi)) - np.log(lo)) / max(np.log(hi) - np.log(lo), 1e-9)
    rgb = matplotlib.colormaps["turbo_r"](x)[..., :3]
    bad = ~np.isfinite(d) | (d <= 0)
    if valid is not None:
        bad |= ~np.asarray(valid.detach().cpu().numpy() if hasattr(valid, "detach") else valid, bool)
    rgb[bad] = 0
    return to_uint8(rgb)


def png_data_uri(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def strip(frames: np.ndarray, gap: int = 2) -> np.ndarray:
    """(N,H,W,3) uint8 -> one row (H, N*W + gaps, 3), white gaps."""
    n, h, w, _ = frames.shape
    out = np.full((h, n * w + (n - 1) * gap, 3), 255, np.uint8)
    for i, f in enumerate(frames):
        out[:, i * (w + gap) : i * (w + gap) + w] = f
    return out


def write_mp4(path: str, frames: np.ndarray, fps: int = 8) -> None:
    """(T,H,W,3) uint8 to an H.264 mp4 with PyAV (a d4s dependency); OpenCV's mp4v writer where PyAV is absent.

    Odd sizes are padded by one pixel (yuv420p needs even ones).
    """
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(path, mode="w") as out:
            stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        return
    import cv2

    vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not vw.isOpened():
        raise RuntimeError(f"{path}: neither PyAV nor OpenCV can write mp4 here")
    for f in frames:
        vw.write(np.ascontiguousarray(f[..., ::-1]))
    vw.release()
