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
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """wxyz quaternions (..., 4) (normalised here) -> rotation matrices (..., 3, 3)."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(q.shape[:-1] + (3, 3))


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
        births = self.birth.tolist()  # on the host: indexing by views uploads no index tensor (no sync)
        o, d = camera_rays(
            torch.stack([self.intrinsics[:, i] for i in births], 1),
            torch.stack([self.c2w[:, i] for i in births], 1),
            h,
            w,
        )
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
    dq = F.normalize(torch.cat([d[..., 3:4] + 1.0, d[..., 4:7]], -1), dim=-1)  # (1,0,0,0) + d_rot, no host tensor
    return means + d[..., 0:3], F.normalize(quat_multiply(dq, quats), dim=-1), scales * torch.exp(d[..., 7:10])


@dataclass
class SampleMaps:
    """One sample's maps, taken out of the batch once (:func:`sample_maps`) for all its rendered frames."""

    means: torch.Tensor  # (S,H,W,3)
    quat: torch.Tensor  # (S,H,W,4)
    scale: torch.Tensor  # (S,H,W,3)
    opacity: torch.Tensor  # (S,H,W)
    colour: torch.Tensor  # (S,H,W,3)
    by_time: tuple[torch.Tensor, ...] | None  # T x (S,H,W,K_D) raw deformation at each time, or None
    raw_birth: torch.Tensor | None  # (S,H,W,K_D) raw deformation of each birth frame at its own time


def sample_maps(maps: GaussianMaps, b: int) -> SampleMaps:
    """Sample ``b``'s maps, sliced once.

    Why once: every slice of an autograd tensor costs, in the backward, a zero tensor of the sliced
    tensor's full size plus an add into its gradient. The deformation (S,H,W,T,K_D) is the step's largest
    tensor (~7 GB at 49 x 512²); sliced per rendered frame and per birth frame it made the backward write
    it ~16 times per rendered frame (96 ms of fills and 261 ms of adds per step on an H200). ``unbind``
    hands out all its time slices at once and its backward writes the full gradient once."""
    by_time = raw_birth = None
    if maps.deform is not None:
        by_time = maps.deform[b].unbind(-2)
        # birth indices come from the host (GaussianMaps.birth stays on the CPU): no device read
        raw_birth = torch.stack([by_time[int(s)][i] for i, s in enumerate(maps.birth.tolist())])
    return SampleMaps(maps.means[b], maps.quat[b], maps.scale[b], maps.opacity[b], maps.colour[b], by_time, raw_birth)


def gaussians_at(
    maps: GaussianMaps,
    b: int,
    tau: int,
    prune_opacity: float = 0.005,
    drop: bool = True,
    sample: SampleMaps | None = None,
) -> Gaussians:
    """Sample ``b``'s Gaussians (all birth frames) deformed to time ``tau`` and pruned.

    ``drop=False`` (training) keeps every Gaussian and sets the opacity of the pruned ones to 0 instead of
    removing them: renders and gradients are the same (a zero-opacity Gaussian contributes nothing, and
    gsplat culls opacities below 1/255 before tiling), but no host-device sync is needed to learn how
    many remain (:func:`prune` does one). ``sample``: ``sample_maps(maps, b)``, made once by a caller that
    renders several frames of the sample (training: see :func:`sample_maps` for why).
    """
    sm = sample if sample is not None else sample_maps(maps, b)
    means, quats, scales = sm.means, sm.quat, sm.scale
    if sm.by_time is not None:
        means, quats, scales = apply_deformation(means, quats, scales, sm.by_time[tau], sm.raw_birth)
    g = Gaussians(
        means.reshape(-1, 3),
        quats.reshape(-1, 4),
        scales.reshape(-1, 3),
        sm.opacity.reshape(-1),
        sm.colour.reshape(-1, 3),
    )
    if drop:
        return prune(g, prune_opacity)
    opac = torch.where(g.opacities >= prune_opacity, g.opacities, torch.zeros_like(g.opacities))
    return Gaussians(g.means, g.quats, g.scales, opac, g.colours)


def kept(g: Gaussians, prune_opacity: float) -> torch.Tensor:
    """How many of ``g``'s Gaussians survive pruning, as a tensor on their device (no sync)."""
    return (g.opacities >= prune_opacity).sum()


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
    out = F.grid_sample(
        x.float().permute(2, 0, 1)[None],
        grid.float()[None, None],
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return out[0, :, 0].T


def track_positions(maps: GaussianMaps, b: int, tracks: torch.Tensor, visible: torch.Tensor):
    """Positions over time of the Gaussians that correspond to sample ``b``'s tracks.

    Correspondence: a track is assigned to the first birth frame ``s`` at which it is visible and its
    world point projects in front of camera ``s`` and inside the image; the per-pixel maps of birth frame
    ``s`` (depth, deformation) are sampled bilinearly at that pixel. That pixel-aligned Gaussian, deformed
    to every time step, is compared with the track. Returns (pred (T,N,3), mask (T,N)): ``mask`` is the
    track's visibility and excludes tracks with no such birth frame.

    Every birth frame is tried for every track at once (projections of S x N points, S x N bilinear
    samples of the maps) and the first that qualifies is picked, so nothing depends on values read back
    to the host: no device syncs.
    """
    t_count, n = tracks.shape[:2]
    h, w = maps.depth.shape[-2:]
    birth = maps.birth.tolist()  # host list (GaussianMaps.birth stays on the CPU)
    s_count = len(birth)
    at_birth = lambda x: torch.stack([x[s] for s in birth])  # views: no index tensor to upload
    intr, c2w = at_birth(maps.intrinsics[b]), at_birth(maps.c2w[b])  # (S,4), (S,4,4)
    w2c = torch.linalg.inv_ex(c2w)[0]  # inv_ex: no error check, which would read the device
    cam = at_birth(tracks) @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]  # (S,N,3)
    z = cam[..., 2].clamp_min(1e-6)
    fx, fy, cx, cy = (intr[:, i, None] for i in range(4))
    uv = torch.stack([fx * cam[..., 0] / z + cx, fy * cam[..., 1] / z + cy], -1)  # (S,N,2)
    ok = (
        at_birth(visible)
        & (cam[..., 2] > 1e-3)
        & (uv[..., 0] >= 0)
        & (uv[..., 0] <= w)
        & (uv[..., 1] >= 0)
        & (uv[..., 1] <= h)
    )  # (S,N)
    assigned = ok.any(0)
    first = ok.to(torch.uint8).argmax(0)  # the first qualifying birth frame (0 where none)
    grid = torch.stack([uv[..., 0] / w * 2 - 1, uv[..., 1] / h * 2 - 1], -1).float()[:, None]  # (S,1,N,2)

    def pick(x):  # (S, ...) -> (...): every track's entry of its own birth frame
        idx = first.view(1, *([1] * (x.dim() - 2)), n).expand(1, *x.shape[1:])
        return x.gather(0, idx)[0]

    def sample(x):  # maps x (S,C,H,W) -> (S,C,N): every birth frame's map at every track's pixel there
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]

    depth = pick(sample(maps.depth[b][:, None]))[0]  # (N,)
    uv_s, c2w_s, intr_s = pick(uv.transpose(1, 2)).T, c2w[first], intr[first]
    ray = torch.stack(
        [
            (uv_s[:, 0] - intr_s[:, 2]) / intr_s[:, 0],
            (uv_s[:, 1] - intr_s[:, 3]) / intr_s[:, 1],
            torch.ones_like(uv_s[:, 0]),
        ],
        -1,
    )
    mean = c2w_s[:, :3, 3] + ((ray * depth[:, None])[:, None, :] @ c2w_s[:, :3, :3].transpose(1, 2))[:, 0]
    if maps.deform is not None:
        raw = maps.deform[b]  # (S,H,W,T,K); a view of the LDRM's (S,T,K,H,W) output: sampled without a copy
        tt, kk = raw.shape[-2:]
        raw_s = sample(raw.permute(0, 3, 4, 1, 2).reshape(s_count, tt * kk, h, w)).reshape(s_count, tt, kk, n)
        # displacement from each birth frame's own time: raw[tau] - raw[s]
        disp = torch.stack([raw_s[i, :, 0:3] - raw_s[i, s : s + 1, 0:3] for i, s in enumerate(birth)])  # (S,T,3,N)
        pos = mean[:, None] + pick(disp).permute(2, 0, 1)  # (N,T,3)
    else:
        pos = mean[:, None].expand(n, t_count, 3)
    pred = torch.where(assigned[:, None, None], pos, torch.zeros_like(pos)).transpose(0, 1)
    return pred, visible & assigned[None]
