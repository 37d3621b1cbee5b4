"""Pixel-aligned 3D Gaussians, their per-time-step deformation, and opacity pruning.

Conventions (training tensors): quaternions are **w x y z** (gsplat's order; the numpy helpers in
:mod:`pipeline.geometry` use x y z w), positions in world metres, colours RGB in [0, 1].

Where Gaussians come from: the LDRM decoder predicts, for every pixel of every *birth frame*
``s`` (frames 0, stride, 2*stride, ... and the last), one Gaussian whose centre lies on the pixel's
camera ray at the predicted z-depth, plus a deformation map with ``T x K_d`` channels: for each
time step ``tau`` a raw deformation (displacement 3, rotation change 4, scale change 3; K_d = 10).
The deformation applied at ``tau`` is ``raw[tau] - raw[s]``, so a Gaussian sits exactly at its
predicted pixel-aligned position at its own birth time. At time ``tau``:

    mean  = mean_s + d_xyz,  quat = normalise(dq (x) q_s) with dq = normalise((1,0,0,0) + d_rot),
    scale = scale_s * exp(d_scale)

Pruning drops Gaussians with opacity below ``tau_prune`` (0.005) before rendering.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.plucker import camera_rays

K_D = 10


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of wxyz quaternions (..., 4)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """wxyz quaternions (..., 4) (normalised here) -> rotation matrices (..., 3, 3)."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(q.shape[:-1] + (3, 3))


@dataclass
class GaussianMaps:
    """Decoder output for a batch, at the birth frames (already activated).

    depth (B,S,H,W) z-depth metres; scale (B,S,H,W,3) metres; quat (B,S,H,W,4) wxyz unit;
    opacity (B,S,H,W); colour (B,S,H,W,3); deform (B,S,H,W,T,K_D) raw or None (frozen / static);
    birth (S,) long frame indices; intrinsics (B,T,4) and c2w (B,T,4,4) of the target resolution.
    """

    depth: torch.Tensor
    scale: torch.Tensor
    quat: torch.Tensor
    opacity: torch.Tensor
    colour: torch.Tensor
    deform: torch.Tensor | None
    birth: torch.Tensor
    intrinsics: torch.Tensor
    c2w: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        """(B,S,H,W,3) pixel-aligned centres at birth time."""
        b, s, h, w = self.depth.shape
        idx = self.birth.to(self.c2w.device)
        o, d = camera_rays(self.intrinsics[:, idx], self.c2w[:, idx], h, w)
        return o + self.depth[..., None] * d


@dataclass
class Gaussians:
    """One sample's flat Gaussian set at one time step (what a renderer consumes)."""

    means: torch.Tensor  # (N,3)
    quats: torch.Tensor  # (N,4) wxyz
    scales: torch.Tensor  # (N,3)
    opacities: torch.Tensor  # (N,)
    colours: torch.Tensor  # (N,3)

    def __len__(self) -> int:
        return int(self.means.shape[0])


def apply_deformation(means, quats, scales, raw_tau, raw_birth):
    """Deform Gaussians with raw deformations at time tau and at their birth time (..., K_D)."""
    d = raw_tau - raw_birth
    dq = F.normalize(d[..., 3:7] + d.new_tensor([1.0, 0.0, 0.0, 0.0]), dim=-1)
    return means + d[..., 0:3], F.normalize(quat_multiply(dq, quats), dim=-1), scales * torch.exp(d[..., 7:10])


def gaussians_at(maps: GaussianMaps, b: int, tau: int, prune_opacity: float = 0.005) -> Gaussians:
    """Sample ``b``'s Gaussians (all birth frames) deformed to time ``tau`` and pruned."""
    means = maps.means[b]  # (S,H,W,3)
    quats, scales = maps.quat[b], maps.scale[b]
    if maps.deform is not None:
        raw = maps.deform[b]  # (S,H,W,T,K)
        s_idx = maps.birth.to(raw.device)
        raw_tau = raw[..., tau, :]
        raw_birth = torch.stack([raw[i, :, :, int(s_idx[i]), :] for i in range(raw.shape[0])])
        means, quats, scales = apply_deformation(means, quats, scales, raw_tau, raw_birth)
    g = Gaussians(means.reshape(-1, 3), quats.reshape(-1, 4), scales.reshape(-1, 3),
                  maps.opacity[b].reshape(-1), maps.colour[b].reshape(-1, 3))
    return prune(g, prune_opacity)


def prune(g: Gaussians, tau: float) -> Gaussians:
    keep = g.opacities >= tau
    if bool(keep.all()):
        return g
    return Gaussians(g.means[keep], g.quats[keep], g.scales[keep], g.opacities[keep], g.colours[keep])


def sample_maps_at_pixels(x: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample per-pixel maps x (H,W,C) at pixel coordinates uv (N,2) -> (N,C)."""
    h, w = x.shape[:2]
    grid = torch.stack([uv[:, 0] / w * 2 - 1, uv[:, 1] / h * 2 - 1], dim=-1)  # align_corners=False
    # Sample in float32: under bf16 autocast the maps may be bf16 while track pixels stay float32,
    # and grid_sample needs one dtype (found on the GPU run, bench/RESULTS.md).
    out = F.grid_sample(x.float().permute(2, 0, 1)[None], grid.float()[None, None], mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, :, 0].T


def track_positions(maps: GaussianMaps, b: int, tracks: torch.Tensor, visible: torch.Tensor):
    """Positions over time of the Gaussians that correspond to sample ``b``'s tracks.

    Correspondence: a track is assigned to the first birth frame ``s`` at which it is visible; its
    world point at ``s`` is projected into camera ``s`` and the per-pixel maps of birth frame ``s``
    (depth, deformation) are sampled bilinearly at that pixel. That pixel-aligned Gaussian, deformed
    to every time step, is compared with the track. Returns (pred (T,N,3), mask (T,N)): ``mask`` is
    the track's visibility and excludes tracks with no visible birth frame or off-image projections.
    """
    t_count, n = tracks.shape[:2]
    h, w = maps.depth.shape[-2:]
    birth = [int(s) for s in maps.birth]
    pred = tracks.new_zeros(t_count, n, 3)
    assigned = torch.zeros(n, dtype=torch.bool, device=tracks.device)
    intr, c2w = maps.intrinsics[b], maps.c2w[b]
    for si, s in enumerate(birth):
        sel = visible[s] & ~assigned
        if not bool(sel.any()):
            continue
        p = tracks[s, sel]
        w2c = torch.linalg.inv(c2w[s])
        cam = p @ w2c[:3, :3].T + w2c[:3, 3]
        z = cam[:, 2].clamp_min(1e-6)
        uv = torch.stack([intr[s, 0] * cam[:, 0] / z + intr[s, 2], intr[s, 1] * cam[:, 1] / z + intr[s, 3]], -1)
        inside = (cam[:, 2] > 1e-3) & (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
        idx = sel.nonzero().squeeze(1)[inside]
        uv = uv[inside]
        if idx.numel() == 0:
            continue
        assigned[idx] = True
        depth = sample_maps_at_pixels(maps.depth[b, si][..., None], uv)[:, 0]
        fx, fy, cx, cy = intr[s]
        ray = torch.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy, torch.ones_like(uv[:, 0])], -1)
        mean = c2w[s, :3, 3] + (ray * depth[:, None]) @ c2w[s, :3, :3].T
        if maps.deform is not None:
            raw = maps.deform[b, si]  # (H,W,T,K)
            hh, ww, tt, kk = raw.shape
            raw_s = sample_maps_at_pixels(raw.reshape(hh, ww, tt * kk), uv).reshape(-1, tt, kk)
            disp = raw_s[..., 0:3] - raw_s[:, s:s + 1, 0:3]  # (n,T,3)
            pred[:, idx] = (mean[:, None] + disp).transpose(0, 1)
        else:
            pred[:, idx] = mean[None].expand(t_count, -1, -1)
    return pred, visible & assigned[None]
