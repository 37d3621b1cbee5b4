"""Camera rays and Plücker ray maps (torch), in the d4s convention (OpenCV c2w, pixel fx fy cx cy).

Pixel (i, j) has its centre at u = j + 0.5, v = i + 0.5 (:func:`pipeline.geometry.pixel_grid`).
"""

from __future__ import annotations

import torch


def pixel_centres(h: int, w: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    v, u = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype) + 0.5,
        torch.arange(w, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    return u, v


def camera_rays(intrinsics: torch.Tensor, c2w: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel ray origins and directions in world space.

    intrinsics (..., 4), c2w (..., 4, 4) -> origins (..., H, W, 3), dirs (..., H, W, 3) where ``dirs`` has
    unit *z in camera space* (so ``origin + z_depth * dir`` is the point at z-depth ``z_depth``).
    """
    u, v = pixel_centres(h, w, intrinsics.device, intrinsics.dtype)
    fx, fy, cx, cy = (intrinsics[..., i, None, None] for i in range(4))
    cam = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u).expand_as((u - cx) / fx)], dim=-1)
    rot = c2w[..., None, None, :3, :3]
    dirs = (rot @ cam[..., None]).squeeze(-1)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def plucker_rays(intrinsics: torch.Tensor, c2w: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Plücker ray map (..., 6, H, W): (o x d, d) with d the unit world ray direction."""
    o, d = camera_rays(intrinsics, c2w, h, w)
    d = d / d.norm(dim=-1, keepdim=True)
    m = torch.cross(o, d, dim=-1)
    return torch.cat([m, d], dim=-1).movedim(-1, -3)


def scale_intrinsics(intrinsics: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Intrinsics for an image resized by (sx, sy) (pixel-centre convention keeps cx*sx exact)."""
    return intrinsics * intrinsics.new_tensor([sx, sy, sx, sy])
