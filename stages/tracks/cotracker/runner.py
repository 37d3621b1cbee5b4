"""CoTracker3 runner for the track stage: clips in, 2D tracks in d4s pixels out.

Queries are a ``grid_size x grid_size`` grid (the official margin grid at the model resolution)
repeated at every query frame, so a clip yields ``len(query_frames) * grid_size**2`` tracks.

* offline: the whole clip is one window; when a query frame is not the first frame the clip
  is also tracked backwards (reversed clip), which fills the frames before each query frame.
  visible = visibility probability > 0.9.
* online: 16-frame windows moving by 8 (official streaming schedule); tracks cannot go back in
  time, so frames before a track's query frame are not visible. visible = vis x conf > 0.6.

In both, a track's own query frame holds its query position and is visible (official
predictor behaviour). Output pixels follow d4s (:mod:`pipeline.geometry`): the centre of pixel
column j is u = j + 0.5; the tracker's own coordinates (centre at j) are shifted by +0.5.

Clips with the same number of frames are batched together (up to ``max_batch``), after each is
resized to the model resolution; ``dtype`` 'bf16'/'fp16' runs the network under autocast with
coordinates kept in float32.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import torch

from .load import load_model
from .model import MODEL_RESOLUTION, CoTracker3, build_model
from .predictor import force_query_points, from_model_xy, grid_queries, offline_track, online_track, resize_video

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def video_tensor(video: np.ndarray) -> torch.Tensor:
    """A (T,H,W,3) video as a tensor. Frames that come from Ray's object store are read-only
    arrays, which torch warns about on every build (it cannot guarantee not to write them): such a
    video is copied first (tens of MB, once per clip; the model's own float copy follows anyway)."""
    arr = np.ascontiguousarray(video)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def resolve_query_frames(query_frames: list[int] | int, num_frames: int) -> list[int]:
    """Query frame indices for a clip of ``num_frames``.

    A list gives explicit indices (negative ones count from the end; out-of-range ones are
    clipped; duplicates dropped). An int ``n`` >= 1 gives ``n`` evenly spaced frames starting at 0.
    """
    if isinstance(query_frames, (int, np.integer)):
        n = int(query_frames)
        if n < 1:
            raise ValueError(f"query_frames as an int is a count of query frames (>= 1), got {n}")
        frames = [int(round(i * num_frames / n)) for i in range(n)]
    else:
        frames = [int(f) + num_frames if int(f) < 0 else int(f) for f in query_frames]
        if not frames:
            raise ValueError("query_frames is empty")
    out = []
    for f in frames:
        f = min(max(f, 0), num_frames - 1)
        if f not in out:
            out.append(f)
    return out


class CoTrackerRunner:
    """Track grids of points through clips with CoTracker3.

    Args:
        variant: 'offline' or 'online'.
        checkpoint: official ``scaled_offline.pth`` / ``scaled_online.pth`` (local path or fsspec
            URL); None only with ``allow_random_weights`` (tests, benchmarks): ``untrained`` is True.
        device: torch device string.
        dtype: 'fp32', 'bf16' or 'fp16' (autocast for the network).
        grid_size: grid points per side per query frame.
        query_frames: explicit frame indices or a count of evenly spaced query frames.
        allow_random_weights: permit running without a checkpoint.
        max_batch: clips per forward pass.
        iters: refinement iterations (official: 6).
        model_resolution: network input (H, W); the official checkpoints use (384, 512).
    """

    def __init__(
        self,
        variant: str = "offline",
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "fp32",
        grid_size: int = 20,
        query_frames: list[int] | int = 1,
        allow_random_weights: bool = False,
        max_batch: int = 4,
        iters: int = 6,
        model_resolution: tuple[int, int] = MODEL_RESOLUTION,
        attn_impl: str = "sdpa",
    ):
        if variant not in ("offline", "online"):
            raise ValueError(f"variant must be 'offline' or 'online', got {variant!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if grid_size < 1:
            raise ValueError(f"grid_size must be >= 1, got {grid_size}")
        if checkpoint is None and not allow_random_weights:
            raise ValueError(
                "CoTrackerRunner needs a checkpoint (stages.tracks.checkpoint: scaled_offline.pth or "
                "scaled_online.pth); pass allow_random_weights=True to run an untrained model"
            )
        resolve_query_frames(query_frames, 10**6)  # validate early
        self.variant = variant
        self.device = torch.device(device)
        self.dtype = dtype
        self.grid_size = int(grid_size)
        self.query_frames = query_frames
        self.max_batch = max(1, int(max_batch))
        self.iters = int(iters)
        self.untrained = checkpoint is None
        self.checkpoint = checkpoint
        if checkpoint is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = build_model(variant, attn_impl=attn_impl)
        else:
            model = load_model(checkpoint, variant, attn_impl=attn_impl)
        if tuple(model_resolution) != tuple(model.model_resolution):
            state = model.state_dict()
            model = CoTracker3(
                window_len=model.window_len, model_resolution=tuple(model_resolution), attn_impl=attn_impl
            )
            model.load_state_dict(state)
        self.model: CoTracker3 = model.to(self.device).eval()
        self.last_query_frames: list[np.ndarray] = []

    @property
    def model_resolution(self) -> tuple[int, int]:
        return self.model.model_resolution

    def _autocast(self):
        dt = _DTYPES[self.dtype]
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dt)

    @torch.inference_mode()
    def track(self, videos: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(T, H, W, 3) uint8 clips -> per clip (tracks2d (T, N, 2) float32 d4s pixels, visible (T, N) bool).

        ``self.last_query_frames[i]`` holds each track's query frame (N,) for clip i.
        """
        for i, v in enumerate(videos):
            if v.ndim != 4 or v.shape[-1] != 3 or v.shape[0] < 1:
                raise ValueError(f"clip {i}: expected (T, H, W, 3) frames, got {v.shape}")
            if v.shape[1] < 2 or v.shape[2] < 2:
                raise ValueError(f"clip {i}: frames of {v.shape[1:3]} are too small to track")
            if str(v.dtype) not in ("uint8", "torch.uint8"):
                raise ValueError(f"clip {i}: frames must be uint8 RGB 0..255, got {v.dtype}")
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(videos)
        qframes: list[np.ndarray | None] = [None] * len(videos)
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, v in enumerate(videos):
            by_len[int(v.shape[0])].append(i)
        for _t, idx in by_len.items():
            for s in range(0, len(idx), self.max_batch):
                batch = idx[s : s + self.max_batch]
                outs = self._track_batch([videos[i] for i in batch])
                for i, (tr, vis, qf) in zip(batch, outs):
                    results[i] = (tr, vis)
                    qframes[i] = qf
        self.last_query_frames = qframes  # type: ignore[assignment]
        return results  # type: ignore[return-value]

    def _track_batch(self, clips: list[np.ndarray]):
        ms = self.model_resolution
        t = clips[0].shape[0]
        frames = []
        for v in clips:
            x = video_tensor(v).to(self.device).permute(0, 3, 1, 2).float()[None]
            frames.append(resize_video(x, ms))
        video = torch.cat(frames)
        b = video.shape[0]
        qf = resolve_query_frames(self.query_frames, t)
        queries = grid_queries(self.grid_size, qf, ms, b, device=self.device)
        with self._autocast():
            fmaps = self.model.encode(video)
            del video, frames
            if self.variant == "offline":
                tracks, vis = offline_track(self.model, fmaps, queries, self.iters, backward=max(qf) > 0)
                visible = vis > 0.9
            else:
                tracks, vis, conf = online_track(self.model, fmaps, queries, self.iters)
                visible = (vis * conf) > 0.6
                ti = torch.arange(t, device=self.device)[None, :, None]
                visible &= ti >= queries[:, None, :, 0]
        tracks = tracks.float()
        force_query_points(tracks, visible, queries)
        out = []
        qframe_of_track = queries[0, :, 0].long().cpu().numpy()
        for i, v in enumerate(clips):
            h, w = v.shape[1:3]
            tr = from_model_xy(tracks[i], (h, w), ms) + 0.5  # tracker pixel centres -> d4s u = j + 0.5
            out.append((tr.cpu().numpy().astype(np.float32), visible[i].cpu().numpy().astype(bool), qframe_of_track))
        return out
