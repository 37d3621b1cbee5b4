"""Video Depth Anything: DINOv2 encoder + temporal DPT head, built per encoder size.

``build_vda("vits"|"vitb"|"vitl", metric=False)`` gives the network of the official
``VideoDepthAnything(encoder, features, out_channels, metric)``; its ``state_dict`` keys are the
official checkpoint keys (``pretrained.*`` encoder, ``head.*`` temporal DPT head). The forward is the
same for the relative and metric models; ``metric`` only changes how whole-video inference stitches
windows (see :mod:`stages.depth.vda.infer`).

Output of :meth:`VideoDepthAnything.forward`: ``(B, T, H, W)`` float32, non-negative. For the
relative model this is affine-invariant *disparity* (larger = nearer); for the metric model it is
depth in metres.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .dinov2 import ENCODERS, PATCH, DinoV2Encoder
from .dpt_temporal import HEAD_CONFIGS, MAX_FRAMES, DPTHeadTemporal, sinusoid_table

ENCODER_NAMES = tuple(ENCODERS)


class VideoDepthAnything(nn.Module):
    def __init__(self, encoder: str = "vits", metric: bool = False):
        super().__init__()
        if encoder not in HEAD_CONFIGS:
            raise ValueError(f"unknown encoder {encoder!r}; expected one of {list(HEAD_CONFIGS)}")
        features, out_channels = HEAD_CONFIGS[encoder]
        self.encoder = encoder
        self.metric = bool(metric)
        self.features = features
        self.out_channels = tuple(out_channels)
        self.pretrained = DinoV2Encoder(encoder)
        self.head = DPTHeadTemporal(self.pretrained.embed_dim, features, out_channels)
        # inference knobs (not weights): frames per chunk in the high-res head tail, NHWC convs
        self.head_chunk: int | None = None
        self.channels_last = False
        self.head_autocast = True  # False: the temporal stage runs in fp32 under a bf16/fp16 autocast

    def frame_features(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Per-frame stage (DINOv2 + the head's frame-wise layers): ``(N, 3, H, W)`` -> 4 maps."""
        tokens = self.pretrained.intermediate(frames)
        grid = (frames.shape[-2] // PATCH, frames.shape[-1] // PATCH)
        return self.head.frame_stage(tokens, grid, channels_last=self.channels_last)

    def window_depth(self, feats: list[torch.Tensor], frames: int, hw: tuple[int, int]) -> torch.Tensor:
        """Temporal stage on per-window features (B*T frame-major) -> (B, T, H, W) float32."""
        h, w = hw
        ctx = contextlib.nullcontext()
        if not self.head_autocast and torch.is_autocast_enabled(feats[0].device.type):
            ctx = torch.autocast(device_type=feats[0].device.type, enabled=False)
            feats = [f.float() for f in feats]
        with ctx:
            depth = self.head.window_stage(
                feats, (h // PATCH, w // PATCH), frames, chunk=self.head_chunk, channels_last=self.channels_last
            )
        if depth.shape[-2:] != (h, w):
            depth = F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=True)
        return F.relu(depth).reshape(-1, frames, h, w)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Depth of windows of normalised frames.

        * ``forward(x)`` with ``x`` (B, T, 3, H, W) -> (B, T, H, W) float32 (the official forward).
        * ``forward(frames, index)`` with distinct frames (N, 3, H, W) and ``index`` (B, T) long:
          window b, slot t is frame ``index[b, t]``. The per-frame stage runs once per distinct
          frame (windows overlap), the temporal stage per window; same result as gathering first.
        """
        if index is None:
            b, t, c, h, w = x.shape
            frames, index_flat = x.reshape(b * t, c, h, w), None
        else:
            b, t = index.shape
            frames, index_flat = x, index.reshape(-1)
            h, w = x.shape[-2:]
        if t > MAX_FRAMES:
            raise ValueError(f"at most {MAX_FRAMES} frames per window, got {t}")
        feats = self.frame_features(frames)
        if index_flat is not None:
            feats = [f.index_select(0, index_flat) for f in feats]
        return self.window_depth(feats, t, (h, w))


def build_vda(encoder: str = "vits", metric: bool = False) -> VideoDepthAnything:
    """The network for ``encoder`` (vits / vitb / vitl), eval mode, default (untrained) weights."""
    return VideoDepthAnything(encoder, metric).eval()


def build_vda_empty(
    encoder: str = "vits", metric: bool = False, device: str | torch.device = "cpu"
) -> VideoDepthAnything:
    """The network for ``encoder`` with its weights allocated on ``device`` but not initialised,
    for a caller that overwrites every entry of the state_dict (a checkpoint load,
    :func:`randomize_`). The default initialisation of vitl's 380M weights costs seconds of CPU
    in every model actor start (one thread under Ray), on the path that keeps a GPU waiting when
    an actor restarts."""
    with torch.device("meta"):
        model = VideoDepthAnything(encoder, metric)
    return model.to_empty(device=device).eval()


@torch.no_grad()
def randomize_(model: VideoDepthAnything, seed: int = 0) -> VideoDepthAnything:
    """Fill every weight with a seeded, scale-aware random value (benchmarks and tests without a
    checkpoint): matrices/kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.01), biases and layer-scale
    gammas N(0, 0.01); the temporal position tables get the sinusoid table.

    The numbers are drawn on the device the model is on, with a generator of that device: on a
    GPU the fill takes milliseconds instead of seconds of one CPU thread per model actor start
    (the draws differ from the CPU's for the same seed; each device's are reproducible)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "pe":
            p.copy_(sinusoid_table(p.shape[1], p.shape[2]))
        elif p.ndim >= 2:
            fan_in = max(1, math.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=g, device=dev) / math.sqrt(fan_in))
        elif leaf == "weight":
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=dev))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g, device=dev))
    return model
