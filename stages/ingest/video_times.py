"""Frames of a long video at given timestamps: the nearest displayed frame, frame-accurately.

RealEstate10K camera files and Stereo4D npz files name frames of the original YouTube video by
their time in microseconds. For each wanted time ``t`` this picks the displayed frame whose
presentation time is nearest to ``t`` (a tie goes to the later frame, as OpenCV's
``CAP_PROP_POS_MSEC`` seek does), and accepts it only when ``|frame time - t| <= tolerance``.

Tolerance: by default a quarter of the video's frame period (8.3 ms at 30 fps). A video that
is the one the timestamps were taken from has a frame within a few microseconds of every
timestamp (the release prints them rounded to the microsecond), so anything further means a
different frame rate, a cut or an offset, and the frames would be the wrong ones; the option
``timestamp_tolerance_us`` overrides it.

Decoding: each needed frame is decoded once. The wanted times are sorted and split where two
are more than ``seek_gap_s`` apart; each group is decoded in one pass from the keyframe before
its first time (a seek), so a few frames of a long video cost a few GOPs, not the whole file.

Bad input, each a ClipError naming the file: a video that states no frame rate; variable frame
rate (two consecutive frames further from the nominal period than ``VFR_FRACTION`` of it);
timestamps that do not increase; a video shorter than the timestamps (per scene, from the
container's duration, before decoding); a timestamp beyond the last decodable frame (a video
cut short: reported with the duration the container claims); a timestamp with no frame within
tolerance; corrupt data (the decoder's error).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from pipeline.clip import ClipError
from stages.ingest.video_decoders import FrameDecoder, StreamInfo

TOLERANCE_FRACTION = 0.25  # of the frame period
VFR_FRACTION = 0.25  # a frame interval further than this from the period is variable frame rate
SEEK_GAP_S = 2.0


@dataclass
class TimedFrames:
    frames: list  # one (H, W, 3) uint8 array (or tensor) per wanted time, in the order asked
    frame_times_us: np.ndarray  # presentation time of each chosen frame
    info: StreamInfo
    decoded: int = 0  # frames decoded in all (for benchmarks: decoded / wanted)


def _ms(us: float) -> str:
    return f"{us / 1000:.1f} ms"


def _decode_from(dec: FrameDecoder, start_us: float, seek_gap: float):
    """Frames from the keyframe before ``start_us`` (from the file's start when that is near).

    A seek that lands after ``start_us`` (a broken index) would lose the frames before it, so
    then decoding restarts from the first frame.
    """
    if start_us <= seek_gap:
        return dec.frames(0.0, seek=False)
    gen = dec.frames(start_us, seek=True)
    first = next(gen, None)
    if first is None:
        return iter(())
    if first[0] > start_us:
        return dec.frames(0.0, seek=False)
    return itertools.chain([first], gen)


def check_covers(info: StreamInfo, last_us: float, where: str, what: str, tolerance_us: float | None = None) -> None:
    """A per-scene check before any decoding: the container's duration must reach ``last_us``."""
    if not (info.duration_us and info.fps):
        return
    period = 1e6 / info.fps
    tol = TOLERANCE_FRACTION * period if tolerance_us is None else float(tolerance_us)
    last_frame = info.duration_us - period
    if last_us > last_frame + tol:
        raise ClipError(
            f"video is shorter than {what}: it lasts {info.duration_us / 1e6:.3f} s (last frame near "
            f"{max(last_frame, 0) / 1e6:.3f} s) but {what} runs to {last_us / 1e6:.3f} s",
            where,
        )


def frames_at_times(
    dec: FrameDecoder,
    times_us,
    *,
    tolerance_us: float | None = None,
    seek_gap_s: float = SEEK_GAP_S,
    as_tensor: bool = False,
    transform=None,
    what: str = "the timestamps",
) -> TimedFrames:
    """The nearest displayed frame of ``dec`` for each time in ``times_us`` (see module doc).

    ``what`` names where the times come from in errors ("the camera file", "the npz").
    ``transform`` is applied to each chosen frame as soon as it is decoded (e.g. a rectification
    that makes a 4K frame small), so only its results are held in memory.
    """
    where = dec.where
    times = np.asarray(times_us, dtype=np.float64).reshape(-1)
    if times.size == 0:
        raise ValueError("no timestamps asked for")
    info = dec.info
    if not info.fps or info.fps <= 0:
        raise ClipError("the video does not state a frame rate, so its frames cannot be matched to timestamps", where)
    period = 1e6 / info.fps
    tol = TOLERANCE_FRACTION * period if tolerance_us is None else float(tolerance_us)
    want = np.unique(times)
    check_covers(info, want[-1], where, what, tolerance_us)
    seek_gap = seek_gap_s * 1e6
    groups = np.split(want, np.flatnonzero(np.diff(want) > seek_gap) + 1)
    chosen: dict[float, tuple[float, object]] = {}  # wanted time -> (frame time, handle)
    converted: dict[float, object] = {}  # frame time -> array, so a frame chosen twice converts once
    decoded = 0
    gen, prev, last_t, eof = None, None, None, False

    def convert(t, h):
        if t not in converted:
            frame = dec.to_tensor(h) if as_tensor else dec.to_numpy(h)
            converted[t] = transform(frame) if transform is not None else frame
        return converted[t]

    for group in groups:
        if gen is None or eof or group[0] - last_t > seek_gap:
            gen = _decode_from(dec, group[0] - 2 * period, seek_gap)
            prev, eof = None, False
        pending = list(group)
        for t, h in gen:
            decoded += 1
            if prev is not None:
                dt = t - prev[0]
                if dt <= 0:
                    raise ClipError(f"frame times do not increase ({prev[0] / 1e6:.6f} s then {t / 1e6:.6f} s)", where)
                if abs(dt - period) > VFR_FRACTION * period:
                    raise ClipError(
                        f"variable frame rate: frames at {prev[0] / 1e6:.3f} s and {t / 1e6:.3f} s are "
                        f"{_ms(dt)} apart, but the stream's rate is {info.fps:.3f} fps ({_ms(period)}); "
                        "timestamps can only be matched on a constant-rate video (re-download it, or "
                        "re-encode it at its original constant rate)",
                        where,
                    )
            while pending and t >= pending[0]:
                target = pending.pop(0)
                if prev is not None and target - prev[0] < t - target:
                    chosen[target] = (prev[0], convert(*prev))
                else:
                    chosen[target] = (t, convert(t, h))
            prev = (t, h)
            last_t = t
            if not pending:
                break
        else:
            eof = True
        if pending:  # the stream ended before these times: the last frame is the nearest
            if prev is None:
                claim = info.duration_us
                if claim and group[0] <= claim:
                    raise ClipError(
                        f"truncated or corrupt video: nothing decodes near {group[0] / 1e6:.3f} s, but the "
                        f"container declares {claim / 1e6:.3f} s",
                        where,
                    )
                raise ClipError("video has no decodable frames (truncated or corrupt)", where)
            for target in pending:
                chosen[target] = (prev[0], convert(*prev))
    # Every choice must lie within tolerance.
    for target in want:
        t, _ = chosen[target]
        if abs(t - target) <= tol:
            continue
        if target > t:  # nothing after the last decodable frame
            claim = info.duration_us
            if claim and target <= claim - period + tol:
                raise ClipError(
                    f"truncated or corrupt video: decoding ends at {t / 1e6:.3f} s but the container "
                    f"declares {claim / 1e6:.3f} s ({what} need a frame at {target / 1e6:.3f} s)",
                    where,
                )
            raise ClipError(
                f"timestamp {int(target)} us ({target / 1e6:.3f} s) is beyond the video's end (last frame "
                f"at {t / 1e6:.3f} s)",
                where,
            )
        raise ClipError(
            f"no frame within {_ms(tol)} of timestamp {int(target)} us: the nearest is at "
            f"{t / 1e6:.6f} s ({(t - target) / 1000:+.1f} ms); the video ({info.fps:.3f} fps) does not "
            f"match {what} (another frame rate, a cut or an offset?)",
            where,
        )
    return TimedFrames(
        frames=[chosen[float(x)][1] for x in times],
        frame_times_us=np.array([chosen[float(x)][0] for x in times]),
        info=info,
        decoded=decoded,
    )
