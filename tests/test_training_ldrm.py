"""The LDRM knows where each token is (its rays and its grid position) and keeps its Gaussian and
deformation maps in float32 under bf16 autocast."""

import pytest
import torch

from training.config import make_config
from training.ldrm import LDRM
from training.plucker import plucker_rays

RES, T = 24, 5  # tiny preset: fs 2, ft 2, LDRM patch 2 -> a 6 x 6 token grid per latent frame, 3 latent frames


def _setup(seed=0):
    cfg = make_config("tiny", ldrm={"dim": 64})
    torch.manual_seed(seed)
    ldrm = LDRM(cfg.ldrm, latent_channels=4, fs=2, ft=2, max_frames=T).eval()
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(1, 3, 4, RES // 2, RES // 2, generator=g)
    intr = torch.tensor([[20.0, 20.0, RES / 2, RES / 2]]).expand(1, T, 4).clone()
    c2w = torch.eye(4).expand(1, T, 4, 4).clone()
    c2w[0, :, 0, 3] = torch.linspace(0.0, 0.4, T)
    c2w[0, :, 2, 3] = torch.linspace(0.0, 0.2, T)
    pl = plucker_rays(intr, c2w, RES, RES)[:, [0, 2, 4]]  # one map per latent frame is enough here
    return ldrm, z, pl, intr, c2w


def _run(ldrm, z, pl, intr, c2w):
    with torch.no_grad():
        return ldrm(z, pl, intr, c2w, T, with_deformation=True)


def _swap_latent_patch(x, f, a, b, size):
    """Swap the (size x size) blocks at grid cells a and b of latent frame f (last two dims)."""
    x = x.clone()
    (ya, xa), (yb, xb) = a, b
    pa = x[:, f, ..., ya * size : (ya + 1) * size, xa * size : (xa + 1) * size].clone()
    x[:, f, ..., ya * size : (ya + 1) * size, xa * size : (xa + 1) * size] = x[
        :, f, ..., yb * size : (yb + 1) * size, xb * size : (xb + 1) * size
    ]
    x[:, f, ..., yb * size : (yb + 1) * size, xb * size : (xb + 1) * size] = pa
    return x


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_output_at_a_patch_depends_on_that_patches_rays():
    """Swapping the rays of two patches must change the prediction there: a token relates to its own ray."""
    ldrm, z, pl, intr, c2w = _setup()
    ref = _run(ldrm, z, pl, intr, c2w)
    # latent frame 0 -> birth frame 0 (the first ft - 1 deconvolved frames are dropped)
    swapped = _run(ldrm, z, _swap_latent_patch(pl, 0, (0, 0), (4, 5), 4), intr, c2w)
    assert _rel(swapped.depth[:, 0, 0:4, 0:4], ref.depth[:, 0, 0:4, 0:4]) > 1e-3
    # only the rays changed: the latent content at both patches is the same, so this is the rays' doing
    more = _run(ldrm, z, pl.clone().index_fill_(3, torch.arange(0, 4), 0.0), intr, c2w)
    assert _rel(more.depth[:, 0, 0:4], ref.depth[:, 0, 0:4]) > 1e-3


def test_not_permutation_equivariant_over_patches():
    """Swapping two latent patches must not merely swap their outputs: tokens carry their position."""
    ldrm, z, pl, intr, c2w = _setup()
    ref = _run(ldrm, z, pl, intr, c2w)
    out = _run(ldrm, _swap_latent_patch(z, 0, (1, 1), (3, 4), 2), pl, intr, c2w)
    # the prediction at pixel block (1,1) of frame 0 compared with the reference's at block (3,4)
    a = out.depth[:, 0, 4:8, 4:8]
    b = ref.depth[:, 0, 12:16, 16:20]
    assert _rel(a, b) > 1e-3


def test_maps_float32_under_bf16_autocast():
    """The last layers (Gaussian maps, deformation head) run in float32 even inside bf16 autocast, so
    ``raw[t] - raw[birth]`` is a float32 difference."""
    ldrm, z, pl, intr, c2w = _setup()
    seen = {}

    def hook(name):
        def f(mod, args, out):
            seen[name] = (args[0], out)

        return f

    ldrm.deconv.register_forward_hook(hook("deconv"))
    ldrm.deform_head.register_forward_hook(hook("head"))
    torch.nn.init.normal_(ldrm.deform_head.weight, std=0.5)  # zero-initialised: make its output non-trivial
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = _run(ldrm, z, pl, intr, c2w)
    assert maps.deform.dtype == torch.float32 and maps.depth.dtype == torch.float32
    for name in ("deconv", "head"):
        inp, out = seen[name]
        assert inp.dtype == torch.float32 and out.dtype == torch.float32, name
    inp, out = seen["head"]
    exact = torch.nn.functional.conv2d(inp, ldrm.deform_head.weight, ldrm.deform_head.bias)
    assert torch.equal(out, exact)


def test_dim_must_suit_the_3d_positional_embedding():
    with pytest.raises(ValueError, match="ldrm.dim"):
        make_config("tiny", ldrm={"dim": 40})


@pytest.mark.parametrize("clean_first", [True, False])
def test_ldrm_decodes_the_known_first_latent(clean_first):
    """Latent frame 0 is the conditioning image's latent, known exactly: the LDRM decodes it rather than
    its x0-prediction (``ldrm.clean_first_latent``, default on)."""
    import numpy as np

    from training.data import collate, process
    from training.model import Diff4Splat
    from training.render_torch import rasterize
    from training.synthetic import make_clip

    cfg = make_config("tiny", ldrm={"clean_first_latent": clean_first})
    torch.manual_seed(0)
    model = Diff4Splat(cfg)
    seen = {}

    def keep(name):
        def hook(module, args):
            seen.setdefault(name, args[0])  # returns None: the inputs are left as they are

        return hook

    model.backbone.transformer.register_forward_pre_hook(keep("x"))
    model.ldrm.register_forward_pre_hook(keep("z"))
    batch = collate([process(make_clip(0, t=5, size=24), list(range(5)), 24, 8, np.random.default_rng(0))])
    with torch.no_grad():
        model(batch, stage=cfg.stages[0], rasterize=rasterize)
    c = model.backbone.latent_channels
    first = seen["x"][:, 0, c : 2 * c]  # the transformer's first-frame conditioning channels = z0[:, 0]
    assert torch.equal(seen["z"][:, 0], first) == clean_first
