"""The temporal DPT head of Video Depth Anything (checkpoint-compatible parameter names).

A DPT decoder (1x1 projections, transposed-conv/strided-conv resampling to 4 scales, residual
fusion blocks, 2-conv output) with four *temporal motion modules*: self-attention across the T
frames of a window at every spatial position (8 heads, a stored sinusoidal position table of
length 32, two attention blocks and a GEGLU feed-forward), inserted after the projections of
layers 3 and 4 and after refinenets 4 and 3.

Layout note: the motion modules keep tokens as ``(B*h*w, T, C)`` between the group norm and the
output projection (every op in between is per-token or per-sequence), so the reshuffle between
image and sequence layout happens once per module, not once per attention block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD_CONFIGS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "vits": (64, (48, 96, 192, 384)),
    "vitb": (128, (96, 192, 384, 768)),
    "vitl": (256, (256, 512, 1024, 1024)),
}
MOTION_HEADS = 8
MAX_FRAMES = 32
SDPA_MAX_BATCH = 32768  # sequences per attention call (keeps CUDA grid dims in range)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """Default content of the ``pe`` buffer (the checkpoint's stored table replaces it on load).

    Always computed on the CPU, whatever the default device: under ``torch.device("meta")``
    (:func:`~stages.depth.vda.model.build_vda_empty`) the first meta operations cost seconds
    of one-off set-up in every fresh process (a model actor's start), for a table that is
    discarded anyway."""
    cpu = torch.device("cpu")
    pos = torch.arange(length, dtype=torch.float32, device=cpu)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=cpu) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, length, dim, device=cpu)
    table[0, :, 0::2] = torch.sin(pos * freq)
    table[0, :, 1::2] = torch.cos(pos * freq)
    return table


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.shape[0] <= SDPA_MAX_BATCH:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                q[i : i + SDPA_MAX_BATCH], k[i : i + SDPA_MAX_BATCH], v[i : i + SDPA_MAX_BATCH]
            )
            for i in range(0, q.shape[0], SDPA_MAX_BATCH)
        ]
    )


# ----------------------------------------------------------------------------- motion modules
class PositionTable(nn.Module):
    def __init__(self, dim: int, length: int = MAX_FRAMES):
        super().__init__()
        self.register_buffer("pe", sinusoid_table(length, dim))


class TemporalAttention(nn.Module):
    def __init__(self, dim: int, heads: int = MOTION_HEADS):
        super().__init__()
        self.heads = heads
        self.pos_encoder = PositionTable(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (S, T, C) sequences over time
        s, t, c = x.shape
        if t > self.pos_encoder.pe.shape[1]:
            raise ValueError(f"window of {t} frames exceeds the temporal table ({self.pos_encoder.pe.shape[1]})")
        x = x + self.pos_encoder.pe[:, :t].to(x.dtype)
        split = lambda y: y.view(s, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        out = sdpa(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        return self.to_out[0](out.transpose(1, 2).reshape(s, t, c))


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TemporalBlock(nn.Module):
    def __init__(self, dim: int, n_attn: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim) for _ in range(n_attn)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(n_attn)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = x + attn(norm(x))
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, n_blocks: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalBlock(channels) for _ in range(n_blocks)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """``x`` (B*T, C, h, w) -> same shape; attention runs across the T frames of each window."""
        bt, c, h, w = x.shape
        b = bt // frames
        y = self.norm(x)
        y = y.reshape(b, frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, frames, c)
        y = self.proj_in(y)
        for blk in self.transformer_blocks:
            y = blk(y)
        y = self.proj_out(y)
        y = y.view(b, h, w, frames, c)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.permute(0, 3, 1, 2, 4).reshape(bt, h, w, c).permute(0, 3, 1, 2)  # stays NHWC in memory
        else:
            y = y.permute(0, 3, 4, 1, 2).reshape(bt, c, h, w)
        return y + x


class TemporalModule(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.temporal_transformer(x, frames)


# ----------------------------------------------------------------------------- DPT decoder
class ResidualConvUnit(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.out_conv = nn.Conv2d(ch, ch, 1)
        self.resConfUnit1 = ResidualConvUnit(ch)
        self.resConfUnit2 = ResidualConvUnit(ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    def __init__(self, features: int, out_channels):
        super().__init__()
        for i, oc in enumerate(out_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(oc, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FusionBlock(features))
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU(), nn.Identity()
        )


class DPTHeadTemporal(nn.Module):
    def __init__(self, in_dim: int, features: int, out_channels):
        super().__init__()
        oc = list(out_channels)
        self.projects = nn.ModuleList([nn.Conv2d(in_dim, c, 1) for c in oc])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
            ]
        )
        self.scratch = Scratch(features, oc)
        self.motion_modules = nn.ModuleList(
            [TemporalModule(oc[2]), TemporalModule(oc[3]), TemporalModule(features), TemporalModule(features)]
        )

    def frame_stage(
        self, tokens: list[torch.Tensor], grid: tuple[int, int], channels_last: bool = False
    ) -> list[torch.Tensor]:
        """Per-frame part of the head: ``tokens`` 4 x (N, gh*gw, D) -> [r1, r2, l3, l4] (N, C, h, w).

        Nothing here mixes frames, so a frame shared by several windows is computed once.
        """
        gh, gw = grid
        mf = torch.channels_last if channels_last else torch.contiguous_format
        feats = []
        for i, tok in enumerate(tokens):
            x = tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], gh, gw).contiguous(memory_format=mf)
            feats.append(self.resize_layers[i](self.projects[i](x)))
        l1, l2, l3, l4 = feats
        return [self.scratch.layer1_rn(l1), self.scratch.layer2_rn(l2), l3, l4]

    def window_stage(
        self,
        feats: list[torch.Tensor],
        grid: tuple[int, int],
        frames: int,
        chunk: int | None = None,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """Temporal part: [r1, r2, l3, l4] of B windows x ``frames`` (frame-major within a window)
        -> depth (B*T, 1, 14*gh, 14*gw) float32.

        ``chunk`` frames at a time go through the high-resolution tail (refinenets 2 and 1 and the
        output convolutions); the result does not depend on it, only the peak memory does.
        """
        gh, gw = grid
        mf = torch.channels_last if channels_last else torch.contiguous_format
        s = self.scratch
        r1, r2, l3, l4 = feats
        r3 = s.layer3_rn(self.motion_modules[0](l3, frames))
        r4 = s.layer4_rn(self.motion_modules[1](l4, frames))
        p4 = self.motion_modules[2](s.refinenet4(r4, size=r3.shape[2:]), frames).contiguous(memory_format=mf)
        p3 = self.motion_modules[3](s.refinenet3(p4, r3, size=r2.shape[2:]), frames).contiguous(memory_format=mf)
        n = p3.shape[0]
        step = n if not chunk or chunk >= n else int(chunk)
        # some upsampling kernels index with int32: keep each chunk's full-res map < 2^31 elements
        step = max(1, min(step, (2**31 - 1) // (s.output_conv1.out_channels * gh * 14 * gw * 14)))
        outs = []
        for i in range(0, n, step):
            p2 = s.refinenet2(p3[i : i + step], r2[i : i + step], size=r1.shape[2:])
            p1 = s.refinenet1(p2, r1[i : i + step])
            y = s.output_conv1(p1)
            y = F.interpolate(y, size=(gh * 14, gw * 14), mode="bilinear", align_corners=True)
            with torch.autocast(device_type=y.device.type, enabled=False):
                y = s.output_conv2(y.float())
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs)
