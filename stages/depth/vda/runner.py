"""Video Depth Anything as a depth-stage worker (one instance per GPU / Ray actor).

Outputs of :meth:`VDARunner.predict`:

* ``metric=False`` (relative model, ``video_depth_anything_*.pth``): affine-invariant
  **disparity** (inverse depth up to an unknown scale and shift; larger = nearer), NOT depth.
  Downstream alignment (``stages.align``) must fit scale/shift in disparity space.
* ``metric=True`` (``metric_video_depth_anything_*.pth``): **metric depth in metres**.

Both are ``(T, H, W)`` float32 at the clip's resolution, non-negative.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch

from .infer import DTYPES, INFER_LEN, forward_windows, infer_videos, network_size
from .load import load_checkpoint
from .model import ENCODER_NAMES, build_vda_empty, randomize_

log = logging.getLogger(__name__)


class VDARunner:
    """Loads the model once; :meth:`predict` batches the windows of several clips per forward.

    ``windows_per_batch`` windows (32 frames each) go through the network at a time; clips whose
    frames map to the same network input size share batches.
    """

    def __init__(
        self,
        encoder: str = "vitl",
        checkpoint: str | None = None,
        metric: bool = False,
        device: str = "cuda",
        dtype: str = "bf16",
        input_size: int = 518,
        compile: bool = False,
        allow_random_weights: bool = False,
        windows_per_batch: int | None = None,
    ):
        if encoder not in ENCODER_NAMES:
            raise ValueError(f"encoder must be one of {list(ENCODER_NAMES)}, got {encoder!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if input_size <= 0 or input_size % 14:
            raise ValueError(f"input_size must be a positive multiple of 14, got {input_size}")
        if checkpoint is None and not allow_random_weights:
            raise ValueError(
                "VDARunner needs a checkpoint (stages.depth.checkpoint: path or fsspec URL of "
                f"{'metric_' if metric else ''}video_depth_anything_{encoder}.pth, see docs/MODELS.md); "
                "pass allow_random_weights=True only for tests and benchmarks"
            )
        self.encoder, self.metric, self.dtype, self.input_size = encoder, bool(metric), dtype, int(input_size)
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        self.untrained = checkpoint is None
        if checkpoint is None:
            log.warning("VDARunner(%s): RANDOM weights, outputs are meaningless", encoder)
            # built and filled on its device: no CPU draws of 380M numbers per actor start
            model = randomize_(build_vda_empty(encoder, metric=metric, device=self.device), seed=0)
        else:
            model = load_checkpoint(checkpoint, encoder=encoder, metric=metric)
        model = model.to(self.device).eval()
        if self.device.type == "cuda":
            model.head_chunk = 64  # frames per chunk through the high-resolution head tail
            model.channels_last = True
        self.model = model
        self._forward = torch.compile(model, dynamic=False) if compile else model
        self.windows_per_batch = windows_per_batch or (4 if self.device.type == "cuda" else 1)
        self._warm_sizes: set[tuple[int, int]] = set()  # network sizes warm_for has run

    @property
    def output_kind(self) -> str:
        return "metric_depth_m" if self.metric else "relative_disparity"

    def warm_for(self, videos: Sequence) -> float:
        """Run, once per network input size, every window count a forward of :meth:`predict` can
        have (1..``windows_per_batch``) on videos of these frame sizes; returns the seconds spent (0.0
        when every size is warm already).

        Why: on a GPU, the first cuDNN convolution or attention call at a new shape builds an
        execution plan. A new window count costs ~0.35 s that way (the temporal stage's every layer),
        and whole-video inference meets each of them with the first video lengths and mixes of scenes
        in a call (bench/RESULTS.md §7). The per-frame stage's shapes follow the number of distinct
        frames in a forward instead, up to ~100 values at ~0.05 s each, once: not warmed, since
        bounding them (power-of-two frame chunks) cost 4 % of the steady-state speed. Also warms the
        host path (pinned buffers, resizing, stitching) at the frame size.
        """
        todo: dict[tuple[int, int], tuple[int, int]] = {}
        for v in videos:
            h, w = int(v.shape[1]), int(v.shape[2])
            net = network_size(h, w, self.input_size)
            if net not in self._warm_sizes:
                todo.setdefault(net, (h, w))
        if not todo:
            return 0.0
        t0 = time.perf_counter()
        for net, (h, w) in todo.items():
            self.predict([np.zeros((1, h, w, 3), np.uint8)])  # the host path and a 1-window forward
            for b in range(2, self.windows_per_batch + 1):  # one frame is enough for the per-frame stage
                frames = torch.zeros((1, 3) + net, device=self.device)
                index = torch.zeros((b, INFER_LEN), dtype=torch.long, device=self.device)
                forward_windows(self._forward, frames, index, self.dtype)
            self._warm_sizes.add(net)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def predict(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``clips``: list of ``(T, H, W, 3)`` uint8 RGB -> list of ``(T, H, W)`` float32
        (relative disparity or metric depth, see the module docstring)."""
        if len(clips) == 0:
            return []
        return infer_videos(
            self._forward,
            clips,
            self.input_size,
            dtype=self.dtype,
            windows_per_batch=self.windows_per_batch,
            metric=self.metric,
            device=self.device,
        )
