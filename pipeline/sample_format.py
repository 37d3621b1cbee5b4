"""The WebDataset sample format: one sample per clip (specified in docs/FORMAT.md).

Entries of a sample with key ``dataset__scene__start`` (no dots in keys):

===================  =======================================================================
``rgb.NNN.jpg``      frame NNN (000..T-1), JPEG at the configured quality
``depth.NNN.png``    optional; 16-bit PNG of log-depth, 0 = invalid (see :data:`DEPTH_CODEC`)
``intrinsics.npy``   (T,4) float64 fx fy cx cy, pixels
``c2w.npy``          (T,4,4) float64 OpenCV camera-to-world, metres
``tracks.npy``       optional (T,N,3) float32 world metres (NaN where not visible)
``track_vis.npy``    optional (T,N) bool
``meta.json``        :class:`pipeline.clip.ClipMeta` as strict JSON (a non-finite number is null)
===================  =======================================================================

Depth precision: log-depth quantised to 16 bits over [0.01 m, 2000 m]; the quantisation step
is ln(2e5)/65534 = 1.86e-4 in log space, so the relative error of any depth in range is at
most half a step, 9.3e-5 (0.0093 %). Depth outside the range is stored as invalid.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from pipeline import strict_json
from pipeline.clip import Clip, ClipError, ClipMeta

DEPTH_MIN_M = 0.01
DEPTH_MAX_M = 2000.0
_LOG_MIN = np.log(DEPTH_MIN_M)
_LOG_SPAN = np.log(DEPTH_MAX_M) - _LOG_MIN
DEPTH_REL_ERROR_BOUND = float(np.expm1(0.5 * _LOG_SPAN / 65534))  # stated precision bound
DEPTH_PNG_LEVEL = 6  # zlib level of the depth PNGs unless the config says otherwise (depth_png_level)


def encode_depth(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H,W) metres + mask -> uint16 codes: 0 invalid, 1..65535 log-spaced over the range."""
    ok = valid & np.isfinite(depth) & (depth >= DEPTH_MIN_M) & (depth <= DEPTH_MAX_M)
    with np.errstate(divide="ignore", invalid="ignore"):
        code = np.rint((np.log(np.where(ok, depth, 1.0)) - _LOG_MIN) / _LOG_SPAN * 65534.0) + 1.0
    return np.where(ok, code, 0).astype(np.uint16)


def decode_depth(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = code > 0
    depth = np.exp(_LOG_MIN + (code.astype(np.float64) - 1.0) / 65534.0 * _LOG_SPAN)
    return np.where(valid, depth, 0.0).astype(np.float32), valid


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _png16(arr: np.ndarray, level: int = DEPTH_PNG_LEVEL) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def encode_clip(clip: Clip, jpeg_quality: int = 95, depth_png_level: int = DEPTH_PNG_LEVEL) -> dict[str, bytes]:
    """Clip -> ordered {entry name: bytes} including ``__key__`` (a str). ``depth_png_level`` is
    the zlib level of the depth PNGs: it changes their size and encoding time, never a value."""
    clip.validate()
    if "." in clip.key:
        raise ClipError(f"sample key {clip.key!r} must not contain dots")
    sample: dict = {"__key__": clip.key}
    t = clip.num_frames
    for i in range(t):
        sample[f"rgb.{i:03d}.jpg"] = _jpeg(clip.rgb[i], jpeg_quality)
    if clip.depth is not None:
        for i in range(t):
            sample[f"depth.{i:03d}.png"] = _png16(encode_depth(clip.depth[i], clip.depth_valid[i]), depth_png_level)
    sample["intrinsics.npy"] = _npy(clip.intrinsics.astype(np.float64))
    sample["c2w.npy"] = _npy(clip.c2w.astype(np.float64))
    if clip.tracks is not None:
        tracks = np.where(clip.track_visible[..., None], clip.tracks, np.nan).astype(np.float32)
        sample["tracks.npy"] = _npy(tracks)
        sample["track_vis.npy"] = _npy(clip.track_visible.astype(bool))
    sample["meta.json"] = strict_json.dumps(clip.meta.to_json(), sort_keys=True).encode()
    return sample


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(sample: dict, frames: list[int] | None = None) -> Clip:
    """A WebDataset sample (``{entry: bytes}``, as webdataset yields it) back to a Clip.

    ``frames`` optionally decodes a subset of frames only (training sub-samples clips).
    """
    meta = ClipMeta.from_json(json.loads(sample["meta.json"]))
    intr = _load_npy(sample["intrinsics.npy"])
    c2w = _load_npy(sample["c2w.npy"])
    t = intr.shape[0]
    idx = list(range(t)) if frames is None else list(frames)
    rgb = np.stack([np.asarray(Image.open(io.BytesIO(sample[f"rgb.{i:03d}.jpg"])).convert("RGB")) for i in idx])
    depth = valid = None
    if "depth.000.png" in sample:
        codes = [np.asarray(Image.open(io.BytesIO(sample[f"depth.{i:03d}.png"]))).astype(np.uint16) for i in idx]
        dv = [decode_depth(c) for c in codes]
        depth = np.stack([d for d, _ in dv])
        valid = np.stack([v for _, v in dv])
    tracks = vis = None
    if "tracks.npy" in sample:
        tracks = _load_npy(sample["tracks.npy"])[idx]
        vis = _load_npy(sample["track_vis.npy"])[idx]
    if frames is not None:
        meta.frame_indices = [meta.frame_indices[i] for i in idx]
    return Clip(
        meta=meta,
        rgb=rgb,
        intrinsics=intr[idx],
        c2w=c2w[idx],
        depth=depth,
        depth_valid=valid,
        tracks=tracks,
        track_visible=vis,
    )
