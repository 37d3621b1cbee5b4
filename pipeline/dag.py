"""The Ray DAG: ingest -> depth -> align -> tracks -> encode+write, one pipeline per shard.

Shape of the work, per shard of N clips::

    ingest (N CPU tasks) -> depth (1 call to a model actor, N clips batched)
        -> align (N CPU tasks) -> tracks (1 model-actor call, or N CPU tasks) -> write (1 CPU task)

Every stage call returns one object ref per clip (``num_returns=N``) and receives the previous
refs wrapped in a list, so it resolves them one by one: a clip whose worker died even after
Ray's retries becomes a :class:`ClipFailure` instead of failing the shard. Stages whose data a
dataset already has (e.g. ground-truth depth) are not called at all for its shards.

Memory is bounded by ``max_inflight_shards``: the driver submits a new shard pipeline only
when one finishes, so at most that many shards' clips exist in the object store.
Model stages are actor pools whose actors request ``resources.num_gpus`` GPUs each whatever the
cluster has when the build starts, so an autoscaling cluster adds GPU nodes for them (a local
Ray, which cannot grow, is refused up front when it lacks them); ``num_gpus: 0`` runs the model
on CPU, by explicit choice. CPU stages are tasks with retries for worker crashes.

Failures are classified (``pipeline/failures.py``): a clip lost to a transient cause (worker or
node death, out of memory, a timeout) keeps its shard from being published; the shard is run
again after a backoff and, when the failure persists, reported failed-transient for resume.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections import Counter, deque
from typing import Iterator

import ray

from pipeline.clip import Clip, ClipFailure
from pipeline.config import BuildConfig, ConfigError
from pipeline.failures import ShardFailure, describe, is_transient
from pipeline.plan import Plan
from stages.ingest import adapter_class

log = logging.getLogger("d4s")


# ------------------------------------------------------------------------------------------
# Ray setup


def ensure_ray(cfg: BuildConfig) -> None:
    """Join ``cfg.ray.address`` / ``RAY_ADDRESS`` if given, else start a local Ray."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # address="local": always start our own Ray, never join one another process left running
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, **kwargs)


def _joined_cluster(cfg: BuildConfig) -> bool:
    """Whether the driver joined a cluster (which may autoscale) rather than starting its own Ray."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


# ------------------------------------------------------------------------------------------
# Stage tasks (module-level so Ray can ship them)


def _resolve(refs: list, stage: str, clip_ids: list[str]) -> list[Clip | ClipFailure]:
    out = []
    for ref, cid in zip(refs, clip_ids):
        try:
            out.append(ray.get(ref))
        except Exception as exc:  # worker or node lost after Ray's retries (transient), or a bug (permanent)
            out.append(ClipFailure(cid, stage, f"worker failed: {describe(exc, 300)}", transient=is_transient(exc)))
    return out


def _timed(clip, stage: str, t0: float):
    if isinstance(clip, Clip):
        clip.aux.setdefault("timings", {})[stage] = clip.aux.get("timings", {}).get(stage, 0.0) + time.time() - t0
    return clip


@ray.remote
def ingest_task(spec: dict, scene, cfg: BuildConfig):
    from stages.ingest.stage import ingest_clip

    t0 = time.time()
    return _timed(ingest_clip(spec, scene, cfg), "ingest", t0)


@ray.remote
def align_task(refs: list, clip_id: str, cfg: BuildConfig):
    from stages.align.stage import align

    (clip,) = _resolve(refs, "align", [clip_id])
    t0 = time.time()
    return _timed(align(clip, cfg), "align", t0)


@ray.remote
def static_tracks_task(refs: list, clip_id: str, cfg: BuildConfig):
    from stages.tracks.stage import tracks_from_depth

    (clip,) = _resolve(refs, "tracks", [clip_id])
    t0 = time.time()
    return _timed(tracks_from_depth(clip, cfg), "tracks", t0)


@ray.remote
def write_task(shard: dict, clip_ids: list[str], refs: list, cfg: BuildConfig) -> dict:
    from stages.write import write_shard

    clips = _resolve(refs, "write", clip_ids)
    return write_shard(shard, clips, cfg)


class _ModelActor:
    """Holds one model stage's runner; ``process`` takes a shard's clips as one batch."""

    def __init__(self, stage: str, cfg: BuildConfig, device: str):
        self.stage = stage
        if cfg.fault.trace_dir:  # test hook: which node each model actor landed on
            where = os.path.join(cfg.fault.trace_dir, "actors")
            os.makedirs(where, exist_ok=True)
            open(os.path.join(where, f"{stage}.{ray.get_runtime_context().get_node_id()}.{os.getpid()}"), "w").close()
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():  # a broken GPU node: fail the actor (transient), never fall back
                raise RuntimeError(f"{stage} actor was given GPUs {ray.get_gpu_ids()} but CUDA is not available "
                                   f"on node {ray.get_runtime_context().get_node_id()}")
        if stage == "depth":
            from stages.depth.stage import DepthModelStage

            self.impl = DepthModelStage(cfg, device)
        else:
            from stages.tracks.stage import TrackModelStage

            self.impl = TrackModelStage(cfg, device)

    def process(self, refs: list, clip_ids: list[str]):
        clips = _resolve(refs, self.stage, clip_ids)
        t0 = time.time()
        out = self.impl.process(clips)
        per = (time.time() - t0) / max(1, len(out))
        for c in out:
            if isinstance(c, Clip):
                c.aux.setdefault("timings", {})[self.stage] = per
        return out[0] if len(out) == 1 else tuple(out)


ModelActor = ray.remote(_ModelActor)


# ------------------------------------------------------------------------------------------
# The per-shard DAG


class ShardDAG:
    def __init__(self, cfg: BuildConfig, plan: Plan, todo_clips: list[dict]):
        self.cfg = cfg
        self.plan = plan
        self.scene_refs = plan.scene_refs
        datasets = sorted({c["dataset"] for c in todo_clips})
        self.needs_depth = {d for d in datasets if cfg.datasets[d].depth_source != "gt"}
        self.needs_track_model = {d for d in datasets if cfg.datasets[d].track_source == "cotracker"}
        self.needs_static_tracks = {d for d in datasets if cfg.datasets[d].track_source == "depth_static"}
        self._preflight()
        ensure_ray(cfg)
        self.cfg_ref = ray.put(cfg)
        self.pools = {}
        if self.needs_depth:
            self.pools["depth"] = self._pool("depth", cfg.stages.depth.resources)
        if self.needs_track_model:
            self.pools["tracks"] = self._pool("tracks", cfg.stages.tracks.resources)
        self._rr = {k: 0 for k in self.pools}

    def _preflight(self) -> None:
        """Refuse to start when a dataset needs a model that is not configured."""
        dcfg, tcfg = self.cfg.stages.depth, self.cfg.stages.tracks
        if self.needs_depth and not dcfg.checkpoint and not dcfg.allow_random_weights:
            raise ConfigError(f"datasets {sorted(self.needs_depth)} need the depth model: set stages.depth.checkpoint "
                              f"to a Video Depth Anything checkpoint (docs/MODELS.md)")
        if self.needs_track_model and not tcfg.checkpoint and not tcfg.allow_random_weights:
            raise ConfigError(f"datasets {sorted(self.needs_track_model)} need the track model: set "
                              f"stages.tracks.checkpoint to a CoTracker3 checkpoint (docs/MODELS.md)")
        for d in self.needs_depth:
            src = self.cfg.datasets[d].depth_source
            if src == "megasam" and not self.cfg.stages.align.megasam_command:
                raise ConfigError(f"dataset {d} uses MegaSaM as its metric reference: set stages.align.megasam_command "
                                  f"(docs/ALIGNMENT.md)")
            if src == "vda_metric" and not dcfg.metric:
                raise ConfigError(f"dataset {d} wants metric VDA depth but stages.depth.metric is false")
        for d in self.needs_static_tracks:
            if adapter_class(d).capabilities.dynamic:
                raise ConfigError(f"dataset {d} is dynamic: track_source 'depth_static' is only exact for static scenes")

    def _pool(self, stage: str, res) -> list:
        """The stage's actors. They request ``res.num_gpus`` each from Ray, whatever the cluster
        has right now: on an autoscaling cluster that demand is what brings GPU nodes up."""
        gpus = float(res.num_gpus)
        if gpus > 0:
            self._check_gpus_can_come(stage, gpus, res.actors)
        device = "cuda" if gpus > 0 and not self.cfg.fault.gpus_are_simulated else "cpu"
        cpus = res.num_cpus
        total_cpus = ray.cluster_resources().get("CPU", 0)
        n_actors = sum(self.cfg.stages.depth.resources.actors if s == "depth" else self.cfg.stages.tracks.resources.actors
                       for s in ("depth", "tracks") if (s == "depth" and self.needs_depth) or (s == "tracks" and self.needs_track_model))
        if not gpus and cpus * n_actors >= total_cpus:
            # On a small CPU-only cluster (a laptop) reserving CPUs for idle-most-of-the-time model
            # actors would starve the ingest tasks that feed them: share the CPUs instead.
            log.info("model actors share CPUs with tasks (%s CPUs for %s actors)", total_cpus, n_actors)
            cpus = 0
        opts = dict(num_cpus=cpus, num_gpus=gpus,
                    max_restarts=self.cfg.ray.actor_restarts, max_task_retries=self.cfg.ray.task_retries)
        return [ModelActor.options(**opts).remote(stage, self.cfg, device) for _ in range(max(1, res.actors))]

    def _check_gpus_can_come(self, stage: str, gpus: float, actors: int) -> None:
        have = ray.cluster_resources().get("GPU", 0.0)
        if have >= gpus:
            return
        if not _joined_cluster(self.cfg):
            raise ConfigError(f"stages.{stage}.resources.num_gpus is {gpus:g} but this local Ray has {have:g} GPUs and "
                              f"cannot gain any: set stages.{stage}.resources.num_gpus: 0 to run the {stage} model on CPU "
                              f"(fp32, slow), or join a cluster with GPU nodes (--address)")
        log.warning("%s: %d actor(s) request %g GPU(s) each and the cluster has %g now: they start when GPU nodes "
                    "join (an autoscaler adds them for this demand)", stage, actors, gpus, have)

    def _actor(self, stage: str):
        pool = self.pools[stage]
        self._rr[stage] = (self._rr[stage] + 1) % len(pool)
        return pool[self._rr[stage]]

    def submit(self, shard: dict, clips: list[dict]):
        cfg, retries = self.cfg_ref, self.cfg.ray.task_retries
        ids = [c["clip_id"] for c in clips]
        dataset = shard["dataset"]
        refs = [ingest_task.options(max_retries=retries).remote(c, self.scene_refs[(c["dataset"], c["scene"])], cfg)
                for c in clips]
        if clips and dataset in self.needs_depth:
            refs = self._model_call("depth", refs, ids)
            refs = [align_task.options(max_retries=retries).remote([r], cid, cfg) for r, cid in zip(refs, ids)]
        if clips and dataset in self.needs_track_model:
            refs = self._model_call("tracks", refs, ids)
        elif clips and dataset in self.needs_static_tracks:
            refs = [static_tracks_task.options(max_retries=retries).remote([r], cid, cfg) for r, cid in zip(refs, ids)]
        return write_task.options(max_retries=retries).remote(shard, ids, refs, cfg)

    def _model_call(self, stage: str, refs: list, ids: list[str]) -> list:
        out = self._actor(stage).process.options(num_returns=len(refs)).remote(refs, ids)
        return [out] if len(refs) == 1 else list(out)

    def run(self, shards: list[dict], clips_by_shard: dict[str, list[dict]]
            ) -> Iterator[tuple[dict, dict | None, ShardFailure | None]]:
        """Yield (shard, result, failure) as shards finish; at most max_inflight_shards at once.

        A shard that fails transiently is run again after ``ray.retry_backoff_s`` (doubling), up
        to ``ray.shard_retries`` times, before its failure is yielded; a permanent failure is
        yielded at once. Other shards keep flowing while one waits for its re-run.
        """
        queue = deque(shards)
        inflight: dict = {}
        waiting: list[tuple[float, int, dict]] = []  # (due on the monotonic clock, tie-break, shard)
        runs: Counter = Counter()
        tick = itertools.count()
        retries, backoff = self.cfg.ray.shard_retries, self.cfg.ray.retry_backoff_s
        while queue or inflight or waiting:
            now = time.monotonic()
            while waiting and waiting[0][0] <= now:
                queue.appendleft(heapq.heappop(waiting)[2])
            while queue and len(inflight) < self.cfg.max_inflight_shards:
                sh = queue.popleft()
                inflight[self.submit(sh, clips_by_shard[sh["shard_id"]])] = sh
            if not inflight:
                time.sleep(max(0.0, min(1.0, waiting[0][0] - time.monotonic())))
                continue
            timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting else None
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=timeout)
            if not ready:
                continue
            sh = inflight.pop(ready[0])
            runs[sh["shard_id"]] += 1
            try:
                result = ray.get(ready[0])
            except Exception as exc:
                n = runs[sh["shard_id"]]
                failure = ShardFailure(describe(exc), is_transient(exc), n)
                if failure.transient and n <= retries:
                    delay = backoff * 2 ** (n - 1)
                    log.warning("shard %s failed transiently (%s); run %d of %d in %.1f s", sh["shard_id"],
                                failure.message, n + 1, retries + 1, delay)
                    heapq.heappush(waiting, (time.monotonic() + delay, next(tick), sh))
                    continue
                yield sh, None, failure
                continue
            yield sh, result, None
