"""VDA's costly first-use shapes are paid once, at warm-up, not in a build's first scenes.

On a GPU, the first call of a cuDNN convolution or cuDNN attention at a new input shape builds an
execution plan (bench/RESULTS.md §7: ~0.35 s per new window count in a forward, ~0.05 s per new count of
distinct frames). ``VDARunner.warm_for`` runs every window count once per network size. These tests
record the shapes that reach every convolution and attention call of the temporal (window) stage and
check that no later call meets one the warm-up did not run, whatever the videos' lengths and however
the videos of a call are mixed. (The per-frame stage's shapes follow the number of distinct frames and
are not bounded: see ``VDARunner.warm_for``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from torch import nn

from stages.depth.vda.runner import VDARunner

# the temporal stage's convolutions (batch: windows x 32 frames); the others run per distinct frame
WINDOW_STAGE = ("head.scratch.layer3_rn", "head.scratch.layer4_rn", "head.scratch.refinenet", "head.scratch.output")


class ShapeLog:
    """Input shapes of the window stage's conv modules and temporal attention calls."""

    def __init__(self, model: nn.Module, monkeypatch):
        self.shapes: set[tuple] = set()
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and name.startswith(WINDOW_STAGE):
                m.register_forward_pre_hook(lambda mod, args, name=name: self.shapes.add((name, tuple(args[0].shape))))
        real = F.scaled_dot_product_attention

        def sdpa(q, k, v, *args, **kw):
            if q.shape[-2] == 32:  # attention across a window's 32 frames (DINOv2's runs over a frame's patches)
                self.shapes.add(("sdpa", tuple(q.shape), tuple(k.shape)))
            return real(q, k, v, *args, **kw)

        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)

    def take(self) -> set[tuple]:
        got, self.shapes = self.shapes, set()
        return got


@pytest.fixture
def runner():
    # 4 windows per forward, as on a GPU (the CPU default is 1)
    return VDARunner(
        encoder="vits", device="cpu", dtype="fp32", input_size=28, allow_random_weights=True, windows_per_batch=4
    )


def _videos(lengths, h=36, w=64):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for t in lengths]


def test_after_warm_up_no_call_meets_a_new_shape(runner, monkeypatch):
    log = ShapeLog(runner.model, monkeypatch)
    spent = runner.warm_for(_videos([3]))
    warmed = log.take()
    assert spent > 0 and warmed
    lengths = [1, 5, 33, 54, 75, 97, 121]  # 1 to 6 windows: forwards of 1 to 4 windows, 1 to 98 frames
    for t in lengths:  # one video per call
        runner.predict(_videos([t]))
    runner.predict(_videos(lengths[:3]))  # several scenes in one call: windows of different videos share passes
    runner.predict(_videos(lengths[3:5]))
    new = log.take() - warmed
    assert not new, f"shapes met after the warm-up: {sorted(new)[:5]}"


def test_warm_up_once_per_network_size(runner, monkeypatch):
    assert runner.warm_for(_videos([4])) > 0
    assert runner.warm_for(_videos([50, 7])) == 0.0  # same frame size: nothing to do
    assert runner.warm_for(_videos([4], h=64, w=36)) > 0  # portrait: another network size


def test_a_second_size_meets_no_new_shape_after_its_warm_up(runner, monkeypatch):
    log = ShapeLog(runner.model, monkeypatch)
    runner.warm_for(_videos([2]) + _videos([2], h=48, w=48))
    warmed = log.take()
    runner.predict(_videos([60, 9]) + _videos([45], h=48, w=48))
    assert not (log.take() - warmed)
