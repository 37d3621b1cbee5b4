"""LDRM: latent dynamic reconstruction model — latents + cameras -> deformable Gaussian maps.

Tokens: latent patches (p x p of the latent grid per latent frame) and camera-pose tokens (the
Plücker ray map of the same footprint at pixel resolution, averaged over the frames the latent
frame covers) are each projected to ``dim``, tagged with a learned type embedding and concatenated
along the sequence. ``num_blocks`` (16) pre-norm transformer blocks run over the 2N tokens; the N
latent-token outputs go through a light decoder (LayerNorm + MLP) and a 3D transposed convolution
with kernel = stride = (f_t, f_s*p, f_s*p) back to source-video pixels (the first f_t - 1 output
frames are dropped so latent frame 0 maps to frame 0 alone, as in the causal VAE). Per pixel:
12 Gaussian channels (depth 1, scale 3, rotation 4, opacity 1, colour 3) and ``deform_features``
channels that a zero-initialised 1x1 head turns into T x K_d raw deformations at the birth frames.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from training.config import LDRMConfig
from training.gaussians import K_D, GaussianMaps

GAUSS_CH = 12


def birth_frames(t: int, stride: int) -> list[int]:
    frames = list(range(0, t, max(1, stride)))
    if frames[-1] != t - 1:
        frames.append(t - 1)
    return frames


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
        self.latent_in = nn.Linear(latent_channels * p * p, cfg.dim)
        self.pose_in = nn.Linear(6 * (fs * p) ** 2, cfg.dim)
        self.type_emb = nn.Parameter(torch.zeros(2, cfg.dim))
        self.frame_emb = nn.Parameter(torch.zeros(1 + (max_frames - 1) // ft, cfg.dim))
        nn.init.normal_(self.type_emb, std=0.02)
        nn.init.normal_(self.frame_emb, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(cfg.dim)
        c = cfg.decoder_channels
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, c))
        k = (ft, fs * p, fs * p)
        self.deconv = nn.ConvTranspose3d(c, GAUSS_CH + cfg.deform_features, kernel_size=k, stride=k)
        self.deform_head = nn.Conv2d(cfg.deform_features, max_frames * K_D, 1)
        nn.init.zeros_(self.deform_head.weight)
        nn.init.zeros_(self.deform_head.bias)
        self.grad_checkpointing = False
        with torch.no_grad():  # start near mid-range depth, half-transparent grey, small scales
            self.deconv.bias.zero_()
            self.deconv.bias[4:8].copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def tokens(self, z: torch.Tensor, pl: torch.Tensor) -> torch.Tensor:
        """z (B,F',C,h,w), pl (B,F',6,H,W) per-latent-frame Plücker -> (B, 2N, dim)."""
        p = self.cfg.patch_size
        b, f = z.shape[:2]
        zt = F.pixel_unshuffle(z.flatten(0, 1), p)  # (BF, C p p, h/p, w/p)
        pt = F.pixel_unshuffle(pl.flatten(0, 1), self.fs * p)
        gh, gw = zt.shape[-2:]
        zt = zt.unflatten(0, (b, f)).permute(0, 1, 3, 4, 2).reshape(b, f * gh * gw, -1)
        pt = pt.unflatten(0, (b, f)).permute(0, 1, 3, 4, 2).reshape(b, f * gh * gw, -1)
        fe = self.frame_emb[:f].repeat_interleave(gh * gw, 0)[None]
        lat = self.latent_in(zt) + self.type_emb[0] + fe
        pose = self.pose_in(pt.to(lat.dtype)) + self.type_emb[1] + fe
        return torch.cat([lat, pose], 1), (f, gh, gw)

    def forward(self, z: torch.Tensor, pl_latent: torch.Tensor, intrinsics: torch.Tensor, c2w: torch.Tensor,
                num_frames: int, with_deformation: bool) -> GaussianMaps:
        x, (f, gh, gw) = self.tokens(z, pl_latent)
        n = f * gh * gw
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if (self.grad_checkpointing and self.training) else blk(x)
        x = self.mlp(self.norm(x[:, :n]))
        b = x.shape[0]
        x = x.reshape(b, f, gh, gw, -1).permute(0, 4, 1, 2, 3)
        out = self.deconv(x)[:, :, self.ft - 1:self.ft - 1 + num_frames]  # (B, C, T, H, W)
        births = birth_frames(num_frames, self.cfg.birth_frame_stride)
        out = out[:, :, births].permute(0, 2, 3, 4, 1).float()  # (B, S, H, W, C)
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
        return GaussianMaps(depth, scale, quat, opacity, colour, deform,
                            torch.tensor(births, dtype=torch.long), intrinsics, c2w)
