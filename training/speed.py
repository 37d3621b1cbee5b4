"""Training speed switches: attention kernel, compiled blocks and VAE encoder, selective activation
checkpointing, fused AdamW.

Each is a config field (docs/TRAINING.md, "Speed"). The trainer and ``bench/bench_speed.py`` apply them
through these functions, so the benchmark measures what training runs. Those that can change numerics
(attention kernel, compilation, checkpointing, fused AdamW, the VAE's precision in
:meth:`training.backbone.VideoBackbone.encode`) are tested on CPU to give the same losses with and
without them (tests/test_training_speed.py); the GPU check is ``bench/bench_speed.py``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

# runtime.attention_backend -> torch.nn.attention.SDPBackend member names
_SDPA = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def attention_context(backend: str):
    """A context in which ``F.scaled_dot_product_attention`` (both transformers use it: diffusers'
    CogVideoX processor and ``nn.MultiheadAttention``) may only use ``backend``; "auto": PyTorch's choice.
    A backend that cannot run an input raises inside (PyTorch says why) rather than falling back silently."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _SDPA[backend])])


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the Diff4Splat model: CogVideoX's, then the LDRM's (FSDP shard groups too)."""
    return [*model.backbone.transformer.transformer_blocks, *model.ldrm.blocks]


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every transformer block's ``forward`` in place; returns how many.

    The forward, not the module: parameter names and checkpoints stay as they are, and the hooks that
    FSDP2 puts around a block (all-gather, reduce-scatter) and activation checkpointing run outside the
    compiled code. Blocks of one kind share their compiled graph (same code, parameters are inputs), so
    compile time is one block's per shape, not per block. ``dynamic=False``: each stage's shapes compile
    once (a curriculum has two or three).
    """
    blocks = transformer_blocks(model)
    for blk in blocks:
        blk.forward = torch.compile(blk.forward, backend=backend, dynamic=False)
    return len(blocks)


def compile_vae_encoder(backbone: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` the frozen VAE encoder's ``forward`` in place (``runtime.compile_vae``).

    Eager, the encoder of 49 frames at 512² spends most of its time outside its convolutions: GroupNorm
    in float32 under autocast (with casts around it), SiLU and residual adds over activations of
    49 x 128 x 512² values, each a pass through memory; compiled, they fuse (bench/RESULTS.md §4e: 812 ->
    ~330 ms on an H200). In place, as :func:`compile_blocks`: parameter names and checkpoints unchanged.
    ``dynamic=False``: a graph per chunk shape of each stage (diffusers encodes 8 frames at a time, the
    first chunk with the remainder, then with the causal cache)."""
    enc = backbone.vae.encoder
    enc.forward = torch.compile(enc.forward, backend=backend, dynamic=False)


def checkpoint_mask(n: int, fraction: float) -> list[bool]:
    """Which of ``n`` blocks recompute their activations: ``round(n * fraction)`` of them, spread evenly
    (block i when floor((i+1)f) > floor(i f)), so memory is freed across the whole depth."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"checkpoint fraction must be in [0, 1], got {fraction}")
    k = round(n * fraction)
    if k == 0:
        return [False] * n
    f = k / n
    return [math.floor((i + 1) * f + 1e-9) > math.floor(i * f + 1e-9) for i in range(n)]


def make_optimizer(params, optim_cfg) -> torch.optim.Optimizer:
    """AdamW as configured; ``optim.fused`` selects the fused kernel (CUDA and CPU) — one launch for every
    parameter instead of a few per parameter group, the same update to float rounding."""
    kw = dict(lr=optim_cfg.lr, betas=optim_cfg.betas, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.fused:
        kw["fused"] = True  # off: PyTorch's default (the multi-tensor "foreach" path on CUDA)
    return torch.optim.AdamW(params, **kw)
