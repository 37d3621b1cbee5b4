"""DINOv2 ViT encoder as used by Video Depth Anything (checkpoint-compatible parameter names).

Patch 14, a 37x37 (+1 class token) learned position table for 518x518 inputs, interpolated
bicubically to the input grid (offset 0.1, no antialias), layer scale, MLP FFN, no register
tokens. :meth:`DinoV2Encoder.intermediate` returns the final-norm patch tokens of the requested
blocks; parameter names follow the official checkpoints (``patch_embed.proj``, ``blocks.N.attn.qkv``,
``blocks.N.ls1.gamma`` ...), so the official state_dict loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 14
POS_GRID = 37  # 518 / 14


@dataclass(frozen=True)
class EncoderConfig:
    dim: int
    depth: int
    heads: int
    taps: tuple[int, ...]  # blocks whose (normed) tokens feed the head


ENCODERS: dict[str, EncoderConfig] = {
    "vits": EncoderConfig(384, 12, 6, (2, 5, 8, 11)),
    "vitb": EncoderConfig(768, 12, 12, (2, 5, 8, 11)),
    "vitl": EncoderConfig(1024, 24, 16, (4, 11, 17, 23)),
}


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N,3,H,W) -> (N, h*w, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2Encoder(nn.Module):
    def __init__(self, encoder: str = "vits"):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; expected one of {sorted(ENCODERS)}")
        cfg = ENCODERS[encoder]
        self.cfg = cfg
        self.embed_dim = cfg.dim
        self.patch_embed = PatchEmbed(cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, POS_GRID * POS_GRID + 1, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim))  # unused at inference, kept for the checkpoint
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.heads) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)

    def position_table(self, gh: int, gw: int, dtype: torch.dtype) -> torch.Tensor:
        """The (1, 1+gh*gw, D) position table for a gh x gw patch grid (official interpolation rule)."""
        if gh * gw == POS_GRID * POS_GRID and gh == gw:
            return self.pos_embed.to(dtype)
        table = self.pos_embed.float()
        grid = table[:, 1:].reshape(1, POS_GRID, POS_GRID, -1).permute(0, 3, 1, 2)
        # the scale factor (not the output size) drives the sampling positions: keep it exact
        sh, sw = (gh + 0.1) / POS_GRID, (gw + 0.1) / POS_GRID
        grid = F.interpolate(grid, scale_factor=(sh, sw), mode="bicubic", antialias=False)
        if grid.shape[-2:] != (gh, gw):
            raise RuntimeError(f"position table interpolated to {tuple(grid.shape[-2:])}, wanted {(gh, gw)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([table[:, :1], grid], dim=1).to(dtype)

    def intermediate(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Final-norm patch tokens ``(N, h*w, D)`` of the tap blocks, for images ``(N,3,H,W)``."""
        n, _, h, w = x.shape
        gh, gw = h // PATCH, w // PATCH
        tok = self.patch_embed(x)
        tok = torch.cat([self.cls_token.expand(n, -1, -1).to(tok.dtype), tok], dim=1)
        tok = tok + self.position_table(gh, gw, tok.dtype)
        taps = set(self.cfg.taps)
        outs = []
        for i, blk in enumerate(self.blocks):
            tok = blk(tok)
            if i in taps:
                outs.append(self.norm(tok[:, 1:]))
            if i >= self.cfg.taps[-1]:
                break
        return outs
