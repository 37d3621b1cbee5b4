"""Building blocks of the CoTracker3 network, written for d4s.

The layer shapes follow the published CoTracker3 architecture so that the official checkpoints
load through :func:`stages.tracks.cotracker.load.load_official_state_dict`; module names are
d4s's own (the loader maps them).

* :class:`FeatureEncoder` - the stride-4 CNN: a 7x7 stem, four residual stages at strides
  2/4/8/16 (instance norm, no affine), every stage resized to stride 4 and fused by a 3x3 and
  a 1x1 convolution to 128 channels.
* :class:`TwoLayerMLP` - Linear, GELU, Linear (exact GELU for the correlation encoder, the tanh
  approximation inside the transformer).
* :class:`MultiHeadAttention`, :class:`SelfBlock`, :class:`CrossBlock` - pre-norm transformer
  blocks (LayerNorm without affine, eps 1e-6; the cross blocks normalise their context with an
  affine LayerNorm, eps 1e-5).
* :class:`TrackTransformer` - alternating time attention (per track) and space attention
  through a small set of learned virtual tracks, ending in a (dx, dy, visibility, confidence)
  head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------- encoder


class _Residual(nn.Module):
    """Two 3x3 convolutions with instance norm; a strided 1x1 projection on the skip path."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.proj = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.instance_norm(self.conv1(x)))
        y = F.relu(F.instance_norm(self.conv2(y)))
        skip = x if self.proj is None else F.instance_norm(self.proj(x))
        return F.relu(skip + y)


class _Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.first = _Residual(c_in, c_out, stride)
        self.second = _Residual(c_out, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class FeatureEncoder(nn.Module):
    """(N, 3, H, W) frames in [-1, 1] -> (N, out_dim, H/4, W/4) features (not yet L2-normalised)."""

    def __init__(self, out_dim: int = 128, stride: int = 4):
        super().__init__()
        self.stride = stride
        half, three_q = out_dim // 2, out_dim // 4 * 3
        self.stem = nn.Conv2d(3, half, 7, stride=2, padding=3)
        self.stages = nn.ModuleList(
            [
                _Stage(half, half, 1),
                _Stage(half, three_q, 2),
                _Stage(three_q, out_dim, 2),
                _Stage(out_dim, out_dim, 2),
            ]
        )
        self.fuse = nn.Conv2d(half + three_q + 2 * out_dim, 2 * out_dim, 3, padding=1)
        self.head = nn.Conv2d(2 * out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        y = F.relu(F.instance_norm(self.stem(x)))
        levels = []
        for stage in self.stages:
            y = stage(y)
            levels.append(F.interpolate(y, (h, w), mode="bilinear", align_corners=True))
        y = F.relu(F.instance_norm(self.fuse(torch.cat(levels, dim=1))))
        return self.head(y)


# ----------------------------------------------------------------------------- transformer


class TwoLayerMLP(nn.Module):
    def __init__(self, c_in: int, c_hidden: int, c_out: int, tanh_gelu: bool):
        super().__init__()
        self.fc1 = nn.Linear(c_in, c_hidden)
        self.fc2 = nn.Linear(c_hidden, c_out)
        self.approximate = "tanh" if tanh_gelu else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class MultiHeadAttention(nn.Module):
    """Attention with a fused key/value projection (keys are the first half of ``to_kv``).

    ``impl`` selects ``"sdpa"`` (``F.scaled_dot_product_attention``, flash/memory-efficient
    kernels on GPU) or ``"math"`` (explicit softmax(QK^T/sqrt(d))V, as the reference code).
    """

    impl = "sdpa"

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n_q, c = x.shape
        n_k = context.shape[1]
        h = self.heads
        q = self.to_q(x).view(b, n_q, h, c // h).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.reshape(b, n_k, h, c // h).transpose(1, 2)
        v = v.reshape(b, n_k, h, c // h).transpose(1, 2)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(dim=-1)
            out = attn @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n_q, c))


class SelfBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads)
        self.mlp = TwoLayerMLP(dim, int(dim * mlp_ratio), dim, tanh_gelu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        x = x + self.attn(F.layer_norm(x, (c,), eps=1e-6))
        return x + self.mlp(F.layer_norm(x, (c,), eps=1e-6))


class CrossBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_ctx = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.mlp = TwoLayerMLP(dim, int(dim * mlp_ratio), dim, tanh_gelu=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        x = x + self.attn(F.layer_norm(x, (c,), eps=1e-6), self.norm_ctx(context))
        return x + self.mlp(F.layer_norm(x, (c,), eps=1e-6))


class TrackTransformer(nn.Module):
    """Tokens (B, N, T, in_dim) -> per-token updates (B, N, T, 4): dx, dy, visibility, confidence."""

    def __init__(
        self,
        in_dim: int = 1110,
        dim: int = 384,
        heads: int = 8,
        depth: int = 3,
        num_virtual: int = 64,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.num_virtual = num_virtual
        self.embed = nn.Linear(in_dim, dim)
        self.virtual_tracks = nn.Parameter(torch.randn(1, num_virtual, 1, dim))
        self.time_blocks = nn.ModuleList([SelfBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.virtual_from_points = nn.ModuleList([CrossBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.virtual_self = nn.ModuleList([SelfBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.points_from_virtual = nn.ModuleList([CrossBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.flow_head = nn.Linear(dim, 2)
        self.vis_conf_head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        b, n, t, c = tokens.shape
        v = self.num_virtual
        tokens = torch.cat([tokens, self.virtual_tracks.to(tokens.dtype).expand(b, v, t, c)], dim=1)
        m = n + v
        for i in range(len(self.time_blocks)):
            tokens = self.time_blocks[i](tokens.reshape(b * m, t, c)).view(b, m, t, c)
            space = tokens.permute(0, 2, 1, 3).reshape(b * t, m, c)
            points, virtual = space[:, :n], space[:, n:]
            virtual = self.virtual_from_points[i](virtual, points)
            virtual = self.virtual_self[i](virtual)
            points = self.points_from_virtual[i](points, virtual)
            tokens = torch.cat([points, virtual], dim=1).view(b, t, m, c).permute(0, 2, 1, 3)
        tokens = tokens[:, :n]
        return torch.cat([self.flow_head(tokens), self.vis_conf_head(tokens)], dim=-1)


def set_attention_impl(module: nn.Module, impl: str) -> None:
    """Switch every attention layer under ``module`` to ``"sdpa"`` or ``"math"``."""
    if impl not in ("sdpa", "math"):
        raise ValueError(f"attention impl must be 'sdpa' or 'math', got {impl!r}")
    for m in module.modules():
        if isinstance(m, MultiHeadAttention):
            m.impl = impl
