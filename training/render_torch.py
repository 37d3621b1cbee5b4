"""Reference differentiable Gaussian splatting rasteriser in pure PyTorch (small images, CPU tests).

Same model as gsplat's default rasteriser so the two can be compared:

* EWA projection: Sigma2D = J W Sigma3D W^T J^T + eps2d * I (``eps2d`` = 0.3 px^2 low-pass, as gsplat),
  with J the perspective Jacobian at the Gaussian's mean; Gaussians with z <= near are dropped.
* Pixel centres at (j + 0.5, i + 0.5) (the d4s convention, also gsplat's).
* alpha = min(0.999, opacity * exp(-0.5 * d^T Sigma2D^-1 d)); contributions with alpha < 1/255 are skipped.
* Front-to-back compositing in order of camera z: C = sum_i c_i a_i T_i + T_final * background.
* Depth: accumulated z (sum_i z_i a_i T_i) and alpha; expected depth = accumulated / alpha.

Differences from gsplat: no tile culling or 3-sigma radius cut-off, no early termination at
transmittance 1e-4, no Jacobian clamping for Gaussians far outside the frustum — all negligible for
on-screen content (measured by ``bench/bench_train.py``). Cost is O(cameras x Gaussians x pixels): meant
for images up to ~64x64; pixels are processed in chunks to bound memory.
"""

from __future__ import annotations

import torch

from training.gaussians import quat_to_matrix


def project_gaussians(means, quats, scales, viewmat, K, eps2d: float = 0.3, near: float = 0.01):
    """World Gaussians -> (mean2d (N,2), conic inverse cov (N,2,2), z (N,), valid (N,)) for one camera."""
    r, t = viewmat[:3, :3], viewmat[:3, 3]
    cam = means @ r.T + t
    x, y, z = cam.unbind(-1)
    valid = z > near
    zs = torch.where(valid, z, torch.ones_like(z))
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    mean2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], dim=-1)
    rot = quat_to_matrix(quats)
    m = rot * scales[:, None, :]
    cov3 = m @ m.transpose(1, 2)
    zero = torch.zeros_like(zs)
    j = torch.stack(
        [
            torch.stack([fx / zs, zero, -fx * x / zs**2], -1),
            torch.stack([zero, fy / zs, -fy * y / zs**2], -1),
        ],
        dim=1,
    )  # (N,2,3)
    jw = j @ r
    cov2 = jw @ cov3 @ jw.transpose(1, 2) + eps2d * torch.eye(2, dtype=means.dtype, device=means.device)
    a, b, c = cov2[:, 0, 0], cov2[:, 0, 1], cov2[:, 1, 1]
    det = (a * c - b * b).clamp_min(1e-12)
    conic = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], 1) / det[:, None, None]
    return mean2d, conic, z, valid


def rasterize(
    means,
    quats,
    scales,
    opacities,
    colours,
    viewmats,
    Ks,
    width: int,
    height: int,
    background: torch.Tensor | None = None,
    eps2d: float = 0.3,
    near: float = 0.01,
    chunk_elems: int = 1 << 22,
):
    """Render C cameras. viewmats (C,4,4) world-to-camera, Ks (C,3,3).

    Returns rgb (C,H,W,3), accumulated depth (C,H,W), alpha (C,H,W).
    """
    dev, dt = means.device, means.dtype
    bg = torch.zeros(3, device=dev, dtype=dt) if background is None else background.to(dev, dt)
    v, u = torch.meshgrid(
        torch.arange(height, device=dev, dtype=dt) + 0.5, torch.arange(width, device=dev, dtype=dt) + 0.5, indexing="ij"
    )
    pix = torch.stack([u.reshape(-1), v.reshape(-1)], -1)  # (P,2)
    out_rgb, out_d, out_a = [], [], []
    for ci in range(viewmats.shape[0]):
        mean2d, conic, z, valid = project_gaussians(means, quats, scales, viewmats[ci], Ks[ci], eps2d, near)
        order = torch.argsort(torch.where(valid, z, torch.full_like(z, float("inf"))))
        order = order[valid[order]]
        m2, cn, zz = mean2d[order], conic[order], z[order]
        op, col = opacities[order], colours[order]
        n = m2.shape[0]
        rgbs, ds, als = [], [], []
        step = max(1, chunk_elems // max(n, 1))
        for p0 in range(0, pix.shape[0], step):
            p = pix[p0 : p0 + step]
            if n == 0:
                rgbs.append(bg.expand(p.shape[0], 3))
                ds.append(p.new_zeros(p.shape[0]))
                als.append(p.new_zeros(p.shape[0]))
                continue
            d = p[None, :, :] - m2[:, None, :]  # (N,P,2)
            sigma = (
                0.5 * (cn[:, None, 0, 0] * d[..., 0] ** 2 + cn[:, None, 1, 1] * d[..., 1] ** 2)
                + cn[:, None, 0, 1] * d[..., 0] * d[..., 1]
            )
            alpha = (op[:, None] * torch.exp(-sigma)).clamp(max=0.999)
            alpha = torch.where((sigma >= 0) & (alpha >= 1.0 / 255.0), alpha, torch.zeros_like(alpha))
            trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:1]), 1 - alpha], 0), 0)  # (N+1,P)
            w = alpha * trans[:-1]
            rgbs.append(w.T @ col + trans[-1][:, None] * bg)
            ds.append(w.T @ zz)
            als.append(w.sum(0))
        out_rgb.append(torch.cat(rgbs).reshape(height, width, 3))
        out_d.append(torch.cat(ds).reshape(height, width))
        out_a.append(torch.cat(als).reshape(height, width))
    return torch.stack(out_rgb), torch.stack(out_d), torch.stack(out_a)
