"""Video decoders behind one small interface: PyAV (CPU, or NVDEC through FFmpeg's CUDA hwaccel)
and torchcodec (CPU, or NVDEC with frames left on the GPU).

Both decode in presentation order from the keyframe before a time and report each frame's
presentation time in microseconds from the stream's start (``(pts - start_time) * time_base``,
the clock that ffmpeg's ``-ss`` and OpenCV's ``CAP_PROP_POS_MSEC`` use, hence the one the
RealEstate10K and Stereo4D timestamps were taken on). ``video_times.frames_at_times`` builds the
timestamp -> frame choice on top; ``video.read_video`` reads whole short videos.

Choice (``open_decoder``): ``decoder="auto"`` takes torchcodec with CUDA when torchcodec imports
and a CUDA device is usable (inside a Ray task: Ray assigned it a GPU; elsewhere: one is visible), PyAV on the CPU otherwise (never PyAV's NVDEC: slower than PyAV on the
CPU cores for 360p, 720p and 4K on an H200 host, bench/RESULTS.md §6). On the CPU PyAV is the default because it can
decode strictly (``err_detect=bitstream+explode``: a corrupt packet is an error, not a silently
concealed frame); torchcodec exposes no such switch. ``decoder="torchcodec"`` forces it (CPU too),
``decoder="pyav"`` forces PyAV (with ``device="cuda"`` it asks FFmpeg for NVDEC and gets frames
back in host memory). Install notes for torchcodec are in README.md ("Video decoding").
"""

from __future__ import annotations

import io
import os
import sys
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Literal

import numpy as np

from pipeline.clip import ClipError
from stages.gpus import ray_gpu_ids

Backend = Literal["auto", "pyav", "torchcodec"]
Device = Literal["auto", "cpu", "cuda"]

# Report bitstream errors instead of concealing them (PyAV only), so most corrupted packets
# become a ClipError rather than silently damaged frames.
STRICT_DECODER_OPTIONS = {"err_detect": "bitstream+explode"}
TORCHCODEC_BATCH = 16  # frames per torchcodec call: bounds memory for 4K streams
# What a read of a video on an object store fetches beyond what it asks. A decoder seeks: to the
# container's header, its index (often at the end), the keyframe before the wanted times; with
# s3fs's default (50 MiB) each seek fetched up to 50 MiB, 1.4x a 77 MB video for an 8-frame clip.
VIDEO_READ_AHEAD = 1 << 20


@dataclass(frozen=True)
class StreamInfo:
    width: int
    height: int
    fps: float  # the stream's average (nominal) rate; 0 when the container does not say
    duration_us: float | None  # declared duration of the stream, None when unknown
    declared_frames: int  # frame count the container declares, 0 when unknown
    codec: str
    backend: str  # "pyav" | "torchcodec"
    device: str  # "cpu" | "cuda" (what actually decodes)


class FrameDecoder(ABC):
    """One open video stream."""

    info: StreamInfo
    where: str

    @abstractmethod
    def frames(self, start_us: float, seek: bool) -> Iterator[tuple[float, Any]]:
        """(time_us, handle) in presentation order: from the keyframe at or before ``start_us``
        when ``seek``, else from the first frame. Decoding errors raise ClipError."""

    @abstractmethod
    def to_numpy(self, handle) -> np.ndarray:
        """(H, W, 3) uint8 RGB in host memory."""

    def to_tensor(self, handle):
        """(H, W, 3) uint8 torch tensor (on the decoding device for torchcodec)."""
        import torch

        return torch.from_numpy(self.to_numpy(handle))

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _av():
    try:
        import av  # noqa: PLC0415 - imported when a video is read
    except ModuleNotFoundError:  # pragma: no cover - av is a dependency
        raise ModuleNotFoundError("reading videos needs PyAV: pip install av") from None
    return av


class PyAVDecoder(FrameDecoder):
    def __init__(self, source, where: str, device: str = "cpu", strict: bool = True):
        av = _av()
        self.where = where
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise ClipError("video file is empty", where)
            source = io.BytesIO(source)
        self.container = None
        if device == "cuda":
            from av.codec.hwaccel import HWAccel

            try:  # NVDEC through FFmpeg's CUDA hwaccel; frames come back in host memory
                self.container = av.open(
                    source, mode="r", hwaccel=HWAccel(device_type="cuda", allow_software_fallback=True)
                )
            except Exception:  # no usable CUDA device here (or the file is bad: the CPU open below says)
                if hasattr(source, "seek"):
                    source.seek(0)
                device = "cpu"
        if self.container is None:
            try:
                self.container = av.open(source, mode="r")
            except Exception as exc:  # av.error.* for truncated / non-video data
                raise ClipError(f"unreadable or truncated video ({type(exc).__name__}: {exc})", where) from None
        if not self.container.streams.video:
            self.container.close()
            raise ClipError("file has no video stream", where)
        self.stream = s = self.container.streams.video[0]
        s.thread_type = "AUTO"
        if strict:
            s.codec_context.options = dict(STRICT_DECODER_OPTIONS)
        self.start = int(s.start_time or 0)
        self.tb = s.time_base
        rate = s.average_rate or s.guessed_rate
        if s.duration:
            duration = float(s.duration * self.tb) * 1e6
        elif self.container.duration:
            duration = float(self.container.duration)  # AV_TIME_BASE = microseconds
        else:
            duration = None
        self.info = StreamInfo(
            width=int(s.codec_context.width),
            height=int(s.codec_context.height),
            fps=float(rate) if rate else 0.0,
            duration_us=duration,
            declared_frames=int(s.frames or 0),
            codec=s.codec_context.name,
            backend="pyav",
            device=device,
        )

    def frames(self, start_us: float, seek: bool) -> Iterator[tuple[float, Any]]:
        if seek:
            target = self.start + int(max(start_us, 0.0) / 1e6 / self.tb)
            try:
                self.container.seek(target, stream=self.stream, backward=True)
            except Exception as exc:
                raise ClipError(
                    f"cannot seek to {start_us / 1e6:.3f} s ({type(exc).__name__}: {exc})", self.where
                ) from None
        t = None
        decoded = self.container.decode(self.stream)
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                return
            except Exception as exc:
                at = f"after {t / 1e6:.3f} s" if t is not None else "at its first frame"
                raise ClipError(
                    f"corrupt video: decoding failed {at} ({type(exc).__name__}: {exc})", self.where
                ) from None
            pts = frame.pts if frame.pts is not None else frame.dts
            if pts is None:
                raise ClipError(
                    "frames carry no timestamps (a raw elementary stream?); remux it into a container such as mp4",
                    self.where,
                )
            t = float((pts - self.start) * self.tb) * 1e6
            yield t, frame

    def to_numpy(self, handle) -> np.ndarray:
        return handle.to_ndarray(format="rgb24")

    def close(self) -> None:
        self.container.close()


class TorchCodecDecoder(FrameDecoder):
    def __init__(self, source, where: str, device: str = "cpu"):
        from torchcodec.decoders import VideoDecoder

        self.where = where
        if isinstance(source, (bytes, bytearray)) and not source:
            raise ClipError("video file is empty", where)
        try:
            # approximate: no whole-file scan; every chosen frame's real timestamp is checked anyway
            self.dec = VideoDecoder(
                source, seek_mode="approximate", device=device, dimension_order="NHWC", num_ffmpeg_threads=0
            )
        except Exception as exc:
            raise ClipError(f"unreadable or truncated video ({type(exc).__name__}: {exc})", where) from None
        md = self.dec.metadata
        self.begin = float(md.begin_stream_seconds_from_header or 0.0)
        fps = float(md.average_fps or 0.0)
        dur = md.duration_seconds_from_header or md.duration_seconds
        self.info = StreamInfo(
            width=int(md.width),
            height=int(md.height),
            fps=fps,
            duration_us=float(dur) * 1e6 if dur else None,
            declared_frames=int(md.num_frames_from_header or 0),
            codec=str(md.codec),
            backend="torchcodec",
            device=device,
        )

    def frames(self, start_us: float, seek: bool) -> Iterator[tuple[float, Any]]:
        # By index, in batches: consecutive index ranges continue decoding where the last one
        # stopped (time ranges made torchcodec seek back to a keyframe for every batch). In
        # approximate mode an index maps to a time through the nominal rate; the caller checks
        # every frame's real timestamp.
        fps = self.info.fps or 30.0
        total = len(self.dec)
        i = max(int(max(start_us, 0.0) / 1e6 * fps) - 1, 0) if seek else 0
        while i < total:
            j = min(i + TORCHCODEC_BATCH, total)
            try:
                batch = self.dec.get_frames_in_range(i, j)
            except Exception as exc:
                raise ClipError(
                    f"corrupt or truncated video: decoding frames {i}-{j - 1} failed "
                    f"({type(exc).__name__}: {str(exc)[:200]})",
                    self.where,
                ) from None
            for k in range(int(batch.data.shape[0])):
                yield (float(batch.pts_seconds[k]) - self.begin) * 1e6, batch.data[k]
            i = j

    def to_numpy(self, handle) -> np.ndarray:
        return handle.cpu().numpy()

    def to_tensor(self, handle):
        return handle.clone()


@lru_cache(maxsize=1)
def torchcodec_problem() -> str | None:
    """None when torchcodec imports here, else why not (it needs FFmpeg's shared libraries)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as exc:  # ImportError, or RuntimeError when FFmpeg's libraries are missing
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def cuda_available() -> bool:
    """This process may use a CUDA device: inside a Ray task or actor, only when Ray assigned it a
    GPU (Ray >= 2.60 lets a task given none see every GPU of its node, ``stages/gpus.py``);
    elsewhere when one is visible. Without importing torch on a machine with no NVIDIA driver:
    CPU-only ingest workers would pay seconds for nothing."""
    if ray_gpu_ids() == []:
        return False
    if "torch" not in sys.modules and not os.path.exists("/proc/driver/nvidia/version"):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve(backend: Backend = "auto", device: Device = "auto") -> tuple[str, str]:
    """The (backend, device) that ``open_decoder`` will use for these settings."""
    dev = ("cuda" if cuda_available() else "cpu") if device == "auto" else device
    if backend == "auto":
        backend = "torchcodec" if dev == "cuda" and torchcodec_problem() is None else "pyav"
        if backend == "pyav":  # PyAV's NVDEC lost to PyAV on the CPU at every size (bench/RESULTS.md §6)
            dev = "cpu"
    elif backend == "torchcodec" and torchcodec_problem() is not None:
        raise RuntimeError(
            f"decoder 'torchcodec' was asked for but does not import: {torchcodec_problem()} "
            "(README.md, 'Video decoding', says what to install)"
        )
    return backend, dev


@contextmanager
def stored_video(store, rel: str) -> Iterator[Any]:
    """What :func:`open_decoder` reads the video ``rel`` of ``store`` (a
    :class:`pipeline.storage.Store`) from: its path on local disk, else a file object with a
    small read-ahead (:data:`VIDEO_READ_AHEAD`), closed afterwards."""
    if store.is_local:
        yield store.path(rel)
        return
    with store.open(rel, "rb", block_size=VIDEO_READ_AHEAD) as f:
        yield f


def open_decoder(
    source, where: str, backend: Backend = "auto", device: Device = "auto", strict: bool = True
) -> FrameDecoder:
    """Open ``source`` (a local path, bytes, or a seekable binary file object)."""
    name, dev = resolve(backend, device)
    if name == "torchcodec":
        return TorchCodecDecoder(source, where, device=dev)
    return PyAVDecoder(source, where, device=dev, strict=strict)
