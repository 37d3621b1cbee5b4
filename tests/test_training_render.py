"""The reference rasteriser against closed-form renders."""

import math

import torch

from training.render_torch import rasterize


def _cam(size, f):
    return torch.eye(4)[None], torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])[None]


def test_single_isotropic_gaussian_matches_closed_form():
    size, f, z, s, op = 33, 40.0, 4.0, 0.3, 0.8
    col = torch.tensor([0.2, 0.6, 0.9])
    vm, K = _cam(size, f)
    rgb, dep, alp = rasterize(
        torch.tensor([[0.0, 0.0, z]]),
        torch.tensor([[1.0, 0, 0, 0]]),
        torch.full((1, 3), s),
        torch.tensor([op]),
        col[None],
        vm,
        K,
        size,
        size,
        eps2d=0.0,
    )
    sigma = f * s / z  # on the optical axis the EWA Jacobian gives an isotropic 2D std of f*s/z pixels
    v, u = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    g = op * torch.exp(-((u - size / 2) ** 2 + (v - size / 2) ** 2) / (2 * sigma**2))
    g = torch.where(g >= 1 / 255, g, torch.zeros_like(g))  # contributions under 1/255 are skipped
    assert torch.allclose(alp[0], g, atol=1e-5)
    assert torch.allclose(rgb[0], g[..., None] * col, atol=1e-5)
    assert torch.allclose(dep[0], g * z, atol=1e-4)


def test_low_pass_dilation_and_background():
    size, f, z, s, op = 21, 30.0, 3.0, 0.1, 0.5
    vm, K = _cam(size, f)
    bg = torch.tensor([0.1, 0.2, 0.3])
    rgb, _, alp = rasterize(
        torch.tensor([[0.0, 0.0, z]]),
        torch.tensor([[1.0, 0, 0, 0]]),
        torch.full((1, 3), s),
        torch.tensor([op]),
        torch.ones(1, 3),
        vm,
        K,
        size,
        size,
        background=bg,
        eps2d=0.3,
    )
    var = (f * s / z) ** 2 + 0.3
    c = size // 2
    assert math.isclose(float(alp[0, c, c]), op, rel_tol=1e-5)
    expect = op * math.exp(-1.0 / (2 * var))
    assert math.isclose(float(alp[0, c, c + 1]), expect, rel_tol=1e-4)
    assert torch.allclose(rgb[0, 0, 0], bg)  # far corner: background only
    assert torch.allclose(rgb[0, c, c], op * torch.ones(3) + (1 - op) * bg, atol=1e-5)


def test_front_to_back_compositing():
    size, f = 9, 20.0
    vm, K = _cam(size, f)
    means = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 2.0]])  # listed back first: order must come from depth
    cols = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    rgb, dep, alp = rasterize(
        means,
        torch.tensor([[1.0, 0, 0, 0]] * 2),
        torch.full((2, 3), 1.0),
        torch.tensor([0.5, 0.6]),
        cols,
        vm,
        K,
        size,
        size,
        eps2d=0.0,
    )
    c = size // 2
    a_front, a_back = 0.6, 0.5  # huge Gaussians: alpha ~ opacity at the centre pixel
    assert torch.allclose(rgb[0, c, c], torch.tensor([(1 - a_front) * a_back, a_front, 0]), atol=1e-3)
    assert abs(float(alp[0, c, c]) - (a_front + (1 - a_front) * a_back)) < 1e-3
    assert abs(float(dep[0, c, c]) - (a_front * 2 + (1 - a_front) * a_back * 5)) < 1e-2


def test_gradients_flow_to_all_parameters():
    size = 12
    vm, K = _cam(size, 15.0)
    params = [
        torch.tensor([[0.1, -0.1, 3.0]]),
        torch.tensor([[0.9, 0.1, 0.2, 0.0]]),
        torch.full((1, 3), 0.3),
        torch.tensor([0.7]),
        torch.tensor([[0.3, 0.4, 0.5]]),
    ]
    for p in params:
        p.requires_grad_(True)
    rgb, dep, alp = rasterize(*params, vm, K, size, size)
    (rgb.sum() + dep.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
