"""The one typed configuration object, loaded from YAML, resolved, and recorded with the output.

Everything a build does flows from :class:`BuildConfig`. ``resolved()`` fills per-dataset
defaults from the adapters, so the copy saved in ``OUT/config.resolved.yaml`` is complete:
``status``, ``resume`` and ``verify`` read it and need nothing but the output path.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem; the CLI prints it as one line and exits non-zero."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetConfig(_Strict):
    """One dataset to ingest. Unset fields take the adapter's defaults (see docs/DATASETS.md)."""

    root: str = Field(..., description="dataset root: local path or fsspec URL (s3://, gs://, file://)")
    enabled: bool = True
    clip_length: int | None = Field(None, ge=1)
    frame_stride: int | None = Field(None, ge=1)
    clip_stride: int | None = Field(None, ge=1)
    max_scenes: int | None = Field(None, ge=1)
    max_clips_per_scene: int | None = Field(None, ge=1)
    repeat_weight: float | None = Field(None, gt=0)
    loss_weights: dict[str, float] | None = None
    depth_source: str | None = None
    track_source: str | None = None
    min_depth_m: float | None = Field(None, gt=0)
    max_depth_m: float | None = Field(None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict, description="adapter-specific options (docs/datasets/)")


class StageResources(_Strict):
    """Where a model stage runs: each actor requests `num_gpus` whatever the cluster has at start (an autoscaler adds GPU nodes for it); `num_gpus: 0` is the explicit choice of CPU (fp32, slow)."""

    num_cpus: float = 1.0
    num_gpus: float = Field(1.0, ge=0, description="GPUs per actor, requested from Ray (fractions share a GPU); 0: run on CPU")
    actors: int = Field(1, ge=1, description="actors in the pool (one model each)")

    @model_validator(mode="before")
    @classmethod
    def _no_auto_gpu(cls, v: Any) -> Any:
        if isinstance(v, dict) and "auto_gpu" in v:
            raise ValueError("auto_gpu was removed: model actors now always request num_gpus GPUs (default 1) and "
                             "the cluster's autoscaler provides them; set num_gpus: 0 to run the model on CPU")
        return v


class DepthStageConfig(_Strict):
    """Video Depth Anything for datasets without metric depth (see docs/MODELS.md)."""

    checkpoint: str | None = None
    encoder: Literal["vits", "vitb", "vitl"] = "vitl"
    metric: bool = False
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp16", description="GPU autocast dtype; fp16 measured within 0.15% AbsRel of fp32, bf16 1.8% (bench/RESULTS.md)")
    input_size: int = 518
    compile: bool = False
    allow_random_weights: bool = Field(False, description="demos/benchmarks only: run without a checkpoint; every sample is flagged untrained")
    resources: StageResources = Field(default_factory=lambda: StageResources(num_gpus=1.0))


class AlignStageConfig(_Strict):
    """Scale/shift alignment of relative depth to a metric reference (docs/ALIGNMENT.md)."""

    model: Literal["disparity_affine", "depth_affine", "scale_only"] = "disparity_affine"
    per_frame: bool = False
    robust: Literal["huber", "tukey", "none"] = "tukey"
    drop_on_qc: bool = Field(True, description="drop clips failing alignment QC (False: keep them, QC recorded in meta)")
    megasam_command: str | None = Field(None, description="MegaSaM command template with {frames_dir} {out_npz} {clip_id}")
    megasam_timeout_s: float = 3600.0
    megasam_retries: int = 1
    cache_dir: str | None = Field(None, description="MegaSaM output cache (default OUT/cache/megasam)")
    thresholds: dict[str, float] = Field(default_factory=dict, description="AlignQCThresholds overrides (docs/ALIGNMENT.md)")

    @field_validator("cache_dir")
    @classmethod
    def _local_cache(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError(f"cache_dir {v!r}: the MegaSaM cache must be a path on the node (shared filesystem "
                             "or local disk); URLs are not supported")
        return v


class TrackStageConfig(_Strict):
    """CoTracker3 for datasets without ground-truth tracks (docs/MODELS.md)."""

    checkpoint: str | None = None
    variant: Literal["offline", "online"] = "offline"
    grid_size: int = 16
    query_frames: int = 3
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    allow_random_weights: bool = False
    max_rel_drift: float = Field(0.02, description="static scenes: a lifted track whose median drift exceeds this fraction of its camera distance is not kept")
    min_kept_fraction: float = Field(0.5, description="static scenes: drop a clip when fewer of its tracks stay put")
    drop_on_qc: bool = Field(True, description="drop clips failing track QC (False: keep them, QC recorded in meta)")
    resources: StageResources = Field(default_factory=lambda: StageResources(num_gpus=1.0))


class QCConfig(_Strict):
    """Cheap geometric checks applied to every clip after ingest (reasons go to the manifest)."""

    max_rotation_error: float = 1e-3
    max_step_translation_m: float = Field(50.0, description="a camera moving further between frames is an outlier")
    max_step_rotation_deg: float = 60.0
    max_track_reprojection_px: float = 2.0
    min_valid_depth_fraction: float = 0.01


class FaultConfig(_Strict):
    """Fault-injection hooks for tests and chaos runs. Never set these in production."""

    worker_exit_on_clip: int | None = Field(None, description="the ingest worker of this planned clip ordinal os._exit()s once")
    driver_exit_after_shards: int | None = Field(None, description="the driver os._exit()s after this many shards finish")
    marker_dir: str | None = Field(None, description="where 'already crashed' markers live (default OUT/.faults)")
    trace_dir: str | None = Field(None, description="every ingest attempt leaves an empty file `<clip ordinal>.<Ray node id>.<pid>` here (which node ran which clip), every model actor `actors/<stage>.<Ray node id>.<pid>`")
    ingest_delay_s: float = Field(0.0, ge=0, description="every ingest attempt sleeps this long first (keeps work in flight while a fault is injected)")
    clock_skew_s: float = Field(0.0, description="the driver's wall clock (time.time) runs this many seconds off, as on a host without NTP")
    driver_exit_in_compaction: bool = Field(False, description="the driver os._exit()s inside its first ledger compaction, after writing the output and before deleting the inputs")
    gpus_are_simulated: bool = Field(False, description="the cluster's GPUs are simulated Ray resources: a model actor holding one runs on CPU")


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray address to join; None: RAY_ADDRESS if set, else a local Ray")
    num_cpus: int | None = Field(None, description="CPUs of a local Ray (ignored when joining a cluster)")
    num_gpus: int | None = Field(None, description="GPUs of a local Ray")
    task_retries: int = Field(3, ge=0, description="Ray retries of a task whose worker died")
    actor_restarts: int = Field(3, ge=0, description="restarts of a model actor whose process died")
    shard_retries: int = Field(2, ge=0, description="re-runs of a shard that failed transiently (worker or node lost, out of memory, timeout, storage unreachable) before it is left failed for resume")
    retry_backoff_s: float = Field(30.0, ge=0, description="wait before the first re-run of such a shard; doubles with each re-run")


class LeaseConfig(_Strict):
    """The driver's lease on the output (docs/CLUSTER.md): one driver per output at a time."""

    ttl_s: float = Field(300.0, gt=0, description="a lease not renewed for this long (on the store's clock) may be taken over by another driver")
    heartbeat_s: float | None = Field(None, gt=0, description="renewal period (default ttl_s / 5)")


class StagesConfig(_Strict):
    depth: DepthStageConfig = Field(default_factory=DepthStageConfig)
    align: AlignStageConfig = Field(default_factory=AlignStageConfig)
    tracks: TrackStageConfig = Field(default_factory=TrackStageConfig)


class BuildConfig(_Strict):
    output: str
    datasets: dict[str, DatasetConfig]
    shard_size: int = Field(8, ge=1, description="clips per shard")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of stored frames")
    max_inflight_shards: int = Field(4, ge=1, description="shard pipelines in flight at once (bounds memory)")
    seed: int = 0
    stages: StagesConfig = Field(default_factory=StagesConfig)
    qc: QCConfig = Field(default_factory=QCConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)

    @field_validator("datasets")
    @classmethod
    def _known(cls, v: dict[str, DatasetConfig]) -> dict[str, DatasetConfig]:
        from stages.ingest import ADAPTERS

        unknown = sorted(set(v) - set(ADAPTERS))
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; known: {sorted(ADAPTERS)}")
        if not v:
            raise ValueError("no datasets configured")
        return v

    # ------------------------------------------------------------------------------------
    def resolved(self) -> "BuildConfig":
        """A copy with every per-dataset default filled in from the adapters."""
        from stages.ingest import adapter_class

        out = self.model_copy(deep=True)
        for name, ds in out.datasets.items():
            d = adapter_class(name).defaults
            for fld in ("clip_length", "frame_stride", "clip_stride", "repeat_weight", "loss_weights",
                        "depth_source", "track_source", "min_depth_m", "max_depth_m"):
                if getattr(ds, fld) is None:
                    setattr(ds, fld, getattr(d, fld))
        return out

    def planning_hash(self) -> str:
        """Hash of everything that decides clip ids and shard assignment (not resources)."""
        keys = {name: ds.model_dump(include={"root", "enabled", "clip_length", "frame_stride", "clip_stride",
                                             "max_scenes", "max_clips_per_scene"})
                for name, ds in sorted(self.datasets.items())}
        blob = json.dumps({"datasets": keys, "shard_size": self.shard_size}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def content_fields(self) -> dict[str, Any]:
        """The settings that decide shard bytes, as flat dotted paths: everything except where the
        inputs and the output live and how the work runs (roots, output, ray, lease, fault,
        resources, in-flight limit, the MegaSaM cache location). The one definition used by
        :meth:`content_hash` and by the config-drift check of a resume."""
        d = self.model_dump(mode="json", exclude=RUN_TIME_FIELDS)
        for ds in d["datasets"].values():
            ds.pop("root", None)
        for s in ("depth", "tracks"):
            d["stages"][s].pop("resources", None)
        d["stages"]["align"].pop("cache_dir", None)
        return _flatten(d)

    def content_hash(self) -> str:
        """Hash of everything that decides shard bytes (recorded as provenance in every sample)."""
        return hashlib.sha256(json.dumps(self.content_fields(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def content_diff(self, other: "BuildConfig") -> list[str]:
        """``path: mine -> other`` for every content setting that differs (empty when none does)."""
        a, b = self.content_fields(), other.content_fields()
        return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
                for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]

    def with_overrides(self, overrides: dict | None) -> "BuildConfig":
        """A copy with ``overrides`` merged in field by field (``{"ray": {"address": X}}`` changes
        the address and keeps every other ``ray`` setting)."""
        if not overrides:
            return self.model_copy(deep=True)
        return BuildConfig.model_validate(_deep_merge(self.model_dump(mode="json"), overrides))

    def recorded(self) -> "BuildConfig":
        """What ``config.resolved.yaml`` keeps: the config without fault-injection hooks, which
        belong to one run and must never come back on a resume."""
        out = self.model_copy(deep=True)
        out.fault = FaultConfig()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


RUN_TIME_FIELDS = {"output", "ray", "lease", "fault", "max_inflight_shards"}
_MISSING = object()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


def load_config(path_or_text: str, is_text: bool = False) -> BuildConfig:
    """Parse and validate a YAML config; every problem becomes one :class:`ConfigError`."""
    try:
        if is_text:
            raw = yaml.safe_load(path_or_text)
        else:
            import fsspec

            with fsspec.open(path_or_text, "r") as f:
                raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path_or_text}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("config must be a YAML mapping")
    try:
        return BuildConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"config error at {loc or '<root>'}: {first['msg']}{more}") from None
