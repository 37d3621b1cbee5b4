"""Video diffusion backbone: CogVideoX (diffusers) conditioned on the first frame and the camera path.

* ``AutoencoderKLCogVideoX`` (frozen by default) encodes the clip (B,3,T,H,W) in [-1, 1] into latents
  z0 (B,F',C,h,w), F' = 1 + (T-1)/f_t, h = H/f_s, scaled by the VAE's ``scaling_factor``.
* ``CogVideoXTransformer3DModel`` predicts the flow-matching velocity. Its input channels are
  [noisy latent z_t | first-frame latent (zeros after latent frame 0) | camera embedding]: the camera
  embedding is the Plücker ray map of every frame, averaged over the frames each latent frame covers,
  pixel-unshuffled to the latent grid and projected to ``camera_channels`` — so the camera trajectory is
  injected into every latent token through the patch embedding.
* Text: T5 embeddings of the sample's caption when given (:mod:`training.text`), a learned "empty
  prompt" (``max_text_seq_length`` tokens) for samples without one.
* Positions, as diffusers' CogVideoX pipelines give them: 3D rotary embeddings passed as
  ``image_rotary_emb`` when the transformer uses them (CogVideoX-5B, 5B-I2V), the patch embedding's
  own sin-cos embedding otherwise (2B). Learned positional embeddings (5B-I2V, trained at 480x720 and
  49 frames only) are resampled to the clip's latent grid instead of being refused: the stored grid is
  cropped to the region the rotary embedding assigns to the clip's aspect ratio (its centre) and
  resized bicubically; its first latent frames are used as they are.

With ``pretrained_dir`` (a local CogVideoX checkpoint with ``vae/`` and ``transformer/``) the weights
are loaded and the transformer's patch embedding is widened with zero-initialised input channels for
whatever the checkpoint lacks (first-frame latent for T2V checkpoints, camera channels always).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from training.config import BackboneConfig
from training.plucker import plucker_rays


def latent_frame_groups(t: int, ft: int) -> list[list[int]]:
    """Frames covered by each latent frame: [0], [1..ft], [ft+1..2ft], ... (CogVideoX causal VAE)."""
    return [[0]] + [list(range(1 + k * ft, 1 + (k + 1) * ft)) for k in range((t - 1) // ft)]


def crop_region_for_grid(grid: tuple[int, int], base_w: int, base_h: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a (rows, cols) token grid sits in the transformer's base grid: the largest centred region of
    the grid's aspect ratio, as ((top, left), (bottom, right)) in base-grid units — the crop that
    diffusers' CogVideoX 1.0 pipelines give ``get_3d_rotary_pos_embed`` (``get_resize_crop_region_for_grid``)."""
    h, w = grid
    if h / w > base_h / base_w:
        rh, rw = base_h, round(base_h / h * w)
    else:
        rw, rh = base_w, round(base_w / w * h)
    top, left = round((base_h - rh) / 2.0), round((base_w - rw) / 2.0)
    return (top, left), (top + rh, left + rw)


def _widen_patch_embed(transformer, new_in: int) -> None:
    proj = transformer.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        raise NotImplementedError("widening the patch embedding is implemented for CogVideoX 1.0 (Conv2d) only")
    old_in = proj.in_channels
    if new_in == old_in:
        return
    new = nn.Conv2d(new_in, proj.out_channels, proj.kernel_size, proj.stride, bias=proj.bias is not None)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old_in] = proj.weight
        if proj.bias is not None:
            new.bias.copy_(proj.bias)
    transformer.patch_embed.proj = new
    transformer.register_to_config(in_channels=new_in)


class CameraEncoder(nn.Module):
    def __init__(self, fs: int, out_channels: int):
        super().__init__()
        self.fs = fs
        self.proj = nn.Sequential(
            nn.Linear(6 * fs * fs, 4 * out_channels), nn.SiLU(), nn.Linear(4 * out_channels, out_channels)
        )

    def forward(self, plucker_latent: torch.Tensor) -> torch.Tensor:
        """(B,F',6*fs*fs,h,w) -> (B,F',C,h,w)."""
        x = self.proj(plucker_latent.movedim(2, -1))
        return x.movedim(-1, 2)


class VideoBackbone(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

        self.cfg = cfg
        if cfg.pretrained_dir:
            self.vae = AutoencoderKLCogVideoX.from_pretrained(os.path.join(cfg.pretrained_dir, "vae"))
            self.transformer = CogVideoXTransformer3DModel.from_pretrained(
                os.path.join(cfg.pretrained_dir, "transformer")
            )
        else:
            v = cfg.vae
            n = len(v.block_out_channels)
            self.vae = AutoencoderKLCogVideoX(
                block_out_channels=tuple(v.block_out_channels),
                down_block_types=("CogVideoXDownBlock3D",) * n,
                up_block_types=("CogVideoXUpBlock3D",) * n,
                latent_channels=v.latent_channels,
                layers_per_block=v.layers_per_block,
                norm_num_groups=v.norm_num_groups,
                temporal_compression_ratio=v.temporal_compression_ratio,
                scaling_factor=v.scaling_factor,
            )
            t = cfg.transformer
            c = v.latent_channels
            self.transformer = CogVideoXTransformer3DModel(
                num_attention_heads=t.num_attention_heads,
                attention_head_dim=t.attention_head_dim,
                in_channels=2 * c + cfg.camera_channels,
                out_channels=c,
                time_embed_dim=t.time_embed_dim,
                text_embed_dim=t.text_embed_dim,
                num_layers=t.num_layers,
                patch_size=t.patch_size,
                max_text_seq_length=t.max_text_seq_length,
                temporal_compression_ratio=v.temporal_compression_ratio,
            )
        vc = self.vae.config
        self.latent_channels = vc.latent_channels
        self.fs = 2 ** (len(vc.block_out_channels) - 1)
        self.ft = 2 ** min(int(round(math.log2(vc.temporal_compression_ratio))), len(vc.block_out_channels) - 1)
        self.scaling = float(vc.scaling_factor)
        _widen_patch_embed(self.transformer, 2 * self.latent_channels + cfg.camera_channels)
        tc = self.transformer.config
        self.null_text = nn.Parameter(torch.randn(tc.max_text_seq_length, tc.text_embed_dim) * 0.02)
        self.camera = CameraEncoder(self.fs, cfg.camera_channels)
        if cfg.freeze_vae:
            self.vae.requires_grad_(False)
            self.vae.eval()
        self._rope_cache: dict = {}
        self._learned_cache: dict = {}
        pe = self.transformer.patch_embed
        if getattr(pe, "use_learned_positional_embeddings", False):
            # diffusers refuses any grid but the stored one; we add a resampled copy ourselves (forward hook)
            # and keep the stored embedding (a persistent buffer, so checkpoints are unchanged)
            pe.use_learned_positional_embeddings = False
            pe.register_forward_hook(self._add_learned_positions)

    # --- positions ----------------------------------------------------------------------------
    def rotary_embedding(self, frames: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``image_rotary_emb`` for latents of ``frames`` x ``h`` x ``w`` (None when the transformer has
        no rotary positions), computed as diffusers' CogVideoX 1.0 pipelines do."""
        tc = self.transformer.config
        if not tc.use_rotary_positional_embeddings:
            return None
        if tc.patch_size_t is not None:
            raise NotImplementedError("CogVideoX 1.5 (patch_size_t) is not supported")
        key = (frames, h, w, str(device))
        if key not in self._rope_cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed

            p = tc.patch_size
            grid = (h // p, w // p)
            crops = crop_region_for_grid(grid, tc.sample_width // p, tc.sample_height // p)
            self._rope_cache[key] = get_3d_rotary_pos_embed(
                embed_dim=tc.attention_head_dim, crops_coords=crops, grid_size=grid, temporal_size=frames, device=device
            )
        return self._rope_cache[key]

    def learned_position_embedding(self, frames: int, h: int, w: int, device, dtype) -> torch.Tensor:
        """The stored learned embedding (1, text + F0*H0*W0, D) resampled to ``frames`` latent frames of an
        ``h`` x ``w`` latent grid -> (1, text + frames*(h/p)*(w/p), D). Identity at the stored grid."""
        pe = self.transformer.patch_embed
        stored = pe.pos_embedding
        p, text = pe.patch_size, pe.max_text_seq_length
        h0, w0 = pe.sample_height // p, pe.sample_width // p
        f0 = (pe.sample_frames - 1) // pe.temporal_compression_ratio + 1
        gh, gw = h // p, w // p
        if frames > f0:
            raise ValueError(
                f"the checkpoint's learned positional embedding covers {f0} latent frames "
                f"({pe.sample_frames} video frames); this clip has {frames} latent frames"
            )
        key = (frames, gh, gw, str(device), dtype, stored.data_ptr(), stored._version)
        if key not in self._learned_cache:
            grid = stored[0, text:].reshape(f0, h0, w0, -1)[:frames]
            if (gh, gw) != (h0, w0):
                (top, left), (bottom, right) = crop_region_for_grid((gh, gw), w0, h0)
                g = grid[:, top:bottom, left:right].permute(0, 3, 1, 2).float()
                grid = F.interpolate(
                    g,
                    size=(gh, gw),
                    mode="bicubic",
                    align_corners=False,
                    antialias=gh < g.shape[-2] or gw < g.shape[-1],
                ).permute(0, 2, 3, 1)
            emb = torch.cat([stored[0, :text].float(), grid.reshape(-1, grid.shape[-1]).float()])[None]
            self._learned_cache = {key: emb.to(device=device, dtype=dtype)}  # one grid at a time
        return self._learned_cache[key]

    def _add_learned_positions(self, module, args, out):
        _, f, _, h, w = args[1].shape  # patch_embed(text_embeds, image_embeds (B,F',C,h,w))
        return out + self.learned_position_embedding(f, h, w, out.device, out.dtype)

    # --- conditioning -------------------------------------------------------------------------
    def pooled_plucker(self, intrinsics: torch.Tensor, c2w: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Plücker maps averaged over the frames each latent frame covers: (B,F',6,H,W)."""
        pl = plucker_rays(intrinsics, c2w, h, w)
        groups = latent_frame_groups(pl.shape[1], self.ft)
        return torch.stack([pl[:, g].mean(1) for g in groups], 1)

    def unshuffle(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B,F',6,H,W) -> (B,F',6*fs*fs,H/fs,W/fs) on the latent grid."""
        b, f = pooled.shape[:2]
        return F.pixel_unshuffle(pooled.flatten(0, 1), self.fs).unflatten(0, (b, f))

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B,T,3,H,W) in [-1,1] -> latents (B,F',C,h,w) (scaled), one encoder pass per call.

        ``vae_precision: bfloat16`` runs the encoder under bf16 autocast; the posterior's mean and
        log-variance are taken back to float32 before sampling, so the sampling noise (and the RNG it
        draws from) is the float32 path's.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        x = video.transpose(1, 2).to(self.vae.dtype)
        bf16 = self.cfg.vae_precision == "bfloat16" and x.device.type in ("cuda", "cpu")
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            moments = self.vae.encode(x).latent_dist.parameters
        z = DiagonalGaussianDistribution(moments.float()).sample()
        return (z * self.scaling).transpose(1, 2).float()

    def velocity(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        first_latent: torch.Tensor,
        pooled_plucker: torch.Tensor,
        text: torch.Tensor | None = None,
        use_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity prediction. z_t (B,F',C,h,w), t (B,) in [0,1], pooled Plücker (B,F',6,H,W); optional
        text embeddings (B,L,D) used where ``use_text`` (B,) is True, the learned empty prompt elsewhere."""
        cond = torch.zeros_like(z_t)
        cond[:, :1] = first_latent
        x = torch.cat([z_t, cond, self.camera(self.unshuffle(pooled_plucker)).to(z_t.dtype)], dim=2)
        null = self.null_text[None].expand(z_t.shape[0], -1, -1)
        if text is not None:
            use = use_text if use_text is not None else torch.ones(len(text), dtype=torch.bool, device=text.device)
            null = torch.where(use.view(-1, 1, 1), text.to(null.dtype), null)
        text = null.to(x.dtype)
        rope = self.rotary_embedding(z_t.shape[1], z_t.shape[-2], z_t.shape[-1], z_t.device)
        return self.transformer(x, text, t * 1000.0, image_rotary_emb=rope, return_dict=False)[0]

    def set_gradient_checkpointing(self, on: bool, mask: list[bool] | None = None) -> None:
        """Recompute the activations of the transformer blocks where ``mask`` (default: all) is True."""
        if not on:
            self.transformer.disable_gradient_checkpointing()
            return
        chosen = {id(b) for b, m in zip(self.transformer.transformer_blocks, mask or [True] * 10**6) if m}

        def selective(block, *args):  # diffusers calls this for every block when checkpointing is on
            if id(block) in chosen:
                return checkpoint(block.__call__, *args, use_reentrant=False)
            return block(*args)

        self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=selective)

    @torch.no_grad()
    def sample(
        self,
        first_latent: torch.Tensor,
        pooled_plucker: torch.Tensor,
        num_latent_frames: int,
        steps: int = 25,
        generator: torch.Generator | None = None,
        text: torch.Tensor | None = None,
        use_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Euler integration of the flow from noise (t=1) to data (t=0); returns latents (B,F',C,h,w)."""
        b, _, c, h, w = first_latent.shape
        z = torch.randn(b, num_latent_frames, c, h, w, generator=generator, device=first_latent.device)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=z.device)
        for i in range(steps):
            v = self.velocity(z, ts[i].expand(b), first_latent, pooled_plucker, text, use_text)
            z = z + (ts[i + 1] - ts[i]) * v
        return z
