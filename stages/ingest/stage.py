"""Ingest stage: one planned clip spec -> a validated, QC-checked Clip (or a ClipFailure); or a
scene pass's specs at once, each frame its clips share read once (``ingest_scene``)."""

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
from stages.model_stage import add_stats
from stages.qc import geometric_qc
from stages.selfcheck import gt_self_check

CONTRACT = StageContract(
    name="ingest",
    inputs=("clip spec: dataset, scene, frames (a scene pass's specs together, per the route)",),
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
    try:
        scene.refuse_if_unreadable()
        adapter = adapter_for(cfg, spec["dataset"])
        clip = adapter.load_clip(scene, list(spec["frames"]), _meta(spec, adapter, cfg))
        return _count(_checked(clip, adapter, cfg), len(spec["frames"]), len(spec["frames"]))
    except Exception as exc:  # every failure is data about this clip, never a crash of the shard
        n = len(spec["frames"])
        return _count(ClipFailure.from_exception(spec["clip_id"], "ingest", exc), n, n)


def ingest_scene(specs: list[dict], scene: SceneRef, cfg: BuildConfig) -> list[Clip | ClipFailure]:
    """The clips of one scene pass, read together (``DatasetAdapter.load_clips``: each frame the
    clips share is read once where the adapter can cut clips from their union), then checked one
    by one exactly as :func:`ingest_clip` checks a clip; one result per spec, in order.
    ``ingest.frames_read`` (the frames read for them all) and ``ingest.clip_frames`` are counted
    on the first result."""
    for spec in specs:
        _maybe_inject_fault(spec, cfg)
    try:
        scene.refuse_if_unreadable()
        adapter = adapter_for(cfg, specs[0]["dataset"])
        metas = [_meta(spec, adapter, cfg) for spec in specs]
        read = adapter.load_clips(scene, [list(spec["frames"]) for spec in specs], metas)
    except Exception as exc:  # the adapter itself (its options, its config) failed: every clip
        return [ClipFailure.from_exception(spec["clip_id"], "ingest", exc) for spec in specs]
    out: list[Clip | ClipFailure] = []
    for spec, got in zip(specs, read.clips):
        try:
            if isinstance(got, BaseException):
                raise got
            out.append(_checked(got, adapter, cfg))
        except Exception as exc:  # this clip's failure only
            out.append(ClipFailure.from_exception(spec["clip_id"], "ingest", exc))
    if out:
        _count(out[0], read.frames_read, sum(len(spec["frames"]) for spec in specs))
    return out


def _meta(spec: dict, adapter: DatasetAdapter, cfg: BuildConfig) -> ClipMeta:
    ds = cfg.datasets[spec["dataset"]]
    return ClipMeta(
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


def _checked(clip: Clip, adapter: DatasetAdapter, cfg: BuildConfig) -> Clip:
    """The sources recorded, the ground truth self-checked and geometric QC run; raises ClipError."""
    clip.meta.depth_source = "gt" if clip.depth is not None else "none"
    clip.meta.track_source = "gt" if clip.tracks is not None else "none"
    clip.meta.extra.setdefault("metric_poses", adapter.capabilities.metric_poses)
    if cfg.qc.selfcheck and clip.depth is not None and adapter.capabilities.metric_poses:
        # First: a wrong convention is the root cause of the track and step checks failing too.
        clip.meta.qc["selfcheck"] = gt_self_check(clip, cfg.qc)
    clip.meta.qc.update(geometric_qc(clip, cfg.qc, metric_poses=adapter.capabilities.metric_poses))
    return clip.validate()


def _count(item: Clip | ClipFailure, frames_read: int, clip_frames: int) -> Clip | ClipFailure:
    """``ingest.frames_read``: the frames the adapter read (decoded) for the clip(s);
    ``ingest.clip_frames``: the frames of those clips (more where clips share frames)."""
    add_stats(item, {"ingest.frames_read": frames_read, "ingest.clip_frames": clip_frames})
    return item


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
