"""Loss and geometry unit tests for training/ (CPU, fast)."""

import numpy as np
import torch

from training import losses as L
from training.gaussians import GaussianMaps, apply_deformation, gaussians_at, quat_multiply, track_positions
from training.plucker import camera_rays, plucker_rays


def test_pearson_zero_for_affine_depth():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(2, 16, 16, generator=g) * 5 + 1
    assert float(L.pearson_depth_loss(3.0 * d + 0.7, d)) < 1e-6
    valid = torch.rand(2, 16, 16, generator=g) > 0.3
    assert float(L.pearson_depth_loss(0.2 * d + 4, d, valid)) < 1e-6
    assert float(L.pearson_depth_loss(torch.rand(2, 16, 16, generator=g), d)) > 0.5
    assert abs(float(L.pearson_depth_loss(-d, d)) - 2.0) < 1e-5


def test_tv_zero_for_constant_and_positive_otherwise():
    assert float(L.tv_loss(torch.full((3, 8, 8), 2.5))) == 0.0
    ramp = torch.arange(8.0).expand(8, 8) + 1
    assert float(L.tv_loss(ramp)) > 0


def test_flow_matching_target():
    z0, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert float(L.flow_matching_loss(eps - z0, z0, eps)) == 0.0


def _maps(seed=0, t=3, h=6, w=8, deform=True):
    g = torch.Generator().manual_seed(seed)
    births = torch.tensor([0, 2])
    s = len(births)
    intr = torch.tensor([[10.0, 10.0, w / 2, h / 2]]).expand(1, t, 4).clone()
    c2w = torch.eye(4).expand(1, t, 4, 4).clone()
    c2w[0, :, 0, 3] = torch.linspace(0, 0.3, t)
    depth = torch.rand(1, s, h, w, generator=g) * 2 + 2
    quat = torch.nn.functional.normalize(torch.randn(1, s, h, w, 4, generator=g), dim=-1)
    raw = torch.randn(1, s, h, w, t, 10, generator=g) * 0.1 if deform else None
    return GaussianMaps(
        depth,
        torch.full((1, s, h, w, 3), 0.05),
        quat,
        torch.full((1, s, h, w), 0.9),
        torch.rand(1, s, h, w, 3, generator=g),
        raw,
        births,
        intr,
        c2w,
    )


def test_motion_loss_zero_when_deformations_match_tracks():
    maps = _maps()
    t, (_h, _w) = 3, maps.depth.shape[-2:]
    means = maps.means[0]  # (S,H,W,3)
    # tracks = the deformed centres of birth-frame-0 Gaussians at some pixels, visible from frame 0
    pix = [(1, 2), (3, 5), (4, 0), (5, 7)]
    tr = torch.stack(
        [
            torch.stack(
                [means[0, i, j] + maps.deform[0, 0, i, j, tau, :3] - maps.deform[0, 0, i, j, 0, :3] for (i, j) in pix]
            )
            for tau in range(t)
        ]
    )
    vis = torch.ones(t, len(pix), dtype=torch.bool)
    pred, mask = track_positions(maps, 0, tr, vis)
    assert bool(mask.all())
    assert float(L.motion_loss(pred, tr, mask)) < 1e-4
    assert float(L.motion_loss(pred, tr + 0.1, mask)) > 0.1
    # tracks first visible at frame 2 (a birth frame) use birth frame 2's maps
    tr2 = torch.stack(
        [means[1, 2, 3] + maps.deform[0, 1, 2, 3, tau, :3] - maps.deform[0, 1, 2, 3, 2, :3] for tau in range(t)]
    )[:, None]
    vis2 = torch.tensor([[False], [True], [True]])
    pred2, mask2 = track_positions(maps, 0, tr2, vis2)
    # frame 1 is no birth frame, so the track is assigned at birth frame 2 and compared wherever visible
    assert mask2.tolist() == [[False], [True], [True]]
    assert float(L.motion_loss(pred2, tr2, mask2)) < 1e-4


def test_deformation_identity_at_birth_and_pruning():
    maps = _maps()
    g_birth = gaussians_at(maps, 0, 0, prune_opacity=0.0)
    n_per = maps.depth[0, 0].numel()
    assert torch.allclose(g_birth.means[:n_per], maps.means[0, 0].reshape(-1, 3), atol=1e-6)
    maps.opacity[0, 0, 0, :4] = 0.001
    assert len(gaussians_at(maps, 0, 1, prune_opacity=0.005)) == 2 * n_per - 4
    q = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    m, qq, s = apply_deformation(torch.zeros(5, 3), q, torch.ones(5, 3), torch.zeros(5, 10), torch.zeros(5, 10))
    assert torch.allclose(qq, q, atol=1e-6) and torch.allclose(s, torch.ones(5, 3))
    ident = torch.tensor([1.0, 0, 0, 0]).expand(5, 4)
    assert torch.allclose(quat_multiply(ident, q), q)


def test_rays_match_pipeline_geometry():
    from pipeline.geometry import look_at_c2w, unproject

    c2w = look_at_c2w(np.array([0.5, -0.2, -2.0]), np.zeros(3))
    intr = np.array([20.0, 22.0, 8.0, 6.0])
    depth = np.full((12, 16), 3.0)
    ref = unproject(depth, intr, c2w)
    o, d = camera_rays(torch.tensor(intr), torch.tensor(c2w), 12, 16)
    assert np.allclose((o + 3.0 * d).numpy(), ref, atol=1e-9)
    pl = plucker_rays(torch.tensor(intr)[None], torch.tensor(c2w)[None], 12, 16)
    assert pl.shape == (1, 6, 12, 16)
    dn = pl[0, 3:].permute(1, 2, 0)
    assert torch.allclose(dn.norm(dim=-1), torch.ones(12, 16, dtype=dn.dtype))
    m = pl[0, :3].permute(1, 2, 0)
    assert torch.allclose((m * dn).sum(-1), torch.zeros(12, 16, dtype=dn.dtype), atol=1e-9)  # m ⟂ d


def test_lpips_disabled_or_clear_error():
    try:
        import torchvision  # noqa: F401

        return  # an environment with torchvision: nothing to check here
    except Exception:
        pass
    import pytest

    with pytest.raises(RuntimeError, match="torchvision"):
        L.LPIPSLoss("vgg")
