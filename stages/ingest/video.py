"""Whole short videos: a strict reader (one frame per annotation line) and an H.264 writer for fixtures.

Stereo4D's pre-rectified ``*-left_rectified.mp4`` and RealEstate10K clip videos hold exactly one
frame per annotation line, in order. ``read_video`` decodes the whole stream in presentation order
(through ``video_decoders``: PyAV, or torchcodec on a GPU), so frame ``i`` is the ``i``-th displayed
frame, and checks the number of frames it could decode against what the container declares and
what the caller expects: a video that cannot be opened, fails mid-stream, is cut short or has the
wrong frame count raises :class:`ClipError` naming the file. Long videos whose frames are named
by timestamps (a downloaded YouTube video, a raw VR180 video) are read with
``video_times.frames_at_times`` instead, which seeks.

Package: ``av`` (PyAV, bundles FFmpeg with libx264; ``pip install av``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.clip import ClipError
from stages.ingest.video_decoders import STRICT_DECODER_OPTIONS, _av, open_decoder  # noqa: F401 - re-exported


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # frames actually decodable (counted by decoding)
    height: int
    width: int
    declared_frames: int  # what the container says (0 when it does not say)
    fps: float


def read_video(
    source,
    where: str,
    frames: Sequence[int] | None = None,
    expect_frames: int | None = None,
    strict: bool = True,
    decoder: str = "auto",
    device: str = "auto",
) -> np.ndarray:
    """Decode ``frames`` (all when None) of a video into (T, H, W, 3) uint8 RGB.

    ``source`` is bytes, a local path or a seekable binary file; ``where`` names the file in
    errors. The whole stream is decoded so that truncation is detected even when only early
    frames are asked for; frame indices count displayed frames from 0. With ``expect_frames``
    the decoded count must equal it (e.g. one frame per pose). ``strict`` turns PyAV's error
    concealment into errors (see video_decoders.STRICT_DECODER_OPTIONS).
    """
    wanted = None if frames is None else [int(i) for i in frames]
    if wanted is not None and any(i < 0 for i in wanted):
        raise ClipError(f"negative frame index in {sorted(wanted)[:3]}", where)
    keep = None if wanted is None else set(wanted)
    got: dict[int, np.ndarray] = {}
    n, shape = 0, None
    with open_decoder(source, where, backend=decoder, device=device, strict=strict) as dec:
        declared = dec.info.declared_frames
        for _, handle in dec.frames(0.0, seek=False):
            if keep is None or n in keep:
                got[n] = dec.to_numpy(handle)
                if shape is None:
                    shape = got[n].shape
                elif got[n].shape != shape:
                    raise ClipError(
                        f"frame {n} is {got[n].shape[1]}x{got[n].shape[0]}, earlier frames {shape[1]}x{shape[0]}", where
                    )
            n += 1
    if n == 0:
        raise ClipError("video has no decodable frames (truncated or corrupt)", where)
    if declared and n != declared:
        raise ClipError(f"truncated or corrupt video: decoded {n} frames, the container declares {declared}", where)
    if expect_frames is not None and n != expect_frames:
        raise ClipError(f"video has {n} frames, expected {expect_frames}", where)
    order = list(range(n)) if wanted is None else wanted
    missing = [i for i in order if i >= n]
    if missing:
        raise ClipError(f"frames {missing[:3]} requested but the video has only {n} frames", where)
    return np.stack([got[i] for i in order])


def probe_video(source, where: str, strict: bool = True) -> VideoInfo:
    """Frame count (by decoding), size and declared count of a video (PyAV, CPU)."""
    n, hw = 0, (0, 0)
    with open_decoder(source, where, backend="pyav", device="cpu", strict=strict) as dec:
        for _, frame in dec.frames(0.0, seek=False):
            hw = (frame.height, frame.width)
            n += 1
        info = dec.info
    if n == 0:
        raise ClipError("video has no decodable frames (truncated or corrupt)", where)
    return VideoInfo(num_frames=n, height=hw[0], width=hw[1], declared_frames=info.declared_frames, fps=info.fps)


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: float | Fraction = 30,
    crf: int = 18,
    codec: str = "libx264",
    gop: int | None = None,
    frame_times_s: Sequence[float] | None = None,
) -> None:
    """Write (T, H, W, 3) uint8 RGB as an H.264 yuv420p mp4 (what ffmpeg/mediapy produce).

    Used by fixture writers. H and W must be even (4:2:0 chroma). Lossy: readers get the frames
    back only approximately. ``fps`` may be a Fraction (30000/1001 for NTSC video); ``gop`` sets
    the keyframe interval; ``frame_times_s`` gives each frame its own presentation time (to
    make variable-frame-rate fixtures).

    The same frames give the same file (the demo renders its data under each output folder, and
    two demo builds must be the same bytes): x264's MB-tree rate control is off. With it, frames of
    64x64 or smaller came out in up to eight different files from the same frames, changing with
    what else the process had allocated (decoded frames up to 33 levels apart); 80x80 and larger
    did not vary, nor did any size without MB-tree (bench/RESULTS.md, "Fixture videos").
    """
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even sizes, got {w}x{h}")
    rate = Fraction(fps).limit_denominator(100000)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        opts = {"crf": str(crf), **({"x264-params": "mbtree=0"} if codec == "libx264" else {})}
        if gop:
            opts["g"] = str(gop)
            opts["keyint_min"] = str(gop)
        stream.options = opts
        tb = Fraction(1, 90000) if frame_times_s is not None else 1 / rate
        stream.codec_context.time_base = tb
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = round(Fraction(frame_times_s[i]) / tb) if frame_times_s is not None else i
            frame.time_base = tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
