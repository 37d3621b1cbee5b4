"""gsplat (CUDA) rasteriser with the same signature as :func:`training.render_torch.rasterize`,
the renderer dispatch used by the model, and a gsplat-vs-reference comparison."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from training import render_torch


def gsplat_available() -> bool:
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


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
    background=None,
    eps2d: float = 0.3,
    near: float = 0.01,
    **_,
):
    """gsplat.rasterization in "RGB+D" mode -> rgb (C,H,W,3), accumulated depth (C,H,W), alpha (C,H,W)."""
    try:
        from gsplat import rasterization
    except ImportError as e:  # pragma: no cover - depends on the box
        raise ImportError("renderer 'gsplat' needs the gsplat package (CUDA); use runtime.renderer: torch") from e
    bg = None
    if background is not None:
        bg = background.to(means).expand(viewmats.shape[0], 3)
    # gsplat needs the colour and depth of a Gaussian in one float32 tensor
    colours_in = colours.float()
    out, alphas, _ = rasterization(
        means.float(),
        quats.float(),
        scales.float(),
        opacities.float(),
        colours_in,
        viewmats.float(),
        Ks.float(),
        width,
        height,
        near_plane=near,
        eps2d=eps2d,
        render_mode="RGB+D",
        backgrounds=bg,
        packed=False,
    )
    return out[..., :3], out[..., 3], alphas[..., 0]


def _import_backend() -> None:
    from gsplat.cuda._backend import _C  # noqa: F401 - importing it is what builds/loads the extension


def build_backend_once(rank: int, local_rank: int, barrier: Callable[[], None], import_backend=_import_backend) -> None:
    """Build gsplat's CUDA extension once per cache before any other process loads it.

    gsplat JIT-compiles its extension on first import, and when no finished ``gsplat_cuda.so`` is in
    the build directory its loader deletes that directory and starts over: processes importing it at
    once into one cache delete each other's build (2 H200s, bench/RESULTS.md §4c: every rank failed
    with ``ImportError: .../gsplat_cuda.so: cannot open shared object file``). The cache is per node
    (``~/.cache/torch_extensions``), or one for every node when home directories are shared. So: rank 0
    imports first; then the first rank of every other node (it builds its node's cache, or loads the
    shared one that rank 0 built); then everyone else. Each step starts after a barrier.
    """
    if rank == 0:
        import_backend()
    barrier()
    if local_rank == 0 and rank != 0:
        import_backend()
    barrier()
    if local_rank != 0:
        import_backend()


def get_rasterizer(name: str):
    """'torch' | 'gsplat' | 'auto' (gsplat when importable and CUDA is up, else the reference)."""
    if name == "torch":
        return render_torch.rasterize
    if name == "gsplat":
        return rasterize
    return rasterize if gsplat_available() else render_torch.rasterize


def random_scene(n: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.6, 0.6, 0.3]) + torch.tensor([0.0, 0.0, 3.0])
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.rand(n, 3, generator=g) * 0.05 + 0.01
    opac = torch.rand(n, generator=g) * 0.8 + 0.1
    cols = torch.rand(n, 3, generator=g)
    return [x.to(device) for x in (means, quats, scales, opac, cols)]


def compare(n: int = 2000, size: int = 64, device: str = "cuda", repeats: int = 5) -> dict:
    """Render one random scene with gsplat and the reference; report max/mean abs error and times."""
    means, quats, scales, opac, cols = random_scene(n, device)
    view = torch.eye(4, device=device)[None]
    f = size * 1.2
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]], device=device)[None]
    res = {"gaussians": n, "size": size}
    outs = {}
    for name, fn in (("reference", render_torch.rasterize), ("gsplat", rasterize)):
        fn(means, quats, scales, opac, cols, view, K, size, size)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn(means, quats, scales, opac, cols, view, K, size, size)
        if device == "cuda":
            torch.cuda.synchronize()
        res[f"{name}_ms"] = (time.perf_counter() - t0) / repeats * 1e3
        outs[name] = out
    (r1, d1, a1), (r2, d2, a2) = outs["reference"], outs["gsplat"]
    res["rgb_max_abs"] = float((r1 - r2).abs().max())
    res["rgb_mean_abs"] = float((r1 - r2).abs().mean())
    res["alpha_max_abs"] = float((a1 - a2).abs().max())
    res["depth_mean_abs"] = float((d1 - d2).abs().mean())
    return res
