"""Training configuration (pydantic): model, losses, curriculum stages, data, runtime.

Three presets: ``tiny`` (CPU tests and ``d4s train --demo``), ``mid`` (benchmarks on one GPU),
``full`` (the Diff4Splat recipe: CogVideoX backbone, 16 LDRM blocks, 40k/40k/20k curriculum).
A YAML file is a partial override of a preset: ``preset: full`` plus any fields below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# a sampling weight: 0 leaves a dataset out; a negative one would be a probability below 0
Weight = Annotated[float, Field(ge=0.0)]


class VAEConfig(_Strict):
    """``diffusers.AutoencoderKLCogVideoX`` kwargs when no pretrained directory is given."""

    block_out_channels: list[int] = [128, 256, 256, 512]
    layers_per_block: int = 3
    latent_channels: int = 16
    norm_num_groups: int = 32
    temporal_compression_ratio: int = Field(4, ge=1)
    scaling_factor: float = 1.15258426


class TransformerConfig(_Strict):
    """``diffusers.CogVideoXTransformer3DModel`` kwargs when no pretrained directory is given."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    num_layers: int = 30
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    max_text_seq_length: int = 226
    patch_size: int = 2


class BackboneConfig(_Strict):
    pretrained_dir: str | None = None  # local CogVideoX checkpoint dir (with vae/ and transformer/)
    vae: VAEConfig = VAEConfig()
    transformer: TransformerConfig = TransformerConfig()
    camera_channels: int = 16  # Plücker embedding channels concatenated to the latent tokens
    freeze_vae: bool = True
    # T5 encoder for captions (meta.json ``caption``): a local dir with text_encoder/ + tokenizer/ (a
    # CogVideoX checkpoint) or both directly; None: every sample gets the learned empty prompt
    text_encoder_dir: str | None = None
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)  # captions replaced by the empty prompt (CFG)
    text_cache_size: int = Field(1024, ge=1)  # distinct captions whose embeddings a rank keeps (LRU, CPU)
    # precision of the frozen VAE encoder (docs/TRAINING.md, speed): "bfloat16" runs it under bf16 autocast
    # on the GPU (about half the time of float32/TF32 convolutions; latents differ by bf16 rounding)
    vae_precision: Literal["float32", "bfloat16"] = "float32"


class LDRMConfig(_Strict):
    num_blocks: int = 16
    dim: int = 1024
    heads: int = Field(16, ge=1)
    mlp_ratio: float = 4.0
    patch_size: int = Field(2, ge=1)  # latent patch per token
    decoder_channels: int = 64
    birth_frame_stride: int = 4  # Gaussians are born at the pixels of frames 0, s, 2s, ... (and T-1)
    depth_min: float = Field(0.05, gt=0.0)  # the depth squash works in log depth
    depth_max: float = 100.0
    scale_min: float = Field(1e-4, gt=0.0)
    scale_max_rel: float = Field(0.05, gt=0.0)  # max Gaussian scale relative to depth
    deform_features: int = 16  # decoder channels beside the Gaussian maps feeding the deformation head
    # prob. of decoding the VAE latents instead of the FM x0-prediction
    clean_latent_prob: float = Field(0.0, ge=0.0, le=1.0)
    # latent frame 0 is the conditioning image's latent, known exactly at inference: decode it, not its
    # x0-prediction (docs/TRAINING.md, "the first latent")
    clean_first_latent: bool = True
    # tau: Gaussians with opacity below are dropped (train and test)
    prune_opacity: float = Field(0.005, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _depth_range(self) -> "LDRMConfig":
        if self.depth_min >= self.depth_max:
            raise ValueError(f"ldrm.depth_min {self.depth_min} must be below ldrm.depth_max {self.depth_max}")
        return self


class LossConfig(_Strict):
    lambda_photo: float = Field(1.0, ge=0.0)
    lambda_geo: float = Field(0.5, ge=0.0)
    lambda_motion: float = Field(2.0, ge=0.0)
    lpips_weight: float = Field(0.5, ge=0.0)
    lpips_enabled: bool = True
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    lpips_torch_home: str | None = None  # dir holding hub/checkpoints/<backbone>.pth (no downloads)
    tv_weight: float = Field(0.1, ge=0.0)
    render_frames: int = Field(4, ge=1)  # frames rendered per sample per step (random subset, always incl. 0)
    tracks_per_sample: int = Field(256, ge=0)


class StageConfig(_Strict):
    name: str
    steps: int = Field(..., ge=1)
    resolution: int = Field(..., ge=1)
    num_frames: int = Field(..., ge=1)
    scenes: Literal["static", "dynamic", "any"] = "any"
    mixture: dict[str, Weight] | None = None  # dataset -> weight; None: proportional to size
    frozen: list[Literal["backbone", "vae", "ldrm", "deformation"]] = []
    # active loss terms; the presets' static stages use ["photo", "geo"] (docs/TRAINING.md, curriculum)
    losses: list[Literal["fm", "photo", "geo", "motion"]] = ["fm", "photo", "geo", "motion"]
    max_frame_stride: int = Field(4, ge=1)


class DataConfig(_Strict):
    shards: list[str] = []  # shard URLs/paths or globs (local or fsspec); or use ``root``
    root: str | None = None  # a build's OUT: reads OUT/index.parquet and OUT/shards/**.tar
    repeat: dict[
        str, Weight
    ] = {}  # per-dataset repeat weight (multiplies the mixture weight; replaces the build's repeat_weight)
    shuffle_buffer: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)  # DataLoader workers per rank
    seed: int = 0


class OptimConfig(_Strict):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    warmup_steps: int = Field(500, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    fused: bool = True  # AdamW's fused kernel (one launch for all parameters; same update to float rounding)


class RuntimeConfig(_Strict):
    launcher: Literal["ray", "local"] = "ray"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    # GPUs per rank; below 1 packs ranks onto one GPU (a code-path check of the multi-rank GPU path on a
    # one-GPU machine, with backend gloo: NCCL refuses two ranks on one device). Not a scaling setup.
    gpus_per_worker: float = Field(1.0, gt=0.0, le=1.0)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    bf16: bool = True  # autocast on GPU only
    grad_checkpointing: bool = False
    # with grad_checkpointing: the share of transformer blocks (backbone and LDRM, spread evenly) whose
    # activations are recomputed in the backward pass; size it to memory (docs/TRAINING.md, speed)
    checkpoint_fraction: float = Field(1.0, ge=0.0, le=1.0)
    # scaled-dot-product attention kernel for both transformers; "auto" lets PyTorch choose per call
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    compile: bool = False  # torch.compile every transformer block's forward (backbone and LDRM)
    # torch.compile the frozen VAE encoder's forward: its norms, activations and adds fuse (~2.5x faster
    # encode at 49 x 512² on an H200); compiles once per stage's shapes (~45 s at 512²)
    compile_vae: bool = False
    # cuDNN tries its convolution algorithms on the first call of each shape and keeps the fastest (the
    # VAE's 3D convolutions, the LDRM's deconvolution); shapes are fixed within a stage
    cudnn_benchmark: bool = False
    renderer: Literal["auto", "torch", "gsplat"] = "auto"
    batch_size: int = Field(1, ge=1)  # per rank, per micro-step
    ckpt_every: int = Field(1000, ge=1)
    keep_ckpts: int = Field(2, ge=1)
    checkpoint_at_end: bool = True  # also at the end of every stage and of the run (benchmarks turn it off)
    log_every: int = Field(10, ge=1)
    tensorboard: bool = True
    seed: int = 0
    deterministic: bool = False
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else start a new local Ray
    crash_at_step: int | None = None  # fault injection for tests: raise after this step, before checkpointing


VALIDATION_MEASURES = tuple(
    f"{how}_{m}"
    for how in ("recon", "sample")
    for m in ("psnr", "ssim", "lpips", "depth_abs_rel", "depth_delta_1_25", "track_epe_m", "depth_abs_rel_scaled")
)


class ValidationConfig(_Strict):
    """Validation while training (training/validate.py, docs/TRAINING.md): held-out clips measured every
    ``every`` steps and at the end of each stage; the best checkpoint is kept by ``best_metric``."""

    every: int = Field(1000, ge=0)  # steps between validations; 0: never (not even at stage ends)
    at_stage_end: bool = True  # also after the last step of every curriculum stage (and of the run)
    clips: int = Field(8, ge=1)  # fixed held-out clips (the first in a deterministic order), split over ranks
    # None: data.root's index.parquet 'val' split (build with datasets.<name>.val_fraction > 0);
    # root: that build's 'val' split; shards: every sample of these shards (paths, URLs, globs)
    root: str | None = None
    shards: list[str] = []
    sample_steps: int = Field(10, ge=0)  # flow steps for the measures of sampled latents; 0: reconstruction only
    tracks: int = Field(256, ge=0)  # tracks per clip for the end-point error
    seed: int = 0
    best_metric: Literal[VALIDATION_MEASURES] = "recon_psnr"  # type: ignore[valid-type]
    keep_best: bool = True  # ckpt/best.pt (weights + config) whenever best_metric improves
    report: bool = True  # rewrite WORKDIR/report.html (loss and validation curves) after every validation


class TrainConfig(_Strict):
    preset: str | None = None
    workdir: str = "runs/train"
    backbone: BackboneConfig = BackboneConfig()
    ldrm: LDRMConfig = LDRMConfig()
    loss: LossConfig = LossConfig()
    stages: list[StageConfig] = Field(default_factory=list)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    validation: ValidationConfig = ValidationConfig()
    max_steps: int | None = Field(None, ge=1)  # stop early (total step count), e.g. for smoke runs

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, raw: Any) -> Any:
        from pipeline.url_credentials import refuse_credentials

        return refuse_credentials(raw)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        rt = self.runtime
        if rt.use_gpu and rt.gpus_per_worker < 1 and rt.num_workers > 1 and rt.backend != "gloo":
            raise ValueError(
                "runtime.gpus_per_worker < 1 puts several ranks on one GPU, which NCCL refuses; "
                "set runtime.backend: gloo for such a run"
            )
        if rt.use_gpu and rt.gpus_per_worker < 1 and rt.num_workers > 1 and rt.strategy == "fsdp":
            raise ValueError(
                "runtime.strategy fsdp with several ranks on one GPU is not possible: it needs "
                "NCCL, which refuses two ranks on one device, and gloo crashes on FSDP's CUDA "
                "collectives (seen with torch 2.11); use ddp for such a run"
            )
        if self.ldrm.dim % 16:
            raise ValueError(
                f"ldrm.dim must be a multiple of 16 (the LDRM's 3D sin-cos positional embedding), got {self.ldrm.dim}"
            )
        if self.ldrm.dim % self.ldrm.heads:
            raise ValueError(f"ldrm.dim {self.ldrm.dim} must be a multiple of ldrm.heads {self.ldrm.heads}")
        tf = self.backbone.vae.temporal_compression_ratio
        for s in self.stages:
            if (s.num_frames - 1) % tf:
                raise ValueError(f"stage {s.name}: num_frames must be 1 + k*{tf}, got {s.num_frames}")
            down = 2 ** (len(self.backbone.vae.block_out_channels) - 1)
            if s.resolution % (down * self.backbone.transformer.patch_size * self.ldrm.patch_size):
                raise ValueError(f"stage {s.name}: resolution {s.resolution} not divisible by the latent patch grid")
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def _full_stages() -> list[dict]:
    return [
        dict(
            name="static256",
            steps=40_000,
            resolution=256,
            num_frames=13,
            scenes="static",
            frozen=["deformation"],
            losses=["photo", "geo"],
        ),
        dict(
            name="static512",
            steps=40_000,
            resolution=512,
            num_frames=13,
            scenes="static",
            frozen=["deformation"],
            losses=["photo", "geo"],
        ),
        dict(
            name="dynamic",
            steps=20_000,
            resolution=512,
            num_frames=13,
            scenes="dynamic",
            frozen=[],
            losses=["fm", "photo", "geo", "motion"],
        ),
    ]


PRESETS: dict[str, dict[str, Any]] = {
    # speed (docs/TRAINING.md "Speed"): the frozen VAE in bf16 and compiled, cuDNN's fastest convolutions,
    # 8 loader workers per rank (measured to keep ahead of the model); runtime.compile stays opt-in
    "full": dict(
        stages=_full_stages(),
        backbone=dict(vae_precision="bfloat16"),
        data=dict(num_workers=8),
        runtime=dict(cudnn_benchmark=True, compile_vae=True),
    ),
    "mid": dict(
        backbone=dict(
            vae=dict(block_out_channels=[32, 64, 64, 128], layers_per_block=1, latent_channels=16, norm_num_groups=16),
            transformer=dict(
                num_attention_heads=8,
                attention_head_dim=64,
                num_layers=8,
                time_embed_dim=256,
                text_embed_dim=256,
                max_text_seq_length=16,
            ),
        ),
        ldrm=dict(num_blocks=8, dim=512, heads=8, decoder_channels=32),
        loss=dict(lpips_enabled=False),
        stages=[
            dict(
                name="static256",
                steps=1000,
                resolution=256,
                num_frames=9,
                scenes="any",
                frozen=["deformation"],
                losses=["photo", "geo"],
            ),
            dict(
                name="static512",
                steps=1000,
                resolution=512,
                num_frames=9,
                scenes="any",
                frozen=["deformation"],
                losses=["photo", "geo"],
            ),
            dict(name="dynamic", steps=500, resolution=512, num_frames=9, scenes="any"),
        ],
        optim=dict(lr=1e-4, warmup_steps=20),
    ),
    "tiny": dict(
        backbone=dict(
            vae=dict(
                block_out_channels=[8, 8],
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=4,
                temporal_compression_ratio=2,
            ),
            transformer=dict(
                num_attention_heads=2,
                attention_head_dim=8,
                num_layers=1,
                time_embed_dim=16,
                text_embed_dim=16,
                max_text_seq_length=4,
                patch_size=1,
            ),
            camera_channels=4,
        ),
        ldrm=dict(
            num_blocks=2,
            dim=32,
            heads=2,
            decoder_channels=8,
            patch_size=2,
            birth_frame_stride=4,
            depth_max=20.0,
            deform_features=8,
        ),
        loss=dict(lpips_enabled=False, render_frames=2, tracks_per_sample=32),
        stages=[
            dict(
                name="static",
                steps=4,
                resolution=24,
                num_frames=5,
                scenes="any",
                frozen=["deformation"],
                losses=["photo", "geo"],
                max_frame_stride=2,
            ),
            dict(
                name="static_hi",
                steps=4,
                resolution=32,
                num_frames=5,
                scenes="any",
                frozen=["deformation"],
                losses=["photo", "geo"],
                max_frame_stride=2,
            ),
            dict(name="dynamic", steps=4, resolution=32, num_frames=5, scenes="any", max_frame_stride=2),
        ],
        data=dict(shuffle_buffer=8),
        optim=dict(lr=1e-3, warmup_steps=0),
        runtime=dict(
            launcher="ray", num_workers=2, use_gpu=False, bf16=False, ckpt_every=4, log_every=1, tensorboard=True
        ),
        validation=dict(clips=2, sample_steps=2, tracks=32),
    ),
}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class TrainConfigError(ValueError):
    """Why a training config cannot be used, in one line naming the key."""


def make_config(preset: str | None = "tiny", **overrides: Any) -> TrainConfig:
    """A preset with nested overrides, e.g. ``make_config("tiny", runtime={"num_workers": 1})``."""
    from pydantic import ValidationError

    from pipeline.config_errors import one_line

    if preset and preset not in PRESETS:
        raise TrainConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = dict(PRESETS[preset]) if preset else {}
    if preset:
        base["preset"] = preset
    try:
        return TrainConfig.model_validate(_deep_merge(base, overrides))
    except ValidationError as exc:
        raise TrainConfigError(one_line(exc, TrainConfig, "training config")) from None


def load_config(path: str | Path) -> TrainConfig:
    """YAML -> TrainConfig; a ``preset:`` key starts from that preset. Every problem is one
    :class:`TrainConfigError` line (a duplicate key too: YAML would keep only the last)."""
    import yaml

    from pipeline.yaml_load import load_yaml, yaml_error_line

    try:
        with open(path, encoding="utf-8") as f:
            raw = load_yaml(f)
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{path}: not valid YAML: {yaml_error_line(exc)}") from None
    except UnicodeDecodeError as exc:
        raise TrainConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}): not a training config") from None
    except OSError as exc:
        raise TrainConfigError(f"{path}: cannot read the training config ({exc.strerror or exc})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise TrainConfigError(f"{path}: a training config must be a YAML mapping of names to settings")
    preset = raw.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise TrainConfigError(f"{path}: preset must be a name, got {preset!r}")
    try:
        return make_config(preset, **raw) if preset else make_config(None, **raw)
    except TrainConfigError as exc:
        raise TrainConfigError(f"{path}: {exc}") from None
