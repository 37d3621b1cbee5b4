"""Predictor behaviour of CoTracker3 around the raw network, matching the official predictors.

Offline (:class:`OfflinePredictor`):
  * frames resized to the model resolution (bilinear, align_corners=True); query x, y scaled by
    ((W_m - 1)/(W - 1), (H_m - 1)/(H - 1)), outputs scaled back;
  * ``grid_size`` queries: official margin grid at ``grid_query_frame``;
  * explicit queries get a 6x6 support grid at t=0 appended (dropped from the outputs);
  * 6 refinement iterations; optional backward pass on the reversed clip fills the frames
    before each query's start;
  * visible = probability > 0.9, and each query is forced to its query position and visible
    in its own frame.

Online (:class:`OnlinePredictor`): the official streaming loop - windows of 16 frames moving by
8, the first window starting at frame 0, the last one ending at the last frame; visible =
visibility x confidence > 0.6.

All coordinates here are in the tracker's pixel convention (x = 0 at the centre of the first
column). :mod:`stages.tracks.cotracker.runner` converts to d4s pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import CoTracker3, OnlineState, grid_points


def resize_video(video: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, T, 3, *shape), bilinear with align_corners=True."""
    b, t, c, h, w = video.shape
    if (h, w) == tuple(shape):
        return video
    out = F.interpolate(video.reshape(b * t, c, h, w), tuple(shape), mode="bilinear", align_corners=True)
    return out.view(b, t, c, *shape)


def to_model_xy(queries: torch.Tensor, hw: tuple[int, int], model_hw: tuple[int, int]) -> torch.Tensor:
    """Scale (.., 3) (t, x, y) queries from an (H, W) frame to the model resolution."""
    q = queries.clone()
    q[..., 1:] *= q.new_tensor([(model_hw[1] - 1) / (hw[1] - 1), (model_hw[0] - 1) / (hw[0] - 1)])
    return q


def from_model_xy(tracks: torch.Tensor, hw: tuple[int, int], model_hw: tuple[int, int]) -> torch.Tensor:
    return tracks * tracks.new_tensor([(hw[1] - 1) / (model_hw[1] - 1), (hw[0] - 1) / (model_hw[0] - 1)])


def grid_queries(size: int, frame: int | list[int], model_hw: tuple[int, int], batch: int = 1, device=None):
    """(B, len(frames) * size^2, 3) grid queries at one or several query frames."""
    frames = [frame] if isinstance(frame, int) else list(frame)
    pts = grid_points(size, model_hw, device=device)
    qs = [torch.cat([torch.full_like(pts[:, :1], float(f)), pts], dim=1) for f in frames]
    return torch.cat(qs, dim=0)[None].repeat(batch, 1, 1)


def offline_track(
    model: CoTracker3,
    fmaps: torch.Tensor,
    queries: torch.Tensor,
    iters: int = 6,
    backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline model on precomputed features; optional backward pass.

    fmaps (B, T, C, h, w) from ``model.encode``; queries (B, N, 3) in model pixels.
    Returns tracks (B, T, N, 2) and visibility probabilities (B, T, N).
    """
    tracks, vis, _ = model(None, queries, iters=iters, fmaps=fmaps)
    if backward:
        t = fmaps.shape[1]
        inv_q = queries.clone()
        inv_q[..., 0] = t - inv_q[..., 0] - 1
        inv_tracks, inv_vis, _ = model(None, inv_q, iters=iters, fmaps=fmaps.flip(1))
        before = torch.arange(t, device=queries.device)[None, :, None] < queries[:, None, :, 0]  # B T N
        tracks = torch.where(before[..., None], inv_tracks.flip(1), tracks)
        vis = torch.where(before, inv_vis.flip(1), vis)
    return tracks, vis


def force_query_points(tracks: torch.Tensor, visible: torch.Tensor, queries: torch.Tensor) -> None:
    """In place: each query's own frame gets its query position and is visible."""
    b, t, n, _ = tracks.shape
    bi = torch.arange(b, device=tracks.device)[:, None].expand(b, n)
    ni = torch.arange(n, device=tracks.device)[None].expand(b, n)
    ti = queries[:, :n, 0].long().clamp(0, t - 1)
    tracks[bi, ti, ni] = queries[:, :n, 1:].to(tracks.dtype)
    visible[bi, ti, ni] = True


class OfflinePredictor:
    """Official offline predictor behaviour (``CoTrackerPredictor`` with ``offline=True``)."""

    def __init__(self, model: CoTracker3, iters: int = 6, support_grid_size: int = 6, threshold: float = 0.9):
        self.model = model.eval()
        self.iters = iters
        self.support_grid_size = support_grid_size
        self.threshold = threshold

    @property
    def interp_shape(self) -> tuple[int, int]:
        return self.model.model_resolution

    @torch.no_grad()
    def __call__(
        self,
        video: torch.Tensor,
        queries: torch.Tensor | None = None,
        grid_size: int = 0,
        grid_query_frame: int = 0,
        backward_tracking: bool = False,
        fmaps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, T, 3, H, W) values 0..255; returns tracks (B, T, N, 2), visible (B, T, N) bool.

        ``fmaps``: optional features of the resized video (``model.encode``), to reuse them.
        """
        b, t, _, h, w = video.shape
        ms = self.interp_shape
        if fmaps is None:
            fmaps = self.model.encode(resize_video(video.float(), ms))
        if queries is not None:
            q = to_model_xy(queries.float(), (h, w), ms)
            add_support = True
        elif grid_size > 0:
            q = grid_queries(grid_size, grid_query_frame, ms, b, device=video.device)
            add_support = False
        else:
            raise ValueError("give queries or grid_size > 0 (dense tracking is not provided)")
        n = q.shape[1]
        if add_support:
            sup = grid_queries(self.support_grid_size, 0, ms, b, device=video.device)
            q = torch.cat([q, sup], dim=1)
        tracks, vis = offline_track(self.model, fmaps, q, self.iters, backward_tracking)
        tracks, visible = tracks[:, :, :n], vis[:, :, :n] > self.threshold
        force_query_points(tracks, visible, q)
        return from_model_xy(tracks, (h, w), ms), visible


def online_windows(num_frames: int, window: int = 16) -> list[tuple[int, int]]:
    """Frame ranges [start, end) of the online passes, as the official streaming demo makes them.

    Windows start at 0, step/2 ... ; the last one ends at the last frame. Videos shorter than
    step + 1 frames (which the official demo does not process) get one window over all frames.
    """
    step = window // 2
    out = []
    ind = 0
    while True:
        out.append((ind, min(ind + window, num_frames)))
        if ind + window >= num_frames:
            return out
        ind += step


def online_track(
    model: CoTracker3,
    fmaps: torch.Tensor,
    queries: torch.Tensor,
    iters: int = 6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the online model window by window over precomputed features of the whole clip.

    Returns tracks (B, T, N, 2), visibility and confidence probabilities (B, T, N).
    """
    state = OnlineState()
    out = None
    for start, end in online_windows(fmaps.shape[1], model.window_len):
        if state.ind != start:
            raise AssertionError("online window bookkeeping out of step")
        out = model.online_step(fmaps[:, start:end], queries, state, iters=iters)
    return out


class OnlinePredictor:
    """Official online predictor driven over a whole clip (``CoTrackerOnlinePredictor`` + demo loop)."""

    def __init__(self, model: CoTracker3, iters: int = 6, support_grid_size: int = 6, threshold: float = 0.6):
        self.model = model.eval()
        self.iters = iters
        self.support_grid_size = support_grid_size
        self.threshold = threshold

    @property
    def interp_shape(self) -> tuple[int, int]:
        return self.model.model_resolution

    @torch.no_grad()
    def __call__(
        self,
        video: torch.Tensor,
        queries: torch.Tensor | None = None,
        grid_size: int = 5,
        grid_query_frame: int = 0,
        add_support_grid: bool = False,
        fmaps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _, h, w = video.shape
        ms = self.interp_shape
        if fmaps is None:
            fmaps = self.model.encode(resize_video(video.float(), ms))
        if queries is not None:
            q = to_model_xy(queries.float(), (h, w), ms)
            if add_support_grid:
                q = torch.cat([q, grid_queries(self.support_grid_size, 0, ms, b, device=video.device)], dim=1)
            n = queries.shape[1]
        elif grid_size > 0:
            q = grid_queries(grid_size, grid_query_frame, ms, b, device=video.device)
            n = q.shape[1]
        else:
            raise ValueError("give queries or grid_size > 0")
        tracks, vis, conf = online_track(self.model, fmaps, q, self.iters)
        tracks, vis, conf = tracks[:, :, :n], vis[:, :, :n], conf[:, :, :n]
        return from_model_xy(tracks, (h, w), ms), (vis * conf) > self.threshold
