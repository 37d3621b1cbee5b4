"""Losses: L = L_FM + lambda_photo L_photo + lambda_geo L_geo + lambda_motion L_motion.

* L_FM: rectified-flow matching on the backbone's latents, z_t = (1 - t) z_0 + t eps, target eps - z_0.
* L_photo: MSE + 0.5 LPIPS between rendered and true frames (LPIPS optional, see :class:`LPIPSLoss`).
* L_geo: (1 - Pearson correlation) between rendered and data depth over valid pixels, plus
  ``tv_weight`` x total variation of the rendered depth divided by its mean (scale-free).
* L_motion: L2 + L1 between deformed Gaussian centres and visible 3D tracks (see
  :func:`training.gaussians.track_positions` for the correspondence).
Per-sample weights (clip meta ``loss_weights``) scale each sample's photo / geo / motion terms.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def flow_matching_loss(v_pred: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(v_pred.float(), (noise - z0).float())


def pearson_depth_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """1 - Pearson correlation of ``pred`` and ``target`` over ``valid`` (flattened). Zero for affine relations.

    The mask weights the sums instead of selecting elements, so the value is computed without reading
    the mask back to the host (no device sync); fewer than 2 valid entries give 0.
    """
    p, t = pred.reshape(-1).float(), target.reshape(-1).float()
    m = torch.ones_like(p) if valid is None else valid.reshape(-1).to(p.dtype)
    n = m.sum()
    p = (p - (p * m).sum() / n.clamp_min(1)) * m
    t = (t - (t * m).sum() / n.clamp_min(1)) * m
    r = (p * t).sum() / (p.norm() * t.norm() + eps)
    return torch.where(n >= 2, 1.0 - r, pred.sum() * 0.0)


def tv_loss(depth: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """Mean absolute finite differences of (..., H, W) depth; divided by the mean depth if ``normalise``."""
    d = depth.float()
    if normalise:
        d = d / d.abs().mean().clamp_min(1e-6)
    return (d[..., 1:, :] - d[..., :-1, :]).abs().mean() + (d[..., :, 1:] - d[..., :, :-1]).abs().mean()


def motion_loss(pred: torch.Tensor, tracks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2 + L1 over the masked (visible) entries of (T,N,3) positions (0 when none); a masked mean, so
    nothing is read back to the host."""
    m = mask.to(pred.dtype)
    n = m.sum()
    diff = (pred - tracks) * m[..., None]  # zero where masked out (their norm's gradient is 0, not NaN)
    return (diff.norm(dim=-1).sum() + diff.abs().sum() / 3) / n.clamp_min(1)


_LPIPS_BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a3d0c5.pth",
}


class LPIPSLoss(torch.nn.Module):
    """LPIPS via the ``lpips`` package, never downloading anything.

    ``lpips`` imports torchvision and needs the ImageNet backbone weights in torch's hub cache
    (``<torch_home>/hub/checkpoints/<file>``); both missing is a clear error at construction time.
    Disable with ``loss.lpips_enabled: false``.
    """

    def __init__(self, net: str = "vgg", torch_home: str | None = None):
        super().__init__()
        try:
            import torchvision  # noqa: F401
        except Exception as e:
            raise RuntimeError(
                "LPIPS is enabled but torchvision cannot be imported (lpips needs it); install a torchvision "
                "matching your torch, or set loss.lpips_enabled: false"
            ) from e
        try:
            import lpips
        except Exception as e:
            raise RuntimeError(
                "LPIPS is enabled but the 'lpips' package is missing: pip install lpips, "
                "or set loss.lpips_enabled: false"
            ) from e
        if torch_home:
            torch.hub.set_dir(os.path.join(torch_home, "hub"))
        ckpt = os.path.join(torch.hub.get_dir(), "checkpoints", _LPIPS_BACKBONE_FILES[net])
        if not os.path.exists(ckpt):
            raise RuntimeError(
                f"LPIPS backbone weights not found at {ckpt}; place the torchvision '{net}' "
                "ImageNet checkpoint there (loss.lpips_torch_home) or set loss.lpips_enabled: false"
            )
        self.net = lpips.LPIPS(net=net, pretrained=True, verbose=False).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target (N,H,W,3) in [0,1]."""
        a = pred.permute(0, 3, 1, 2).float() * 2 - 1
        b = target.permute(0, 3, 1, 2).float() * 2 - 1
        return self.net(a, b).mean()


def photo_loss(pred: torch.Tensor, target: torch.Tensor, lpips_fn=None, lpips_weight: float = 0.5) -> torch.Tensor:
    loss = F.mse_loss(pred.float(), target.float())
    if lpips_fn is not None and lpips_weight > 0:
        loss = loss + lpips_weight * lpips_fn(pred, target)
    return loss
