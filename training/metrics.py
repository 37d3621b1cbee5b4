"""Quality measures of a model's renders, depth and motion against a clip's ground truth.

* ``psnr``: 10 log10(1 / MSE) of RGB in [0, 1], per image, then averaged.
* ``ssim``: structural similarity (Gaussian window 11, sigma 1.5, data range 1), torchmetrics'
  implementation (Wang et al. 2004), per image then averaged.
* ``lpips``: the perceptual distance of the ``lpips`` package (:class:`training.losses.LPIPSLoss`); it
  needs ImageNet backbone weights that cannot be downloaded here, so it is ``None`` (JSON null) unless a
  directory holding them is given (:func:`load_lpips` says why it is absent).
* depth, over the pixels where the clip's depth is valid: ``depth_abs_rel`` = mean |d - d*| / d* and
  ``depth_delta_1_25`` = the fraction with max(d / d*, d* / d) < 1.25. No scale is fitted: the model
  predicts metric depth and the data is metric. ``d`` is the rendered expected depth (depth / alpha),
  so a pixel the Gaussians do not cover counts as depth ~0 (AbsRel 1 there), not as missing.
  ``depth_abs_rel_scaled`` is AbsRel after scaling the prediction by median(d*) / median(d) (the usual
  median scaling of monocular depth evaluation): a diagnostic separating the depth's shape from its
  metric scale, which the scale-free geometric loss (Pearson correlation) does not teach.
* ``track_epe_m``: mean Euclidean distance in metres between the deformed Gaussians that correspond to
  the clip's 3D tracks (:func:`training.gaussians.track_positions`) and the tracks, over visible entries.
"""

from __future__ import annotations

import torch

# Which way is better, per validation measure (best-checkpoint selection, report plots).
HIGHER_IS_BETTER = {
    "psnr": True,
    "ssim": True,
    "lpips": False,
    "depth_abs_rel": False,
    "depth_abs_rel_scaled": False,
    "depth_delta_1_25": True,
    "track_epe_m": False,
}


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,H,W,3) in [0,1] -> (N,) dB."""
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,H,W,3) in [0,1] -> (N,) structural similarity."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a = pred.float().clamp(0, 1).permute(0, 3, 1, 2)
    b = target.float().permute(0, 3, 1, 2)
    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")


def depth_errors(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[float, float, float, int]:
    """(abs_rel, delta_1_25, median-scaled abs_rel, pixel count) over ``valid`` pixels (target > 0 there)."""
    m = valid & (target > 0)
    n = int(m.sum())
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    p, t = pred.float()[m].clamp_min(1e-6), target.float()[m]
    abs_rel = float(((p - t).abs() / t).mean())
    delta = float((torch.maximum(p / t, t / p) < 1.25).float().mean())
    ps = p * (t.median() / p.median())
    return abs_rel, delta, float(((ps - t).abs() / t).mean()), n


def track_epe(pred: torch.Tensor, tracks: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(mean end-point error in metres, entries) over ``mask`` of (T,N,3) positions."""
    n = int(mask.sum())
    if n == 0:
        return float("nan"), 0
    return float((pred - tracks)[mask].norm(dim=-1).mean()), n


def load_lpips(net: str = "vgg", torch_home: str | None = None, device: torch.device | str = "cpu"):
    """(LPIPS module, None) when the package and its backbone weights are there, else (None, why not).

    Nothing is downloaded: the ``lpips`` package and torchvision must be installed and the ImageNet
    backbone checkpoint be in ``<torch_home>/hub/checkpoints/`` (torch's hub cache by default).
    """
    import importlib.util
    import os

    from training.losses import _LPIPS_BACKBONE_FILES, LPIPSLoss

    for pkg in ("torchvision", "lpips"):
        if importlib.util.find_spec(pkg) is None:
            return None, (
                f"LPIPS not measured: the {pkg} package is missing (pip install --no-deps lpips beside a "
                "torchvision built for your torch)"
            )
    hub = os.path.join(torch_home, "hub") if torch_home else torch.hub.get_dir()
    ckpt = os.path.join(hub, "checkpoints", _LPIPS_BACKBONE_FILES[net])
    if not os.path.exists(ckpt):
        return None, f"LPIPS not measured: no '{net}' backbone weights at {ckpt} (nothing is downloaded)"
    try:
        return LPIPSLoss(net, torch_home).to(device).eval(), None
    except RuntimeError as exc:
        return None, f"LPIPS not measured: {exc}"
