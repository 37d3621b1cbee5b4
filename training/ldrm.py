"""LDRM: latent dynamic reconstruction model — latents + cameras -> deformable Gaussian maps.

Tokens: one per p x p latent patch of every latent frame. A token is the linear projection of the
patch's latent channels concatenated with the Plücker ray map of the same footprint at pixel
resolution (averaged over the frames the latent frame covers), plus a fixed 3D sin-cos positional
embedding of (latent frame, row, column). So every token carries its own camera rays and its place
in the grid: self-attention and the MLP are permutation-equivariant, and without both a latent patch
could not be related to its ray (the earlier design kept camera tokens as separate sequence entries
with a frame embedding only, so swapping two patches' rays changed nothing). Spatial positions are
normalised to a grid ``POS_BASE_GRID`` tokens wide, so the 256² and 512² stages see the same
embedding at the same place in the image.

``num_blocks`` (16) pre-norm transformer blocks run over the N tokens; the outputs go through a light
decoder (LayerNorm + MLP) and a 3D transposed convolution with kernel = stride = (f_t, f_s*p, f_s*p)
back to source-video pixels (the first f_t - 1 output frames are dropped so latent frame 0 maps to
frame 0 alone, as in the causal VAE). Per pixel: 12 Gaussian channels (depth 1, scale 3, rotation 4,
opacity 1, colour 3) and ``deform_features`` channels that a zero-initialised 1x1 head turns into
T x K_d raw deformations at the birth frames. The transposed convolution, the activations and the
deformation head run in float32 with autocast off: Gaussian parameters and the deformation difference
``raw[t] - raw[birth]`` are not rounded to bf16's 8-bit mantissa (a 1.5 % depth step at mid range).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from training.config import LDRMConfig
from training.gaussians import K_D, GaussianMaps

GAUSS_CH = 12
POS_BASE_GRID = 16  # the spatial positional embedding spans this many units across the image at any resolution


def birth_frames(t: int, stride: int) -> list[int]:
    frames = list(range(0, t, max(1, stride)))
    if frames[-1] != t - 1:
        frames.append(t - 1)
    return frames


def positional_embedding(dim: int, frames: int, gh: int, gw: int, device=None) -> torch.Tensor:
    """Fixed 3D sin-cos embedding (frames*gh*gw, dim), row-major over (frame, row, column).

    diffusers' ``get_3d_sincos_pos_embed`` (a quarter of the channels for the latent frame index, the
    rest split between rows and columns), spatial positions scaled so the grid spans ``POS_BASE_GRID``.
    """
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    emb = get_3d_sincos_pos_embed(
        dim, (gw, gh), frames, spatial_interpolation_scale=max(gh, gw) / POS_BASE_GRID, device=device, output_type="pt"
    )
    return emb.reshape(frames * gh * gw, dim).float()


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.n1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.n2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x):
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


class LDRM(nn.Module):
    def __init__(self, cfg: LDRMConfig, latent_channels: int, fs: int, ft: int, max_frames: int):
        super().__init__()
        self.cfg, self.fs, self.ft, self.max_frames = cfg, fs, ft, max_frames
        p = cfg.patch_size
        self.token_in = nn.Linear(latent_channels * p * p + 6 * (fs * p) ** 2, cfg.dim)  # [latent | rays] -> token
        self._pos_cache: dict = {}
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(cfg.dim)
        c = cfg.decoder_channels
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, c))
        k = (ft, fs * p, fs * p)
        self.deconv = nn.ConvTranspose3d(c, GAUSS_CH + cfg.deform_features, kernel_size=k, stride=k)
        self.deform_head = nn.Conv2d(cfg.deform_features, max_frames * K_D, 1)
        nn.init.zeros_(self.deform_head.weight)
        nn.init.zeros_(self.deform_head.bias)
        self.checkpointed: list[bool] = [False] * cfg.num_blocks  # blocks whose activations are recomputed
        with torch.no_grad():  # start near mid-range depth, half-transparent grey, small scales
            self.deconv.bias.zero_()
            self.deconv.bias[4:8].copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def position(self, frames: int, gh: int, gw: int, device) -> torch.Tensor:
        key = (frames, gh, gw, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = positional_embedding(self.cfg.dim, frames, gh, gw, device)
        return self._pos_cache[key]

    def tokens(self, z: torch.Tensor, pl: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """z (B,F',C,h,w), pl (B,F',6,H,W) per-latent-frame Plücker -> (B, N, dim), N = F' (h/p) (w/p)."""
        p = self.cfg.patch_size
        b, f = z.shape[:2]
        zt = F.pixel_unshuffle(z.flatten(0, 1), p)  # (BF, C p p, h/p, w/p)
        pt = F.pixel_unshuffle(pl.flatten(0, 1).to(zt.dtype), self.fs * p)  # (BF, 6 (fs p)^2, h/p, w/p)
        gh, gw = zt.shape[-2:]
        x = torch.cat([zt, pt], 1).unflatten(0, (b, f)).permute(0, 1, 3, 4, 2).reshape(b, f * gh * gw, -1)
        return self.token_in(x) + self.position(f, gh, gw, x.device), (f, gh, gw)

    def forward(
        self,
        z: torch.Tensor,
        pl_latent: torch.Tensor,
        intrinsics: torch.Tensor,
        c2w: torch.Tensor,
        num_frames: int,
        with_deformation: bool,
    ) -> GaussianMaps:
        x, (f, gh, gw) = self.tokens(z, pl_latent)
        for blk, ckpt in zip(self.blocks, self.checkpointed):
            x = checkpoint(blk, x, use_reentrant=False) if (ckpt and self.training) else blk(x)
        x = self.mlp(self.norm(x))
        b = x.shape[0]
        x = x.reshape(b, f, gh, gw, -1).permute(0, 4, 1, 2, 3)
        births = birth_frames(num_frames, self.cfg.birth_frame_stride)
        # float32 maps (module docstring); "meta" tensors (FLOP counting, training/flops.py) have no autocast
        with torch.autocast(x.device.type if x.device.type in ("cuda", "cpu") else "cpu", enabled=False):
            out = self.deconv(x.float())[:, :, self.ft - 1 : self.ft - 1 + num_frames]  # (B, C, T, H, W)
            out = out[:, :, births].permute(0, 2, 3, 4, 1)  # (B, S, H, W, C)
            return self._maps(out, births, intrinsics, c2w, num_frames, with_deformation)

    def _maps(
        self,
        out: torch.Tensor,
        births: list[int],
        intrinsics: torch.Tensor,
        c2w: torch.Tensor,
        num_frames: int,
        with_deformation: bool,
    ) -> GaussianMaps:
        """Raw decoder channels (B,S,H,W,C) -> activated Gaussian maps (+ raw deformations)."""
        g, feat = out[..., :GAUSS_CH], out[..., GAUSS_CH:]
        cfg = self.cfg
        lo, hi = torch.log(torch.tensor(cfg.depth_min)), torch.log(torch.tensor(cfg.depth_max))
        depth = torch.exp(lo + (hi - lo) * torch.sigmoid(g[..., 0]))
        scale = cfg.scale_min + depth[..., None] * cfg.scale_max_rel * torch.sigmoid(g[..., 1:4])
        quat = F.normalize(g[..., 4:8], dim=-1, eps=1e-6)
        opacity = torch.sigmoid(g[..., 8])
        colour = torch.sigmoid(g[..., 9:12])
        deform = None
        if with_deformation:
            bs, s, h, w, cf = feat.shape
            d = self.deform_head(feat.reshape(bs * s, h, w, cf).permute(0, 3, 1, 2))  # (BS, Tmax*K, H, W)
            d = d.reshape(bs, s, self.max_frames, K_D, h, w)[:, :, :num_frames]
            deform = d.permute(0, 1, 4, 5, 2, 3)  # (B,S,H,W,T,K)
        return GaussianMaps(
            depth, scale, quat, opacity, colour, deform, torch.tensor(births, dtype=torch.long), intrinsics, c2w
        )
