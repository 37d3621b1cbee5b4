"""Model FLOPs per training sample: a stated formula per component, and a counter that checks it.

Convention (as for MFU): a multiply-add is 2 FLOPs; only matrix products, attention and convolutions
count — norms, activations, element-wise work, the optimiser and data movement do not. Backward costs
twice the forward of a layer whose input needs a gradient, once where only its weights do. MFU is
``model FLOPs per sample x samples/s / peak``: activation recomputation (gradient checkpointing) adds
hardware FLOPs, not model FLOPs.

Per sample, with T frames at R x R, VAE factors f_s (space) and f_t (time), latent frames
F' = 1 + (T-1)/f_t on an R/f_s grid:

* **VAE encode** (frozen, forward only): sum over its convolutions of 2 C_in C_out k^3 x output voxels,
  frames taken in the VAE's chunks (diffusers encodes 8 frames at a time, the first chunk with the
  remainder; time is halved per compressing level inside each chunk), see :func:`vae_encode_flops`.
* **Backbone** (CogVideoX, L blocks of width d, patch p, N = F' (R/f_s/p)^2 video + N_txt text tokens):
  forward per block 24 N d^2 (q, k, v, out: 8 N d^2; feed-forward d -> 4d -> d: 16 N d^2) + 4 N^2 d
  (Q K^T and A V over all heads), plus the patch embedding, text projection, output projection and
  camera encoder (:func:`backbone_flops`); training = 3x forward.
* **LDRM** (L_r blocks of width D, MLP ratio m, its patch p_r: N_r = F' (R/f_s/p_r)^2 tokens): per block
  2 N_r (4 D^2 + 2 m D^2) + 4 N_r^2 D, plus the token projection, decoder MLP, the transposed 3D
  convolution (2 c C_out k_t k_s^2 per token) and the deformation head (a 1x1 convolution over the S birth
  frames' pixels, when deformation is trained); training = 3x forward.
* **Rendering** (gsplat): not matrix work and data dependent; estimated as views x Gaussians x
  ``RENDER_FOOTPRINT_PX`` pixels each x ``RENDER_FLOPS_PER_PX`` (forward + backward). It is < 0.1 % of the
  total at the real sizes and is reported, not hidden in the MFU.

:func:`count_flops` runs the real modules on PyTorch's "meta" device under
``torch.utils.flop_counter.FlopCounterMode`` — shapes only, no data, so even 49 x 512^2 counts in
seconds on a CPU — and tests/test_training_flops.py checks the formula against it.
"""

from __future__ import annotations

import math

import torch

RENDER_FOOTPRINT_PX = 16.0  # assumed pixels a Gaussian covers above the 1/255 alpha cut-off (estimate)
RENDER_FLOPS_PER_PX = 3 * 30.0  # ~30 FLOPs per Gaussian-pixel evaluation and blend, x3 for the backward


def _conv3(ci: int, co: int, voxels: int, k: int = 3) -> float:
    return 2.0 * ci * co * k**3 * voxels


def vae_chunks(frames: int, batch: int = 8) -> list[int]:
    """Frames per encoder call, as diffusers' ``AutoencoderKLCogVideoX._encode`` splits them."""
    n = max(frames // batch, 1)
    rem = frames % batch
    out = []
    for i in range(n):
        start = batch * i + (0 if i == 0 else rem)
        out.append(min(batch * (i + 1) + rem, frames) - start)
    return out


def vae_encode_flops(vae_cfg, frames: int, height: int, width: int) -> float:
    """Convolution FLOPs of one clip through CogVideoX's encoder (module docs)."""
    chans = list(vae_cfg.block_out_channels)
    n_time = round(math.log2(vae_cfg.temporal_compression_ratio))
    total = 0.0
    for f in vae_chunks(frames):
        h, w = height, width
        total += _conv3(3, chans[0], f * h * w)  # conv_in
        cin = chans[0]
        for i, c in enumerate(chans):
            for _ in range(vae_cfg.layers_per_block):  # resnets: two 3^3 convs, a 1x1x1 shortcut when widening
                vox = f * h * w
                total += _conv3(cin, c, vox) + _conv3(c, c, vox) + (2.0 * cin * c * vox if cin != c else 0.0)
                cin = c
            if i < len(chans) - 1:  # downsampler: time halved (first frame kept) then a 3x3 stride-2 conv
                if i < n_time:
                    f = 1 + (f - 1) // 2 if f % 2 else f // 2
                h, w = h // 2, w // 2
                total += 2.0 * 9 * c * c * f * h * w
        vox = f * h * w
        total += 2 * 2 * _conv3(cin, cin, vox)  # mid block: two resnets
        total += _conv3(cin, 2 * vae_cfg.latent_channels, vox)  # conv_out (mean and log-variance)
    return total


def latent_grid(cfg, frames: int, res: int) -> tuple[int, int]:
    """(latent frames F', latent side R / f_s) for the config's VAE."""
    v = cfg.backbone.vae
    fs = 2 ** (len(v.block_out_channels) - 1)
    ft = 2 ** min(round(math.log2(v.temporal_compression_ratio)), len(v.block_out_channels) - 1)
    return 1 + (frames - 1) // ft, res // fs


def backbone_flops(cfg, frames: int, res: int) -> float:
    """Forward FLOPs of the CogVideoX transformer, its camera encoder and text/time embeddings, one sample."""
    t = cfg.backbone.transformer
    c = cfg.backbone.vae.latent_channels
    f_lat, side = latent_grid(cfg, frames, res)
    fs = 2 ** (len(cfg.backbone.vae.block_out_channels) - 1)
    d = t.num_attention_heads * t.attention_head_dim
    p, e = t.patch_size, t.time_embed_dim
    n_v = f_lat * (side // p) ** 2
    n = n_v + t.max_text_seq_length
    cam = cfg.backbone.camera_channels
    blocks = t.num_layers * (24.0 * n * d * d + 4.0 * n * n * d + 2 * 2.0 * e * 6 * d)  # + adaLN-zero modulations
    patch = 2.0 * (2 * c + cam) * p * p * d * n_v + 2.0 * t.text_embed_dim * d * t.max_text_seq_length
    out = 2.0 * e * 2 * d + 2.0 * d * p * p * c * n_v  # final adaLN modulation + projection
    time = 2.0 * (d * e + e * e)
    camera = 2.0 * (6 * fs * fs * 4 * cam + 4 * cam * cam) * f_lat * side * side
    return blocks + patch + out + time + camera


def backbone_train_flops(cfg, frames: int, res: int) -> float:
    """Forward + backward: 3x forward, less the backward of the layers whose input needs no gradient
    (camera encoder's first layer, time embedding's first layer: weights only)."""
    t = cfg.backbone.transformer
    f_lat, side = latent_grid(cfg, frames, res)
    fs = 2 ** (len(cfg.backbone.vae.block_out_channels) - 1)
    d = t.num_attention_heads * t.attention_head_dim
    cam = cfg.backbone.camera_channels
    no_input_grad = 2.0 * 6 * fs * fs * 4 * cam * f_lat * side * side + 2.0 * d * t.time_embed_dim
    return 3 * backbone_flops(cfg, frames, res) - no_input_grad


def ldrm_flops(cfg, frames: int, res: int, deformation: bool) -> float:
    """Forward FLOPs of the LDRM for one sample (deformation head included when it is trained)."""
    lc = cfg.ldrm
    c = cfg.backbone.vae.latent_channels
    f_lat, side = latent_grid(cfg, frames, res)
    fs = 2 ** (len(cfg.backbone.vae.block_out_channels) - 1)
    ft = 2 ** min(
        round(math.log2(cfg.backbone.vae.temporal_compression_ratio)), len(cfg.backbone.vae.block_out_channels) - 1
    )
    p, dim = lc.patch_size, lc.dim
    n = f_lat * (side // p) ** 2
    mlp = int(dim * lc.mlp_ratio)
    tokens = 2.0 * (c * p * p + 6 * (fs * p) ** 2) * dim * n
    blocks = lc.num_blocks * (2.0 * n * (4 * dim * dim + 2 * dim * mlp) + 4.0 * n * n * dim)
    decoder = 2.0 * n * (dim * dim + dim * lc.decoder_channels)
    c_out = 12 + lc.deform_features
    deconv = 2.0 * lc.decoder_channels * c_out * ft * (fs * p) ** 2 * n
    total = tokens + blocks + decoder + deconv
    if deformation:
        max_frames = max((s.num_frames for s in cfg.stages), default=frames)
        from training.ldrm import birth_frames

        births = len(birth_frames(frames, lc.birth_frame_stride))
        total += 2.0 * lc.deform_features * max_frames * 10 * births * res * res
    return total


def render_flops(cfg, stage, frames: int, res: int) -> float:
    """Estimated rasterisation FLOPs (forward + backward) of one sample's renders (module docs)."""
    from training.ldrm import birth_frames

    views = min(cfg.loss.render_frames, frames)
    gaussians = len(birth_frames(frames, cfg.ldrm.birth_frame_stride)) * res * res
    return views * gaussians * RENDER_FOOTPRINT_PX * RENDER_FLOPS_PER_PX


def formula(cfg, stage, frames: int | None = None, res: int | None = None) -> dict[str, float]:
    """Model FLOPs per training sample by component (module docs) for a curriculum stage."""
    frames = frames or stage.num_frames
    res = res or stage.resolution
    deformation = "deformation" not in stage.frozen and "ldrm" not in stage.frozen
    out = {
        "vae_encode": vae_encode_flops(cfg.backbone.vae, frames, res, res),
        "backbone": backbone_train_flops(cfg, frames, res)
        if "backbone" not in stage.frozen
        else backbone_flops(cfg, frames, res),
        "ldrm": 3 * ldrm_flops(cfg, frames, res, deformation)
        if "ldrm" not in stage.frozen
        else ldrm_flops(cfg, frames, res, deformation),
        "render": render_flops(cfg, stage, frames, res),
    }
    out["total"] = sum(out.values())
    return out


def count_flops(cfg, stage, frames: int | None = None, res: int | None = None) -> dict[str, float]:
    """The same components counted by ``FlopCounterMode`` on the "meta" device (no data; module docs).

    The backbone is trained in every curriculum stage; the LDRM's input (the backbone's prediction)
    needs a gradient, as in training. Rendering is not countable this way (gsplat is a custom kernel):
    it is left out.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from training.model import Diff4Splat

    frames = frames or stage.num_frames
    res = res or stage.resolution
    deformation = "deformation" not in stage.frozen and "ldrm" not in stage.frozen
    with torch.device("meta"):
        model = Diff4Splat(cfg)
    model.apply_stage(stage)
    model.train()
    video = torch.empty(1, frames, 3, res, res, device="meta")
    intr = torch.empty(1, frames, 4, device="meta")
    c2w = torch.empty(1, frames, 4, 4, device="meta")
    out = {}

    def counted(fn) -> float:
        mode = FlopCounterMode(display=False)
        with mode:
            fn()
        return float(mode.get_total_flops())

    holder = {}
    out["vae_encode"] = counted(lambda: holder.update(z0=model.backbone.encode(video)))
    z0 = holder["z0"]
    pooled = model.backbone.pooled_plucker(intr, c2w, res, res)
    t = torch.empty(1, device="meta")

    def backbone():
        v = model.backbone.velocity(z0, t, z0[:, :1], pooled)
        if "backbone" not in stage.frozen:
            v.sum().backward()

    out["backbone"] = counted(backbone)
    z_hat = torch.empty_like(z0).requires_grad_(True)

    def ldrm():
        maps = model.ldrm(z_hat, pooled, intr, c2w, frames, with_deformation=deformation)
        if "ldrm" not in stage.frozen:
            (maps.depth.sum() + maps.colour.sum() + (maps.deform.sum() if maps.deform is not None else 0)).backward()

    out["ldrm"] = counted(ldrm)
    out["total"] = sum(out.values())
    return out


def mfu(flops_per_sample: float, samples_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the fraction of the peak that the model's own FLOPs use."""
    return flops_per_sample * samples_per_s / peak_flops
