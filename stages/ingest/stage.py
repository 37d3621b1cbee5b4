"""Ingest stage: one planned clip spec -> a validated, QC-checked Clip (or a ClipFailure)."""

from __future__ import annotations

import os
import time
from functools import lru_cache

from pipeline import __version__
from pipeline.clip import Clip, ClipFailure, ClipMeta
from pipeline.config import BuildConfig
from stages.contract import StageContract
from stages.ingest import adapter_for_dataset
from stages.ingest.base import DatasetAdapter, SceneRef
from stages.qc import geometric_qc
from stages.selfcheck import gt_self_check

CONTRACT = StageContract(
    name="ingest",
    inputs=("clip spec: dataset, scene, frames",),
    outputs=("rgb", "intrinsics", "c2w", "depth? (gt)", "tracks? (gt)", "meta"),
    runs_as="task (CPU, num_cpus=1)",
    acts_when="always",
    errors="unreadable/truncated/missing files, bad values, shape or count mismatches, ground-truth self-check, geometric QC",
)


@lru_cache(maxsize=32)
def _adapter(name: str, dataset_json: str) -> DatasetAdapter:
    from pipeline.config import DatasetConfig

    return adapter_for_dataset(name, DatasetConfig.model_validate_json(dataset_json))


def adapter_for(cfg: BuildConfig, dataset: str) -> DatasetAdapter:
    """The dataset's adapter, one per worker process and dataset config (adapters cache what they parse)."""
    return _adapter(dataset, cfg.datasets[dataset].model_dump_json())


def ingest_clip(spec: dict, scene: SceneRef, cfg: BuildConfig) -> Clip | ClipFailure:
    """Read one clip with its dataset's adapter, self-check its ground truth and run geometric QC on it."""
    _maybe_inject_fault(spec, cfg)
    ds = cfg.datasets[spec["dataset"]]
    try:
        adapter = adapter_for(cfg, spec["dataset"])
        meta = ClipMeta(
            dataset=spec["dataset"],
            scene=spec["scene"],
            clip_id=spec["clip_id"],
            frame_indices=list(spec["frames"]),
            dynamic=adapter.capabilities.dynamic,
            real=adapter.capabilities.real,
            loss_weights=dict(ds.loss_weights),
            adapter_version=f"{adapter.name}/{adapter.version}",
            config_hash=cfg.content_hash(spec["dataset"]),
            d4s_version=__version__,
        )
        clip = adapter.load_clip(scene, list(spec["frames"]), meta)
        clip.meta.depth_source = "gt" if clip.depth is not None else "none"
        clip.meta.track_source = "gt" if clip.tracks is not None else "none"
        clip.meta.extra.setdefault("metric_poses", adapter.capabilities.metric_poses)
        if cfg.qc.selfcheck and clip.depth is not None and adapter.capabilities.metric_poses:
            # First: a wrong convention is the root cause of the track and step checks failing too.
            clip.meta.qc["selfcheck"] = gt_self_check(clip, cfg.qc)
        clip.meta.qc.update(geometric_qc(clip, cfg.qc, metric_poses=adapter.capabilities.metric_poses))
        return clip.validate()
    except Exception as exc:  # every failure is data about this clip, never a crash of the shard
        return ClipFailure.from_exception(spec["clip_id"], "ingest", exc)


def _maybe_inject_fault(spec: dict, cfg: BuildConfig) -> None:
    """Test hooks: trace the node of every attempt, slow it down, let the worker process die
    (no exception, no cleanup) once on the k-th clip, or hang once on it."""
    fault = cfg.fault
    if fault.trace_dir:
        try:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        except Exception:
            node = "local"
        os.makedirs(fault.trace_dir, exist_ok=True)
        open(os.path.join(fault.trace_dir, f"{spec['ordinal']}.{node}.{os.getpid()}"), "w").close()
    if fault.ingest_delay_s:
        time.sleep(fault.ingest_delay_s)
    if fault.hang_stage == "ingest" and spec["ordinal"] == fault.hang_on_clip:
        marker = os.path.join(fault.marker_dir or os.path.join(cfg.output, ".faults"), f"hang_ingest_{spec['ordinal']}")
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(10**6)  # hangs once: the shard deadline must cancel it
    k = fault.worker_exit_on_clip
    if k is None or spec["ordinal"] != k:
        return
    marker_dir = fault.marker_dir or os.path.join(cfg.output, ".faults")
    os.makedirs(marker_dir, exist_ok=True)
    marker = os.path.join(marker_dir, f"worker_exit_{k}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(17)
