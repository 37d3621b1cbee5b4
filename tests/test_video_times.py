"""Frames of a long video at timestamps (stages/ingest/video_times.py): nearest displayed frame,
frame-accurate through seeks, each needed frame decoded once, and every bad video a ClipError."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from pipeline.clip import ClipError
from stages.ingest.video import write_mp4
from stages.ingest.video_decoders import open_decoder, resolve, torchcodec_problem
from stages.ingest.video_times import frames_at_times

RATE = Fraction(30000, 1001)
PERIOD_US = 1e6 / RATE
N = 240  # 8 s
GOP = 30


def _frames(n: int = N) -> np.ndarray:
    """Each frame a distinct 4x6 mosaic of grey blocks: decoded frames identify their source."""
    blocks = np.random.default_rng(0).integers(0, 256, (n, 4, 6))
    return np.repeat(np.repeat(blocks, 8, 1), 8, 2)[..., None].repeat(3, -1).astype(np.uint8)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("vt") / "v.mp4"
    frames = _frames()
    write_mp4(path, frames, fps=RATE, gop=GOP)
    return path, frames


def _ident(frames, got):
    """Which source frame each decoded frame is (compared at the mosaic blocks' centres)."""
    src = frames[:, 4::8, 4::8, 0].astype(int)
    return [int(np.argmin(np.abs(src - np.asarray(g)[4::8, 4::8, 0].astype(int)).mean(axis=(1, 2)))) for g in got]


def _at(path, times, backend="pyav", **kw):
    with open_decoder(str(path), str(path), backend=backend, device="cpu") as dec:
        return frames_at_times(dec, times, **kw)


BACKENDS = ["pyav"] + (["torchcodec"] if torchcodec_problem() is None else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_frame_through_seeks(video, backend):
    path, frames = video
    ks = [0, 5, 6, 7, 120, 121, 200, 239]
    # Timestamps as a release prints them (rounded to the microsecond), some a few ms off.
    times = [round(k * PERIOD_US) for k in ks[:-2]] + [round(200 * PERIOD_US) + 4000, round(239 * PERIOD_US) - 3000]
    got = _at(path, times, backend)
    assert _ident(frames, got.frames) == ks
    np.testing.assert_allclose(got.frame_times_us, [k * PERIOD_US for k in ks], atol=1.0)
    if backend == "pyav":  # three groups, each from the keyframe before it: far fewer than 240 frames
        assert got.decoded < 3 * GOP + 20


def test_order_and_duplicates_kept(video):
    path, frames = video
    times = [round(k * PERIOD_US) for k in (150, 3, 150, 4)]
    assert _ident(frames, _at(path, times).frames) == [150, 3, 150, 4]


def test_tie_goes_to_the_later_frame(video):
    path, frames = video
    got = _at(path, [round(10.5 * PERIOD_US)], tolerance_us=PERIOD_US)
    assert _ident(frames, got.frames) == [11]


def test_whole_video_decodes_each_frame_once(video):
    path, frames = video
    got = _at(path, [round(k * PERIOD_US) for k in range(N)])
    assert _ident(frames, got.frames) == list(range(N)) and got.decoded == N


def test_off_grid_timestamp_fails_with_tolerance(video):
    path, _ = video
    with pytest.raises(ClipError, match=r"no frame within 8\.3 ms of timestamp 350350 us: .*\(\+16\.7 ms\)"):
        _at(path, [round(10.5 * PERIOD_US)])


def test_video_shorter_than_the_timestamps(video):
    path, _ = video
    with pytest.raises(ClipError, match=r"video is shorter than the camera file: it lasts 8\.008 s"):
        _at(path, [round(5 * PERIOD_US), round(250 * PERIOD_US)], what="the camera file")


def test_truncated_video_reports_where_decoding_ends(video, tmp_path):
    path, frames = video
    # Keep the container's index (moov first, as a download's faststart file) but drop the tail.
    fast = tmp_path / "fast.mp4"
    import av

    with av.open(str(path)) as src, av.open(str(fast), "w", options={"movflags": "faststart"}) as dst:
        s = dst.add_stream_from_template(src.streams.video[0])
        for pkt in src.demux(src.streams.video[0]):
            if pkt.dts is not None:
                pkt.stream = s
                dst.mux(pkt)
    data = fast.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ClipError) as exc:
        _at(cut, [round(230 * PERIOD_US)])
    assert exc.value.path == str(cut)
    assert "truncated or corrupt video" in exc.value.reason and "declares 8.008 s" in exc.value.reason
    # A time before the cut still reads.
    assert _ident(frames, _at(cut, [round(20 * PERIOD_US)]).frames) == [20]


def test_variable_frame_rate_is_refused(tmp_path):
    frames = _frames(60)
    times = np.arange(60) / float(RATE)
    times[30:] += 0.5 / float(RATE)  # a half-frame jump in the middle
    path = tmp_path / "vfr.mp4"
    write_mp4(path, frames, fps=RATE, frame_times_s=times.tolist())
    with pytest.raises(ClipError, match=r"variable frame rate: frames at 0\.968 s and 1\.018 s are 50\.\d ms apart"):
        _at(path, [round(k * PERIOD_US) for k in range(25, 40)])


def test_corrupt_and_empty_video(video, tmp_path):
    path, _ = video
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(path.read_bytes()[:300])  # the first bytes only
    with pytest.raises(ClipError, match="unreadable or truncated video"):
        _at(bad, [0])
    with pytest.raises(ClipError, match="empty"):
        open_decoder(b"", "e.mp4", backend="pyav")


def test_auto_backend_here():
    # Without a GPU, auto is PyAV on the CPU (strict error detection); with one, torchcodec if it imports.
    assert resolve("auto", "cpu") == ("pyav", "cpu")
    if torchcodec_problem() is not None:
        with pytest.raises(RuntimeError, match="torchcodec"):
            resolve("torchcodec", "cpu")


def test_auto_never_picks_pyav_nvdec(monkeypatch):
    """On a GPU box without torchcodec, auto decodes with PyAV on the CPU: PyAV's NVDEC path was slower
    than PyAV on the CPU cores for 360p, 720p and 4K (bench/RESULTS.md §6) and still costs 10-44 CPU
    ms/frame. Asking for it explicitly still works."""
    from stages.ingest import video_decoders as vd

    monkeypatch.setattr(vd, "cuda_available", lambda: True)
    monkeypatch.setattr(vd, "torchcodec_problem", lambda: "No module named 'torchcodec'")
    assert vd.resolve("auto", "auto") == ("pyav", "cpu")
    assert vd.resolve("auto", "cuda") == ("pyav", "cpu")
    assert vd.resolve("pyav", "cuda") == ("pyav", "cuda")
    monkeypatch.setattr(vd, "torchcodec_problem", lambda: None)
    assert vd.resolve("auto", "auto") == ("torchcodec", "cuda")


def test_pyav_cuda_request_falls_back_to_the_cpu(video):
    """device='cuda' without a usable GPU: PyAV decodes on the CPU, and says so, instead of
    blaming the file."""
    path, frames = video
    with open_decoder(str(path), str(path), backend="pyav", device="cuda") as dec:
        if dec.info.device == "cuda":
            pytest.skip("a CUDA device is usable here")
        got = frames_at_times(dec, [round(30 * PERIOD_US)])
    assert _ident(frames, got.frames) == [30]
