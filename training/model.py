"""Diff4Splat: video diffusion backbone + LDRM + deformable Gaussians + renderer, and the training loss."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.profiler import record_function

from training import losses as L
from training.backbone import VideoBackbone, latent_frame_groups
from training.config import StageConfig, TrainConfig
from training.gaussians import GaussianMaps, gaussians_at, kept, sample_maps, track_positions
from training.ldrm import LDRM

# The metrics every forward returns, always all of them and in this order, each as (sum, count): the
# trainer all-reduces one fixed-length vector of sums and counts, so ranks whose batches lack a term
# (motion without tracks) still take part and the mean is over the samples that had it.
# ``psnr_first``: the render of frame 0 alone (the conditioning frame, decoded from the known first latent).
METRICS = ("loss", "fm", "photo", "geo", "motion", "psnr", "psnr_first", "gaussians")


class Diff4Splat(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = VideoBackbone(cfg.backbone)
        if cfg.backbone.pretrained_dir:
            _check_pretrained_layout(cfg, self.backbone)
        max_frames = max((s.num_frames for s in cfg.stages), default=13)
        self.ldrm = LDRM(cfg.ldrm, self.backbone.latent_channels, self.backbone.fs, self.backbone.ft, max_frames)

    # --- freezing per curriculum stage -----------------------------------------------------------
    def apply_stage(self, stage: StageConfig) -> None:
        frozen = set(stage.frozen)
        for name, p in self.named_parameters():
            if name.startswith("backbone.vae."):
                p.requires_grad_(not (self.cfg.backbone.freeze_vae or "vae" in frozen))
            elif name.startswith("backbone."):
                p.requires_grad_("backbone" not in frozen)
            elif name.startswith("ldrm.deform_head."):
                p.requires_grad_("deformation" not in frozen and "ldrm" not in frozen)
            elif name.startswith("ldrm."):
                p.requires_grad_("ldrm" not in frozen)

    def set_gradient_checkpointing(self, on: bool, fraction: float = 1.0) -> None:
        """Recompute in backward the activations of ``fraction`` of each transformer's blocks (spread
        evenly, :func:`training.speed.checkpoint_mask`): 1 saves the most memory, 0 none."""
        from training.speed import checkpoint_mask

        n_bb = len(self.backbone.transformer.transformer_blocks)
        self.backbone.set_gradient_checkpointing(on, checkpoint_mask(n_bb, fraction))
        self.ldrm.checkpointed = checkpoint_mask(len(self.ldrm.blocks), fraction if on else 0.0)

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        batch: dict,
        stage: StageConfig | None = None,
        rasterize=None,
        lpips_fn=None,
        render_frames=None,
        autocast: bool = False,
        predict: str | None = None,
        sample_steps: int = 10,
        seed: int = 0,
        timings: dict | None = None,
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]] | GaussianMaps:
        """-> (loss, {metric: (sum, count)} for every name in :data:`METRICS`). ``loss`` and ``fm`` count
        once per batch; ``photo``, ``geo``, ``motion`` and ``psnr`` once per sample that has the term;
        ``gaussians`` once per render.

        Sums are 0-dim tensors on the batch's device and counts are host ints: nothing in the step reads
        a value back from the device (the trainer reduces the metrics at log time). For that the per-sample
        flags ``has_depth`` / ``has_tracks`` are read from the host when the batch keeps them there (the
        trainer does); pruned Gaussians get opacity 0 rather than being removed. The renderer may still
        sync (gsplat sizes its tile lists on the host). Phases are labelled for torch.profiler
        (``d4s/...``, bench/bench_speed.py).

        With ``predict`` (``"reconstruct"`` or ``"sample"``) it is inference instead: see
        :meth:`predict_maps`. That goes through ``forward`` so that an FSDP-wrapped model gathers its
        parameters the way it does for a training step (validation runs on the sharded model).
        """
        if predict is not None:
            return self.predict_maps(
                batch, predict, sample_steps=sample_steps, seed=seed, autocast=autocast, timings=timings
            )
        cfg, lc = self.cfg, self.cfg.loss
        video = batch["video"]  # (B,T,3,H,W) [0,1]
        intr, c2w = batch["intrinsics"], batch["c2w"]
        b, t, _, h, w = video.shape
        dev = video.device
        ac = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        use = set(stage.losses)
        has_depth, has_tracks = _host_flags(batch["has_depth"]), _host_flags(batch["has_tracks"])

        with record_function("d4s/vae_encode"):
            z0 = self.backbone.encode(video * 2 - 1)
        with record_function("d4s/backbone"):
            pooled = self.backbone.pooled_plucker(intr, c2w, h, w)
            tt = torch.rand(b, device=dev)
            noise = torch.randn_like(z0)
            z_t = (1 - tt.view(b, 1, 1, 1, 1)) * z0 + tt.view(b, 1, 1, 1, 1) * noise
            with ac:
                v = self.backbone.velocity(z_t, tt, z0[:, :1], pooled, batch.get("text"), batch.get("use_text")).float()
        zero = video.new_zeros(())
        metrics: dict[str, tuple[torch.Tensor, int]] = {k: (zero, 0) for k in METRICS}
        total = zero
        if "fm" in use:
            l_fm = L.flow_matching_loss(v, z0, noise)
            total = total + l_fm
            metrics["fm"] = (l_fm.detach(), 1)
        z_hat = z_t - tt.view(b, 1, 1, 1, 1) * v
        if cfg.ldrm.clean_first_latent:  # the conditioning frame's latent is known exactly
            z_hat = torch.cat([z0[:, :1], z_hat[:, 1:]], 1)
        if cfg.ldrm.clean_latent_prob > 0:
            clean = (torch.rand(b, device=dev) < cfg.ldrm.clean_latent_prob).view(b, 1, 1, 1, 1)
            z_hat = torch.where(clean, z0, z_hat)
        with_def = "deformation" not in stage.frozen and "ldrm" not in stage.frozen
        with record_function("d4s/ldrm"), ac:
            maps = self.ldrm(z_hat, pooled, intr, c2w, t, with_deformation=with_def)

        if render_frames is None:
            k = min(lc.render_frames, t)
            render_frames = [0] + (torch.randperm(t - 1)[: k - 1] + 1).tolist() if k > 1 else [0]
        frames = sorted(render_frames)
        take = lambda x: torch.stack([x[f] for f in frames])  # views: no index tensor to upload
        w_photo, w_depth, w_motion = batch["weights"].unbind(-1)
        photo_terms, geo_terms, mot_terms, psnrs, psnr0, n_g = [], [], [], [], [], []
        tau_p = cfg.ldrm.prune_opacity
        for bi in range(b):
            with record_function("d4s/render"):
                sm = sample_maps(maps, bi)  # sliced once for all rendered frames (cheap backward)
                if maps.deform is None:
                    g = gaussians_at(maps, bi, 0, tau_p, drop=False, sample=sm)
                    vm = torch.linalg.inv_ex(take(c2w[bi]))[0]  # inv_ex: no error check (a device read)
                    ks = _kmat(take(intr[bi]))
                    rgb, dep, alp = rasterize(g.means, g.quats, g.scales, g.opacities, g.colours, vm, ks, w, h)
                    n_g.append(kept(g, tau_p))
                else:
                    rl = []
                    for tau in frames:
                        g = gaussians_at(maps, bi, tau, tau_p, drop=False, sample=sm)
                        vm = torch.linalg.inv_ex(c2w[bi, tau])[0][None]
                        rl.append(
                            rasterize(
                                g.means, g.quats, g.scales, g.opacities, g.colours, vm, _kmat(intr[bi, tau][None]), w, h
                            )
                        )
                        n_g.append(kept(g, tau_p))
                    rgb, dep, alp = (torch.cat(x) for x in zip(*rl))
            with record_function("d4s/losses"):
                target = take(video[bi]).permute(0, 2, 3, 1)
                if "photo" in use:
                    photo_terms.append(w_photo[bi] * L.photo_loss(rgb, target, lpips_fn, lc.lpips_weight))
                with torch.no_grad():
                    mse = torch.mean((rgb.detach() - target) ** 2)
                    psnrs.append(-10 * torch.log10(mse.clamp_min(1e-10)))
                    if frames[0] == 0:
                        mse0 = torch.mean((rgb[0].detach() - target[0]) ** 2)
                        psnr0.append(-10 * torch.log10(mse0.clamp_min(1e-10)))
                if "geo" in use:
                    exp_depth = dep / alp.clamp_min(1e-4)
                    geo = lc.tv_weight * L.tv_loss(exp_depth)
                    if has_depth[bi]:
                        valid = take(batch["depth_valid"][bi]) & (alp.detach() > 0.5)
                        geo = geo + w_depth[bi] * L.pearson_depth_loss(exp_depth, take(batch["depth"][bi]), valid)
                    geo_terms.append(geo)
                if "motion" in use and has_tracks[bi] and maps.deform is not None:
                    pred, mask = track_positions(maps, bi, batch["tracks"][bi], batch["track_visible"][bi])
                    mot_terms.append(w_motion[bi] * L.motion_loss(pred, batch["tracks"][bi], mask))
        for name, terms, lam in (
            ("photo", photo_terms, lc.lambda_photo),
            ("geo", geo_terms, lc.lambda_geo),
            ("motion", mot_terms, lc.lambda_motion),
        ):
            if terms:
                val = torch.stack(terms).sum()
                total = total + lam * val / b  # per-sample mean; a sample without the term adds 0
                metrics[name] = (val.detach(), len(terms))
        metrics["psnr"] = (torch.stack(psnrs).sum(), len(psnrs))
        if psnr0:
            metrics["psnr_first"] = (torch.stack(psnr0).sum(), len(psnr0))
        metrics["gaussians"] = (torch.stack(n_g).sum().to(zero.dtype), len(n_g))
        metrics["loss"] = (total.detach(), 1)
        # keep every trainable parameter in the graph (DDP): add 0 x unused outputs
        total = total + 0.0 * v.sum() + 0.0 * maps.depth.sum()
        return total, metrics

    @torch.no_grad()
    def predict_maps(
        self,
        batch: dict,
        how: str,
        sample_steps: int = 10,
        seed: int = 0,
        autocast: bool = False,
        timings: dict | None = None,
    ) -> GaussianMaps:
        """Deformable Gaussian maps for the batch's cameras (inference, deformation head applied).

        ``how="reconstruct"``: from the clip's own latents z0 (the VAE encoding of all of ``video``).
        ``how="sample"``: from latents that the flow samples (Euler, ``sample_steps`` steps, noise seeded
        by ``seed``) from the first frame's latent and the cameras alone, as at generation time; only
        ``video[:, 0]`` is read, and with ``ldrm.clean_first_latent`` latent frame 0 is the known latent of
        that frame. ``batch``: ``video`` (B,T or 1,3,H,W) in [0,1], ``intrinsics`` (B,T,4), ``c2w``
        (B,T,4,4) in the first camera's frame, optional ``text`` / ``use_text``. The VAE's posterior is
        sampled from the global RNG (callers fork it to be deterministic). ``timings``, when given, receives
        the seconds of ``encode``, ``sample`` and ``ldrm`` (the device synchronised around each).
        """
        clock = _Clock(timings, batch["video"].device)
        video, intr, c2w = batch["video"], batch["intrinsics"], batch["c2w"]
        t = intr.shape[1]
        h, w = video.shape[-2:]
        ac = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        pooled = self.backbone.pooled_plucker(intr, c2w, h, w)
        if how == "reconstruct":
            if video.shape[1] != t:
                raise ValueError(f"reconstruct needs all {t} frames, got {video.shape[1]}")
            with clock("encode"):
                z = self.backbone.encode(video * 2 - 1)
        elif how == "sample":
            with clock("encode"):
                first = self.backbone.encode(video[:, :1] * 2 - 1)
            n_latent = len(latent_frame_groups(t, self.backbone.ft))
            gen = torch.Generator(device=video.device).manual_seed(int(seed))
            with ac, clock("sample"):
                z = self.backbone.sample(
                    first,
                    pooled,
                    n_latent,
                    steps=sample_steps,
                    generator=gen,
                    text=batch.get("text"),
                    use_text=batch.get("use_text"),
                ).float()
            if self.cfg.ldrm.clean_first_latent:
                z = torch.cat([first, z[:, 1:]], 1)
        else:
            raise ValueError(f"predict must be 'reconstruct' or 'sample', got {how!r}")
        with ac, clock("ldrm"):
            return self.ldrm(z, pooled, intr, c2w, t, with_deformation=True)


def _check_pretrained_layout(cfg: TrainConfig, backbone: VideoBackbone) -> None:
    """The config's VAE and patch fields decide which resolutions and frame counts it accepts (TrainConfig's
    checks); with a pretrained backbone they must describe the loaded one, or those checks are wrong."""
    import math

    v = cfg.backbone.vae
    fs = 2 ** (len(v.block_out_channels) - 1)
    ft = 2 ** min(int(round(math.log2(v.temporal_compression_ratio))), len(v.block_out_channels) - 1)
    p = backbone.transformer.config.patch_size
    got = (backbone.fs, backbone.ft, p)
    if got != (fs, ft, cfg.backbone.transformer.patch_size):
        raise ValueError(
            f"backbone.pretrained_dir {cfg.backbone.pretrained_dir}: its VAE compresses space by {got[0]} and time by "
            f"{got[1]} and its transformer patch is {got[2]}, but the config's backbone.vae / backbone.transformer say "
            f"{fs}, {ft}, {cfg.backbone.transformer.patch_size}: set backbone.vae.block_out_channels (length "
            f"{int(math.log2(got[0])) + 1}), backbone.vae.temporal_compression_ratio ({got[1]}) and "
            f"backbone.transformer.patch_size ({got[2]}) to match (they decide the resolutions and frame counts accepted)"
        )


class _Clock:
    """``with clock(name):`` adds the block's seconds to ``timings[name]`` (nothing when timings is None)."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings, self.device = timings, device

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.timings is None:
            yield
            return
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _host_flags(x) -> list[bool]:
    """Per-sample booleans as a host list: free for a CPU tensor or a list, one device read otherwise."""
    return [bool(v) for v in (x.tolist() if torch.is_tensor(x) else x)]


def _kmat(intr: torch.Tensor) -> torch.Tensor:
    k = torch.zeros(intr.shape[0], 3, 3, dtype=intr.dtype, device=intr.device)
    k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2], k[:, 2, 2] = intr[:, 0], intr[:, 1], intr[:, 2], intr[:, 3], 1
    return k
