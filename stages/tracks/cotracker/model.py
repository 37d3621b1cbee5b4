"""The CoTracker3 network (offline and online variants) in d4s's own code.

Coordinates inside this module follow the tracker's convention, not d4s's: ``x, y`` in pixels of
the model input (384 x 512 by default) with integer values at pixel centres (x = 0 is the centre
of the first column; sampling uses ``align_corners=True``). The runner converts to d4s pixels
(centre of pixel j at u = j + 0.5).

Pipeline of one refinement step, for every track and frame of the window:

1. 4-level pyramid of L2-normalised stride-4 features (levels by 2x2 average pooling).
2. Around the current estimate sample a 7x7 patch per level; correlate it with the 7x7 patch
   around the query point in its query frame (49 x 49 = 2401 values), encode with an MLP to 256
   channels (1024 for the 4 levels).
3. Token = [visibility logit, confidence logit, correlation embedding, Fourier encoding of the
   displacement to the previous and next frame (84)] = 1110 channels, plus a temporal embedding.
4. The transformer predicts (dx, dy, dvisibility, dconfidence); coordinates and logits add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import FeatureEncoder, TrackTransformer, TwoLayerMLP, set_attention_impl

MODEL_RESOLUTION = (384, 512)  # (H, W) the official models were trained at
OFFLINE_WINDOW = 60
ONLINE_WINDOW = 16


def sincos_table(dim: int, length: int) -> torch.Tensor:
    """(1, length, dim) sine/cosine table (first half sines, second half cosines).

    Only the default for an untrained model: a loaded checkpoint brings its own table.
    """
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    ang = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)[None].float()


def fourier_encode(x: torch.Tensor, num_bands: int = 10) -> torch.Tensor:
    """[x, sin(2^k x) for k < num_bands, cos(2^k x) for k < num_bands] along the last axis.

    Bands are laid out band-major (all components of band 0, then band 1, ...); the cosine is
    evaluated as sin(. + pi/2), as the reference does.
    """
    scales = 2.0 ** torch.arange(num_bands, dtype=x.dtype, device=x.device)
    xb = (x[..., None, :] * scales[:, None]).flatten(-2)
    return torch.cat([x, torch.sin(torch.cat([xb, xb + 0.5 * torch.pi], dim=-1))], dim=-1)


def grid_points(size: int, extent: tuple[int, int], device=None) -> torch.Tensor:
    """``size x size`` points (x, y), row-major, over an (H, W) extent with a W/64 margin.

    Same layout as the official ``grid_size`` queries: (size*size, 2).
    """
    h, w = extent
    if size == 1:
        return torch.tensor([[w / 2, h / 2]], device=device)
    margin = w / 64
    ys = torch.linspace(margin, h - margin, size, device=device)
    xs = torch.linspace(margin, w - margin, size, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)


def _normalise_xy(xy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=xy.device, dtype=xy.dtype)
    return xy * scale - 1


@dataclass
class OnlineState:
    """What the online model carries from one window to the next (one video batch)."""

    ind: int = 0  # first frame of the current window
    support: list[torch.Tensor | None] = field(default_factory=list)  # per level (B, N, 49, C)
    coords: torch.Tensor | None = None  # (B, T_seen, N, 2) pixels of the model input
    vis: torch.Tensor | None = None  # (B, T_seen, N) logits
    conf: torch.Tensor | None = None  # (B, T_seen, N) logits


class CoTracker3(nn.Module):
    """CoTracker3. ``window_len`` is 60 for the offline checkpoint and 16 for the online one;
    it sizes the stored temporal embedding ``time_emb`` (loaded from the checkpoint)."""

    def __init__(
        self,
        window_len: int = OFFLINE_WINDOW,
        stride: int = 4,
        corr_radius: int = 3,
        corr_levels: int = 4,
        num_virtual_tracks: int = 64,
        model_resolution: tuple[int, int] = MODEL_RESOLUTION,
        latent_dim: int = 128,
        attn_impl: str = "sdpa",
    ):
        super().__init__()
        self.window_len = window_len
        self.stride = stride
        self.corr_radius = corr_radius
        self.corr_levels = corr_levels
        self.latent_dim = latent_dim
        self.model_resolution = tuple(model_resolution)
        patch = (2 * corr_radius + 1) ** 2
        self.input_dim = 2 + corr_levels * 256 + 4 * (1 + 2 * 10)
        self.encoder = FeatureEncoder(latent_dim, stride)
        self.corr_mlp = TwoLayerMLP(patch * patch, 384, 256, tanh_gelu=False)
        self.transformer = TrackTransformer(self.input_dim, 384, 8, 3, num_virtual_tracks)
        self.register_buffer("time_emb", sincos_table(self.input_dim, window_len))
        set_attention_impl(self, attn_impl)

    # ------------------------------------------------------------------ features

    def encode(self, video: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """(B, T, 3, H, W) values 0..255 -> (B, T, C, H/4, W/4) unit-norm features."""
        b, t, _, h, w = video.shape
        frames = video.reshape(b * t, 3, h, w)
        out = []
        for s in range(0, b * t, chunk):
            f = self.encoder(2 * (frames[s : s + chunk] / 255.0) - 1.0)
            norm = torch.sqrt(torch.clamp(torch.sum(f.float() ** 2, dim=1, keepdim=True), min=1e-12))
            out.append((f / norm).to(video.dtype))
        fmaps = torch.cat(out)
        return fmaps.view(b, t, *fmaps.shape[1:])

    def pyramid(self, fmaps: torch.Tensor) -> list[torch.Tensor]:
        b, t, c, h, w = fmaps.shape
        levels = [fmaps]
        for _ in range(self.corr_levels - 1):
            f = F.avg_pool2d(levels[-1].reshape(b * t, c, *levels[-1].shape[-2:]), 2, stride=2)
            levels.append(f.view(b, t, c, *f.shape[-2:]))
        return levels

    def _offsets(self, device, dtype) -> torch.Tensor:
        """(49, 2) patch offsets; entry i*7+j is (dx, dy) = (d_i, d_j) - the reference layout."""
        r = self.corr_radius
        d = torch.linspace(-r, r, 2 * r + 1, device=device, dtype=dtype)
        dx, dy = torch.meshgrid(d, d, indexing="ij")
        return torch.stack([dx, dy], dim=-1).reshape(-1, 2)

    def query_support(self, fmaps: torch.Tensor, frames: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Features of the 7x7 patch around each query in its own frame.

        fmaps (B, T, C, H, W); frames (B, N) long (may be out of range: border-clamped);
        xy (B, N, 2) in this level's pixels -> (B, N, 49, C).
        """
        b, t, c, h, w = fmaps.shape
        pts = xy[:, :, None, :] + self._offsets(xy.device, xy.dtype)  # B N 49 2
        gxy = _normalise_xy(pts, h, w)
        gt = frames.to(xy.dtype)[:, :, None, None].expand(-1, -1, pts.shape[2], 1) * (2.0 / max(t - 1, 1)) - 1
        grid = torch.cat([gxy, gt], dim=-1)[:, :, :, None, :]  # B N 49 1 3 (x, y, t)
        vol = fmaps.permute(0, 2, 1, 3, 4)  # B C T H W
        out = F.grid_sample(vol, grid.to(vol.dtype), align_corners=True, padding_mode="border")
        return out[..., 0].permute(0, 2, 3, 1)  # B N 49 C

    def correlation_embedding(
        self, levels: list[torch.Tensor], coords: torch.Tensor, support: list[torch.Tensor]
    ) -> torch.Tensor:
        """coords (B, S, N, 2) in stride-4 units -> (B, S, N, 256 * levels)."""
        b, s, n, _ = coords.shape
        offsets = self._offsets(coords.device, coords.dtype)
        embs = []
        for i, fm in enumerate(levels):
            c, h, w = fm.shape[2:]
            pts = (coords / 2**i).reshape(b * s, n, 1, 2) + offsets  # BS N 49 2
            grid = _normalise_xy(pts, h, w).to(fm.dtype)
            patch = F.grid_sample(fm.reshape(b * s, c, h, w), grid, align_corners=True, padding_mode="border")
            patch = patch.view(b, s, c, n, -1).permute(0, 3, 1, 4, 2)  # B N S 49 C
            sup = support[i].to(patch.dtype)  # B N 49 C
            corr = torch.matmul(patch.reshape(b, n, -1, c), sup.transpose(-1, -2))  # B N S*49 49
            corr = corr.view(b, n, s, -1).transpose(1, 2)  # B S N 2401
            embs.append(self.corr_mlp(corr))
        return torch.cat(embs, dim=-1)

    def time_embedding(self, t: int) -> torch.Tensor:
        if t == self.time_emb.shape[1]:
            return self.time_emb
        te = F.interpolate(self.time_emb.float().permute(0, 2, 1), size=t, mode="linear")
        return te.permute(0, 2, 1)

    # ------------------------------------------------------------------ refinement

    def refine(
        self,
        levels: list[torch.Tensor],
        coords: torch.Tensor,
        support: list[torch.Tensor],
        vis: torch.Tensor,
        conf: torch.Tensor,
        iters: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Iterate the update. coords (B, S, N, 2) stride-4 units; vis, conf (B, S, N, 1) logits."""
        b, s, n, _ = coords.shape
        scale = torch.tensor([self.model_resolution[1], self.model_resolution[0]], device=coords.device) / self.stride
        time_emb = self.time_embedding(s)
        for _ in range(iters):
            coords = coords.detach()
            corr = self.correlation_embedding(levels, coords, support)
            fwd = F.pad(coords[:, :-1] - coords[:, 1:], (0, 0, 0, 0, 0, 1))
            bwd = F.pad(coords[:, 1:] - coords[:, :-1], (0, 0, 0, 0, 1, 0))
            motion = fourier_encode(torch.cat([fwd / scale, bwd / scale], dim=-1))
            x = torch.cat([vis, conf, corr, motion], dim=-1).permute(0, 2, 1, 3)  # B N S D
            x = x + time_emb[:, None]
            delta = self.transformer(x).permute(0, 2, 1, 3)  # B S N 4
            coords = coords + delta[..., :2]
            vis = vis + delta[..., 2:3]
            conf = conf + delta[..., 3:4]
        return coords, vis, conf

    # ------------------------------------------------------------------ offline

    def forward(
        self,
        video: torch.Tensor,
        queries: torch.Tensor,
        iters: int = 4,
        fmaps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Offline tracking of the whole clip in one window.

        video (B, T, 3, H, W) values 0..255 at the model resolution (may be None when ``fmaps``
        from :meth:`encode` is given); queries (B, N, 3) as (t, x, y).
        Returns coords (B, T, N, 2), visibility and confidence probabilities (B, T, N).
        """
        if fmaps is None:
            fmaps = self.encode(video)
        b, t = fmaps.shape[:2]
        n = queries.shape[1]
        frames = queries[..., 0].long()
        qxy = queries[..., 1:3].float() / self.stride
        levels = self.pyramid(fmaps)
        support = [self.query_support(levels[i], frames, qxy / 2**i) for i in range(self.corr_levels)]
        coords = qxy[:, None].expand(b, t, n, 2)
        zeros = torch.zeros((b, t, n, 1), device=qxy.device)
        coords, vis, conf = self.refine(levels, coords, support, zeros, zeros.clone(), iters)
        return coords * float(self.stride), torch.sigmoid(vis[..., 0]), torch.sigmoid(conf[..., 0])

    # ------------------------------------------------------------------ online

    def online_step(
        self,
        fmaps: torch.Tensor,
        queries: torch.Tensor,
        state: OnlineState,
        iters: int = 4,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sliding-window step of the online model.

        fmaps (B, T_chunk, C, h, w) features of frames ``state.ind .. state.ind + T_chunk - 1``
        (T_chunk <= window; padded with the last frame). Returns all predictions so far:
        coords (B, T_seen, N, 2), visibility and confidence probabilities (B, T_seen, N).
        """
        s = self.window_len
        step = s // 2
        b, t = fmaps.shape[:2]
        if t > s:
            raise ValueError(f"online chunk of {t} frames exceeds the window {s}")
        if t < s:
            fmaps = torch.cat([fmaps, fmaps[:, -1:].expand(b, s - t, *fmaps.shape[2:])], dim=1)
        n = queries.shape[1]
        device = queries.device
        frames = queries[..., 0].long()
        qxy = queries[..., 1:3].float() / self.stride
        ind = state.ind

        if state.coords is None:
            coords_pred = torch.zeros((b, t, n, 2), device=device)
            vis_pred = torch.zeros((b, t, n), device=device)
            conf_pred = torch.zeros((b, t, n), device=device)
        else:
            grow = min(step, t - step)
            coords_pred = F.pad(state.coords, (0, 0, 0, 0, 0, grow))
            vis_pred = F.pad(state.vis, (0, 0, 0, grow))
            conf_pred = F.pad(state.conf, (0, 0, 0, grow))

        levels = self.pyramid(fmaps)
        left = 0 if ind == 0 else ind + step
        new = ((frames >= left) & (frames < ind + s))[:, :, None, None]
        if not state.support:
            state.support = [None] * self.corr_levels
        for i in range(self.corr_levels):
            sup = self.query_support(levels[i], frames - ind, qxy / 2**i) * new
            state.support[i] = sup if state.support[i] is None else state.support[i] + sup
        started = (frames < ind + s)[:, :, None, None]
        support = [sp * started for sp in state.support]

        coords = qxy[:, None].expand(b, s, n, 2)
        vis = torch.zeros((b, s, n, 1), device=device)
        conf = torch.zeros((b, s, n, 1), device=device)
        if ind > 0:
            overlap = s - step
            carry = (frames < ind + overlap)[:, None, :, None]

            def _prev(x):
                x = x[:, ind : ind + overlap]
                return torch.cat([x, x[:, -1:].expand(-1, step, *x.shape[2:])], dim=1)

            coords = torch.where(carry, _prev(coords_pred) / self.stride, coords)
            vis = torch.where(carry, _prev(vis_pred[..., None]), vis)
            conf = torch.where(carry, _prev(conf_pred[..., None]), conf)

        coords, vis, conf = self.refine(levels, coords, support, vis, conf, iters)
        coords_pred[:, ind : ind + s] = coords[:, :t].float() * float(self.stride)
        vis_pred[:, ind : ind + s] = vis[:, :t, :, 0].float()
        conf_pred[:, ind : ind + s] = conf[:, :t, :, 0].float()
        state.ind = ind + step
        state.coords, state.vis, state.conf = coords_pred, vis_pred, conf_pred
        return coords_pred, torch.sigmoid(vis_pred), torch.sigmoid(conf_pred)


def build_model(variant: str, attn_impl: str = "sdpa") -> CoTracker3:
    """``"offline"`` (window 60) or ``"online"`` (window 16) CoTracker3 with random weights."""
    if variant == "offline":
        return CoTracker3(window_len=OFFLINE_WINDOW, attn_impl=attn_impl)
    if variant == "online":
        return CoTracker3(window_len=ONLINE_WINDOW, attn_impl=attn_impl)
    raise ValueError(f"variant must be 'offline' or 'online', got {variant!r}")
