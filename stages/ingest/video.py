"""A small, strict video-frame reader (and writer for fixtures), built on PyAV (``av``).

Real datasets that ship or produce videos (Stereo4D's rectified ``*-left_rectified.mp4``,
optional RealEstate10K clip videos) are read here. The reader decodes the whole stream in
presentation order, so frame ``i`` is the ``i``-th displayed frame, and it checks the number
of frames it could decode against what the container declares and what the caller expects.
A video that cannot be opened, fails mid-stream, is cut short or has the wrong frame count
raises :class:`ClipError` naming the file, like every other bad input of an adapter.

Package: ``av`` (PyAV, bundles FFmpeg with libx264; ``pip install av``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.clip import ClipError


def _av():
    try:
        import av  # noqa: PLC0415 - optional dependency, imported when a video is read
    except ModuleNotFoundError:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("reading videos needs PyAV: pip install av") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # frames actually decodable (counted by decoding)
    height: int
    width: int
    declared_frames: int  # what the container says (0 when it does not say)
    fps: float


# Decoder options for strict reading: report bitstream errors instead of concealing them, so
# most corrupted packets become a ClipError rather than silently damaged frames. (Damage that
# still parses as valid H.264 cannot be detected by any decoder.)
STRICT_DECODER_OPTIONS = {"err_detect": "bitstream+explode"}


def _open(data: bytes, where: str, strict: bool = True):
    av = _av()
    if not data:
        raise ClipError("video file is empty", where)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # av.error.* (InvalidDataError, ...) for truncated / non-video data
        raise ClipError(f"unreadable or truncated video ({type(exc).__name__}: {exc})", where) from None
    if not container.streams.video:
        container.close()
        raise ClipError("file has no video stream", where)
    if strict:
        container.streams.video[0].codec_context.options = dict(STRICT_DECODER_OPTIONS)
    return container


def read_video(data: bytes, where: str, frames: Sequence[int] | None = None,
               expect_frames: int | None = None, strict: bool = True) -> np.ndarray:
    """Decode ``frames`` (all when None) of a video given as bytes into (T, H, W, 3) uint8 RGB.

    ``where`` names the file in errors. The whole stream is decoded so that truncation is
    detected even when only early frames are asked for; frame indices count displayed frames
    from 0. With ``expect_frames`` the decoded count must equal it (e.g. one frame per pose).
    ``strict`` turns decoder error concealment into errors (see STRICT_DECODER_OPTIONS).
    """
    container = _open(data, where, strict)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = int(stream.frames or 0)
        wanted = None if frames is None else {int(i) for i in frames}
        if wanted is not None and any(i < 0 for i in wanted):
            raise ClipError(f"negative frame index in {sorted(wanted)[:3]}", where)
        got: dict[int, np.ndarray] = {}
        n = 0
        shape = None
        try:
            for frame in container.decode(stream):
                if shape is None:
                    shape = (frame.height, frame.width)
                elif (frame.height, frame.width) != shape:
                    raise ClipError(f"frame {n} is {frame.width}x{frame.height}, earlier frames "
                                    f"{shape[1]}x{shape[0]}", where)
                if wanted is None or n in wanted:
                    got[n] = frame.to_ndarray(format="rgb24")
                n += 1
        except ClipError:
            raise
        except Exception as exc:
            raise ClipError(f"corrupt video: decoding failed after {n} frames ({type(exc).__name__}: {exc})",
                            where) from None
    finally:
        container.close()
    if n == 0:
        raise ClipError("video has no decodable frames (truncated or corrupt)", where)
    if declared and n != declared:
        raise ClipError(f"truncated or corrupt video: decoded {n} frames, the container declares {declared}", where)
    if expect_frames is not None and n != expect_frames:
        raise ClipError(f"video has {n} frames, expected {expect_frames}", where)
    if wanted is None:
        order = list(range(n))
    else:
        order = [int(i) for i in frames]  # type: ignore[union-attr]
        missing = [i for i in order if i >= n]
        if missing:
            raise ClipError(f"frames {missing[:3]} requested but the video has only {n} frames", where)
    return np.stack([got[i] for i in order])


def probe_video(data: bytes, where: str, strict: bool = True) -> VideoInfo:
    """Frame count (by decoding), size and declared count of a video given as bytes."""
    container = _open(data, where, strict)
    try:
        stream = container.streams.video[0]
        declared = int(stream.frames or 0)
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        n, hw = 0, (0, 0)
        try:
            for frame in container.decode(stream):
                hw = (frame.height, frame.width)
                n += 1
        except Exception as exc:
            raise ClipError(f"corrupt video: decoding failed after {n} frames ({type(exc).__name__}: {exc})",
                            where) from None
    finally:
        container.close()
    if n == 0:
        raise ClipError("video has no decodable frames (truncated or corrupt)", where)
    return VideoInfo(num_frames=n, height=hw[0], width=hw[1], declared_frames=declared, fps=fps)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 30, crf: int = 18,
              codec: str = "libx264") -> None:
    """Write (T, H, W, 3) uint8 RGB as an H.264 yuv420p mp4 (what ffmpeg/mediapy produce).

    Used by fixture writers. H and W must be even (4:2:0 chroma). Lossy: readers get the
    frames back only approximately.
    """
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even sizes, got {w}x{h}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for i in range(t):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
