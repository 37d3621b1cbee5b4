"""The one typed configuration object, loaded from YAML, resolved, and recorded with the output.

Everything a build does flows from :class:`BuildConfig`. ``resolved()`` fills per-dataset
defaults from the adapters, so the copy saved in ``OUT/config.resolved.yaml`` is complete:
``status``, ``resume`` and ``verify`` read it and need nothing but the output path.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config_errors import FieldError, describe, one_line
from stages.align.qc import AlignQCThresholds

# Where a dataset's metric depth comes from: its own ground truth, the depth model aligned to a
# reference (MegaSaM, the metric VDA model, or the dataset's sparse metric tracks), see docs/ALIGNMENT.md.
DepthSource = Literal["gt", "vda", "vda_metric", "megasam", "sparse"]
# Where its 3D tracks come from: ground truth, CoTracker3 lifted with depth, exact tracks from
# depth and poses (static scenes only), or none.
TrackSource = Literal["gt", "cotracker", "depth_static", "none"]
LossTerm = Literal["depth", "motion", "photo"]  # the per-sample loss weights the trainer reads
VDAEncoder = Literal["vits", "vitb", "vitl"]
ModelDtype = Literal["fp32", "bf16", "fp16"]
TrackerVariant = Literal["offline", "online"]


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
    repeat_weight: float | None = Field(
        None,
        gt=0,
        description="how often training draws this dataset's clips: multiplies its mixture weight (training's data.repeat replaces it)",
    )
    loss_weights: dict[LossTerm, float] | None = Field(None, description="per-sample loss weights (missing terms: 1)")
    depth_source: DepthSource | None = Field(None, description="where metric depth comes from (docs/ALIGNMENT.md)")
    track_source: TrackSource | None = Field(None, description="where 3D tracks come from (docs/MODELS.md)")
    min_depth_m: float | None = Field(None, gt=0)
    max_depth_m: float | None = Field(None, gt=0)
    options: dict[str, Any] = Field(
        default_factory=dict, description="the adapter's options: datasets.<name>.options below"
    )
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of the scenes held out for validation, chosen by scene id (pipeline/split.py); recorded as split 'val' in index.parquet, never read by training",
    )

    @model_validator(mode="after")
    def _sensible_values(self) -> "DatasetConfig":
        if self.min_depth_m is not None and self.max_depth_m is not None and self.min_depth_m >= self.max_depth_m:
            raise ValueError(f"min_depth_m {self.min_depth_m:g} must be below max_depth_m {self.max_depth_m:g}")
        bad = {k: v for k, v in (self.loss_weights or {}).items() if not v >= 0}
        if bad:
            raise ValueError(f"loss_weights must be >= 0, got {bad}")
        return self


class StageResources(_Strict):
    """Where a model stage runs: each actor requests `num_gpus` whatever the cluster has at start (an autoscaler adds GPU nodes for it); `num_gpus: 0` is the explicit choice of CPU (fp32, slow)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(
        1.0, ge=0, description="GPUs per actor, requested from Ray (fractions share a GPU); 0: run on CPU"
    )
    actors: int = Field(1, ge=1, description="actors in the pool (one model each)")

    @model_validator(mode="before")
    @classmethod
    def _no_auto_gpu(cls, v: Any) -> Any:
        if isinstance(v, dict) and "auto_gpu" in v:
            raise ValueError(
                "auto_gpu was removed: model actors now always request num_gpus GPUs (default 1) and "
                "the cluster's autoscaler provides them; set num_gpus: 0 to run the model on CPU"
            )
        return v


class DepthStageConfig(_Strict):
    """Video Depth Anything for datasets without metric depth (see docs/MODELS.md)."""

    checkpoint: str | None = None
    encoder: VDAEncoder = "vitl"
    metric: bool = False
    dtype: ModelDtype = Field(
        "fp16",
        description="GPU autocast dtype; fp16 measured within 0.15% AbsRel of fp32, bf16 1.8% (bench/RESULTS.md)",
    )
    input_size: int = Field(518, ge=14)
    compile: bool = False
    allow_random_weights: bool = Field(
        False, description="demos/benchmarks only: run without a checkpoint; every sample is flagged untrained"
    )
    resources: StageResources = Field(default_factory=lambda: StageResources(num_gpus=1.0))


class AlignStageConfig(_Strict):
    """Scale/shift alignment of relative depth to a metric reference (docs/ALIGNMENT.md)."""

    model: Literal["disparity_affine", "depth_affine", "scale_only"] = "disparity_affine"
    per_frame: bool = False
    robust: Literal["huber", "tukey", "none"] = "tukey"
    drop_on_qc: bool = Field(
        True, description="drop clips failing alignment QC (False: keep them, QC recorded in meta)"
    )
    megasam_command: str | None = Field(
        None,
        description="MegaSaM command template with {frames_dir} {out_npz} {clip_id} (one run per scene or segment; {clip_id} is the run id)",
    )
    megasam_timeout_s: float = Field(3600.0, gt=0)
    megasam_retries: int = Field(1, ge=0)
    megasam_num_gpus: float = Field(
        1.0,
        ge=0,
        description="GPUs requested per MegaSaM run whatever the cluster has at start (the assigned GPU is the command's CUDA_VISIBLE_DEVICES); 0: run it without one",
    )
    megasam_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per MegaSaM run")
    megasam_version: str = Field(
        "", description="part of the MegaSaM cache key: change it when the MegaSaM installation or checkpoints change"
    )
    megasam_cache_max_side: int = Field(
        256,
        ge=0,
        description="cached MegaSaM depth is stored at most this many pixels on its long side (0: as MegaSaM wrote it)",
    )
    cache_dir: str | None = Field(
        None, description="MegaSaM result cache: a path or store URL (default OUT/cache/megasam)"
    )
    thresholds: AlignQCThresholds = Field(
        default_factory=AlignQCThresholds, description="keep/drop thresholds of alignment QC (docs/ALIGNMENT.md)"
    )


class TrackStageConfig(_Strict):
    """CoTracker3 for datasets without ground-truth tracks (docs/MODELS.md)."""

    checkpoint: str | None = None
    variant: TrackerVariant = "offline"
    grid_size: int = Field(16, ge=1)
    query_frames: int = Field(3, ge=1)
    dtype: ModelDtype = "bf16"
    allow_random_weights: bool = False
    max_rel_drift: float = Field(
        0.02,
        gt=0,
        description="static scenes: a lifted track whose median drift exceeds this fraction of its camera distance is not kept",
    )
    min_kept_fraction: float = Field(
        0.5, ge=0, le=1, description="static scenes: drop a clip when fewer of its tracks stay put"
    )
    drop_on_qc: bool = Field(True, description="drop clips failing track QC (False: keep them, QC recorded in meta)")
    resources: StageResources = Field(default_factory=lambda: StageResources(num_gpus=1.0))


class QCConfig(_Strict):
    """Cheap geometric checks applied to every clip after ingest (reasons go to the manifest)."""

    max_rotation_error: float = 1e-3
    max_step_translation_m: float = Field(50.0, description="a camera moving further between frames is an outlier")
    max_step_rotation_deg: float = 60.0
    max_track_reprojection_px: float = 2.0
    min_valid_depth_fraction: float = Field(0.01, ge=0, le=1)
    selfcheck: bool = Field(
        True,
        description="reproject ground-truth depth between frames with the clip's cameras and "
        "fail clips whose geometry disagrees with itself (stages/selfcheck.py)",
    )
    selfcheck_min_agreement: float = Field(
        0.78,
        ge=0,
        le=1,
        description="share of reprojected depth pixels that must "
        "agree in depth and colour (docs/DATASETS.md, ground-truth self-check)",
    )
    selfcheck_min_overlap: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of a frame's depth pixels its neighbouring frame must see under the clip's cameras",
    )
    selfcheck_pixels: int = Field(2048, ge=64, description="pixels sampled per frame (a regular grid)")


class FaultConfig(_Strict):
    """Fault-injection hooks for tests and chaos runs. Never set these in production."""

    worker_exit_on_clip: int | None = Field(
        None, description="the ingest worker of this planned clip ordinal os._exit()s once"
    )
    driver_exit_after_shards: int | None = Field(
        None, description="the driver os._exit()s after this many shards finish"
    )
    marker_dir: str | None = Field(None, description="where 'already crashed' markers live (default OUT/.faults)")
    trace_dir: str | None = Field(
        None,
        description="every ingest attempt leaves an empty file `<clip ordinal>.<Ray node id>.<pid>` here (which node ran which clip), every model actor `actors/<stage>.<Ray node id>.<pid>` and its start-up (started, model built, ready: wall-clock seconds) in `startup/<stage>.<pid>`, per call, the wall-clock start and end of its hold on the model in `holds/<stage>.<pid>`, and, per stage task or model call, `start end clip_id...` of its body in `tasks/<stage>.<pid>`",
    )
    ingest_delay_s: float = Field(
        0.0,
        ge=0,
        description="every ingest attempt sleeps this long first (keeps work in flight while a fault is injected)",
    )
    actor_start_delay_s: float = Field(
        0.0,
        ge=0,
        description="every model actor sleeps this long before building its model (a slow start-up, as a GPU node's)",
    )
    hang_stage: Literal["ingest", "depth"] | None = Field(
        None, description="this stage hangs (once, marker in marker_dir) on the clip of ordinal hang_on_clip"
    )
    hang_on_clip: int | None = Field(None, description="planned clip ordinal that hang_stage hangs on")
    clock_skew_s: float = Field(
        0.0, description="the driver's wall clock (time.time) runs this many seconds off, as on a host without NTP"
    )
    driver_exit_in_compaction: bool = Field(
        False,
        description="the driver os._exit()s inside its first ledger compaction, after writing the output and before deleting the inputs",
    )
    gpus_are_simulated: bool = Field(
        False, description="the cluster's GPUs are simulated Ray resources: a model actor holding one runs on CPU"
    )


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray address to join; None: RAY_ADDRESS if set, else a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (ignored when joining a cluster)")
    num_gpus: int | None = Field(None, description="GPUs of a local Ray")
    task_retries: int = Field(3, ge=0, description="Ray retries of a task whose worker died")
    actor_restarts: int = Field(3, ge=0, description="restarts of a model actor whose process died")
    shard_retries: int = Field(
        2,
        ge=0,
        description="re-runs of a shard that failed transiently (worker or node lost, out of memory, timeout, storage unreachable) before it is left failed for resume",
    )
    retry_backoff_s: float = Field(
        30.0, ge=0, description="wait before the first re-run of such a shard; doubles with each re-run"
    )
    unplaceable_wait_s: float = Field(
        1800.0,
        gt=0,
        description="on a joined cluster, how long a model actor or MegaSaM run that no node can hold waits for its autoscaler to add one before the build stops, naming the setting",
    )


class LeaseConfig(_Strict):
    """The driver's lease on the output (docs/CLUSTER.md): one driver per output at a time."""

    ttl_s: float = Field(
        300.0,
        gt=0,
        description="a lease not renewed for this long (on the store's clock) may be taken over by another driver",
    )
    heartbeat_s: float | None = Field(None, gt=0, description="renewal period (default ttl_s / 5)")

    @model_validator(mode="after")
    def _renewed_in_time(self) -> "LeaseConfig":
        # the holder fences itself when not renewed for 80 % of the TTL (manifests/lease.py)
        if self.heartbeat_s is not None and self.heartbeat_s >= 0.8 * self.ttl_s:
            raise ValueError(
                f"heartbeat_s {self.heartbeat_s:g} must be below 80 % of ttl_s {self.ttl_s:g}: the driver would "
                "stop itself as 'lease lost' before its first renewal"
            )
        return self


class ScenePassConfig(_Strict):
    """Whole-scene passes of the depth model, MegaSaM and the alignment (docs/STAGES.md)."""

    granularity: Literal["scene", "clip"] = Field(
        "scene",
        description="'scene': the depth model, MegaSaM and the metric fit run once over every scene's frame sequence; 'clip': once per clip (the older path)",
    )
    max_frames: int = Field(
        512,
        ge=48,
        description="a longer scene sequence is cut into overlapping segments, joined like Video Depth Anything joins its windows",
    )
    overlap_frames: int = Field(32, ge=4, description="frames shared by consecutive segments")

    @model_validator(mode="after")
    def _overlap_fits(self) -> "ScenePassConfig":
        if self.overlap_frames * 2 > self.max_frames:
            raise ValueError(
                f"overlap_frames {self.overlap_frames} must be at most half of max_frames {self.max_frames}"
            )
        return self


class StagesConfig(_Strict):
    depth: DepthStageConfig = Field(default_factory=DepthStageConfig)
    align: AlignStageConfig = Field(default_factory=AlignStageConfig)
    tracks: TrackStageConfig = Field(default_factory=TrackStageConfig)
    scene: ScenePassConfig = Field(default_factory=ScenePassConfig)


# Where things live (dataset roots, the output, the MegaSaM cache), how the build runs (Ray,
# the lease, resources, shards in flight, the deadline) and test hooks never change a byte of a
# shard; everything else does.
_NOT_CONTENT = {"output", "ray", "lease", "fault", "max_inflight_shards", "shard_deadline_s"}


class BuildConfig(_Strict):
    output: str
    datasets: dict[str, DatasetConfig]
    shard_size: int = Field(8, ge=1, description="clips per shard")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of stored frames")
    depth_png_level: int = Field(
        6,
        ge=0,
        le=9,
        description="zlib level of the depth PNGs (lossless at every level): the encode stage's largest CPU cost. "
        "Level 1 takes 1/3 of level 6's time or less, for 47-61 % more depth bytes on smooth depth (ground truth, a "
        "trained model's) (bench/bench_depth_png.py; bench/RESULTS.md, session 10); for GPU nodes short of cores",
    )
    max_inflight_shards: int = Field(
        8,
        ge=1,
        description="shard pipelines in flight at once (bounds memory); they must cover a shard's time in the CPU "
        "stages around the model actors, about 4-5 per GPU model actor on the bench host, and the MegaSaM runs the "
        "GPUs fit (docs/CLUSTER.md; the build warns at its start and, once it has measured its models waiting, "
        "during the run)",
    )
    shard_deadline_s: float = Field(
        21600.0,
        gt=0,
        description="seconds: a shard pipeline none of whose tasks finishes for this long (a stage hangs) is cancelled and recorded failed; resume redoes it. Longer than any one stage (a MegaSaM run with its retries); there is no switching it off",
    )
    seed: int = 0
    stages: StagesConfig = Field(default_factory=StagesConfig)
    qc: QCConfig = Field(default_factory=QCConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, raw: Any) -> Any:
        from pipeline.url_credentials import refuse_credentials

        return refuse_credentials(raw)

    @field_validator("shard_deadline_s", mode="before")
    @classmethod
    def _a_deadline(cls, v: Any) -> Any:
        if v is None:
            raise ValueError(
                "a number of seconds: the deadline cannot be switched off (a hung stage would hold its shard, and "
                "the build, for ever); for very long stages give a long one, e.g. 172800"
            )
        return v

    @field_validator("datasets")
    @classmethod
    def _known(cls, v: dict[str, DatasetConfig]) -> dict[str, DatasetConfig]:
        from stages.ingest import ADAPTERS

        unknown = sorted(set(v) - set(ADAPTERS))
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; known: {sorted(ADAPTERS)}")
        if not v:
            raise ValueError("no datasets configured")
        for name, ds in v.items():
            _check_against_adapter(name, ds)
        return v

    # ------------------------------------------------------------------------------------
    def resolved(self) -> "BuildConfig":
        """A copy with every per-dataset default filled in from the adapters."""
        from stages.ingest import adapter_class

        out = self.model_copy(deep=True)
        for name, ds in out.datasets.items():
            d = adapter_class(name).defaults
            for fld in (
                "clip_length",
                "frame_stride",
                "clip_stride",
                "repeat_weight",
                "loss_weights",
                "depth_source",
                "track_source",
                "min_depth_m",
                "max_depth_m",
            ):
                if getattr(ds, fld) is None:
                    setattr(ds, fld, getattr(d, fld))
            ds.options = adapter_class(name).validate_options(ds.options).model_dump(mode="json")
        return out

    def planning_hash(self) -> str:
        """Hash of everything that decides clip ids and shard assignment (not roots, not resources)."""
        from pipeline.stage_routes import whole_scene_shards

        res = self.resolved()
        keys = {
            name: {
                **ds.model_dump(
                    include={
                        "enabled",
                        "clip_length",
                        "frame_stride",
                        "clip_stride",
                        "max_scenes",
                        "max_clips_per_scene",
                    }
                ),
                "whole_scene_shards": whole_scene_shards(res, name),
            }
            for name, ds in sorted(self.datasets.items())
        }
        blob = json.dumps({"datasets": keys, "shard_size": self.shard_size}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def content_fields(self, dataset: str | None = None) -> dict:
        """The settings that decide shard bytes, as plain data: the whole config less where the
        inputs and the output live and how the build runs. With ``dataset``, only that dataset's
        entry (another dataset's settings never change its shards). The one definition used by
        :meth:`content_hash` (each sample's ``meta.config_hash``) and by whoever compares two
        builds' settings: a build moved to other roots or another output has the same content.
        Computed on the resolved config, so a recorded and a fresh copy of one config agree."""
        d = self.resolved().model_dump(mode="json", exclude=_NOT_CONTENT)
        for ds in d["datasets"].values():
            ds.pop("root")
            ds.pop("val_fraction")  # the split is recorded in index.parquet only; no shard byte depends on it
        if dataset is not None:
            d["datasets"] = {dataset: d["datasets"][dataset]}
        for s in ("depth", "tracks"):
            d["stages"][s].pop("resources")
        for k in ("cache_dir", "megasam_num_gpus", "megasam_num_cpus"):  # where and on what, not what
            d["stages"]["align"].pop(k)
        return d

    def content_hash(self, dataset: str | None = None) -> str:
        """Hash of :meth:`content_fields` (recorded as provenance in every sample of ``dataset``)."""
        blob = json.dumps(self.content_fields(dataset), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def content_diff(self, other: "BuildConfig") -> list[str]:
        """``path: mine -> other`` for every content setting (:meth:`content_fields`, flattened to
        dotted paths) that differs; empty when none does. A moved dataset root, another output or
        other resources are not content, so they never show here."""
        a, b = _flatten(self.content_fields()), _flatten(other.content_fields())
        return [
            f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k, _MISSING) != b.get(k, _MISSING)
        ]

    def with_overrides(self, overrides: dict | None) -> "BuildConfig":
        """A copy with ``overrides`` merged in field by field (``{"ray": {"address": X}}`` changes
        the address and keeps every other ``ray`` setting)."""
        if not overrides:
            return self.model_copy(deep=True)
        return BuildConfig.model_validate(_deep_merge(self.model_dump(mode="json"), overrides))

    def with_absolute_locations(self) -> "BuildConfig":
        """A copy whose local relative locations (the output, the dataset roots, the MegaSaM
        cache folder) are absolute, taken against this working directory: the recorded config
        then serves `d4s resume` from any folder. URLs and content settings (checkpoint paths,
        commands: they are part of what the shards hold) are left as written."""

        def absolute(p: str | None) -> str | None:
            return p if p is None or "://" in p else os.path.abspath(os.path.expanduser(p))

        out = self.model_copy(deep=True)
        out.output = absolute(out.output)
        for ds in out.datasets.values():
            ds.root = absolute(ds.root)
        out.stages.align.cache_dir = absolute(out.stages.align.cache_dir)
        return out

    def recorded(self) -> "BuildConfig":
        """What ``config.resolved.yaml`` keeps: the config without fault-injection hooks, which
        belong to one run and must never come back on a resume."""
        out = self.model_copy(deep=True)
        out.fault = FaultConfig()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_against_adapter(name: str, ds: DatasetConfig) -> None:
    """Options valid for the dataset's adapter, and routing its data can serve (else a FieldError)."""
    from stages.ingest import adapter_class

    adapter = adapter_class(name)
    try:
        adapter.validate_options(ds.options)
    except ValidationError as exc:
        loc, msg = describe(exc.errors()[0], adapter.options_model)
        raise FieldError(("datasets", name, "options", *loc), msg) from None
    caps, d = adapter.capabilities, adapter.defaults
    depth, tracks = ds.depth_source or d.depth_source, ds.track_source or d.track_source
    if depth == "gt" and not caps.has_depth:
        usable = ["vda", "vda_metric", "megasam"] + (["sparse"] if caps.has_tracks else [])
        raise FieldError(
            ("datasets", name, "depth_source"),
            "'gt', but the dataset has no ground-truth depth; use " + " or ".join(repr(u) for u in usable),
        )
    if depth == "sparse" and not caps.has_tracks:
        raise FieldError(
            ("datasets", name, "depth_source"),
            "'sparse' aligns to the dataset's metric 3D tracks, and it has no metric 3D tracks",
        )
    if tracks == "gt" and not caps.has_tracks:
        raise FieldError(
            ("datasets", name, "track_source"),
            "'gt', but the dataset has no ground-truth tracks; use 'cotracker', 'depth_static' or 'none'",
        )
    if tracks == "depth_static" and caps.dynamic:
        raise FieldError(
            ("datasets", name, "track_source"),
            "'depth_static' is only exact for static scenes and the dataset is dynamic; use 'cotracker'",
        )


OUTPUT_CONFIG_NAME = "config.resolved.yaml"  # the resolved config, recorded in every output


def load_output_config(output: str) -> BuildConfig:
    """The config an output was built with (``OUT/config.resolved.yaml``; older recordings migrated),
    with ``output`` set to where the output is now: a copied or moved output (``cp -a``, a bucket
    synced to local disk) is resumed, checked and reported where it was given, never at the place
    its recorded config names (``output`` is no content setting: no shard byte depends on it)."""
    from pipeline.storage import Store

    store = Store(output)
    if not store.exists(OUTPUT_CONFIG_NAME):
        raise ConfigError(f"{output} is not a d4s output (no {OUTPUT_CONFIG_NAME}); run `d4s build` first")
    try:
        text = _migrate_recorded(store.read_text(OUTPUT_CONFIG_NAME))
        recorded = load_config(text, is_text=True)
    except (yaml.YAMLError, UnicodeDecodeError, ConfigError) as exc:
        raise ConfigError(f"{store.display(OUTPUT_CONFIG_NAME)}: {exc}") from None
    return recorded.model_copy(update={"output": output})


def _migrate_recorded(text: str) -> str:
    """Configs recorded before GPU placement became explicit carry ``resources.auto_gpu``: drop it
    and keep the recorded ``num_gpus`` (0 = CPU, as such demo outputs ran on a machine without GPUs)."""
    raw = yaml.safe_load(text)
    stages = raw.get("stages") if isinstance(raw, dict) else None
    changed = False
    for st in stages.values() if isinstance(stages, dict) else ():
        res = st.get("resources") if isinstance(st, dict) else None
        if isinstance(res, dict) and "auto_gpu" in res:
            res.pop("auto_gpu")
            changed = True
    return yaml.safe_dump(raw, sort_keys=False) if changed else text


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


def read_text_file(path: str, what: str) -> str:
    """The text of a file a user named (local path or fsspec URL); a missing file, a folder, bytes
    that are not UTF-8 or a read error become one :class:`ConfigError` naming it."""
    import fsspec

    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None


def load_config(path_or_text: str, is_text: bool = False) -> BuildConfig:
    """Parse and validate a YAML config; every problem becomes one :class:`ConfigError`."""
    from pipeline.yaml_load import load_yaml, yaml_error_line

    where = "config" if is_text else f"config {path_or_text}"
    try:
        raw = load_yaml(path_or_text if is_text else read_text_file(path_or_text, "config file"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {yaml_error_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a YAML mapping of settings")
    try:
        return BuildConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(one_line(exc, BuildConfig)) from None
