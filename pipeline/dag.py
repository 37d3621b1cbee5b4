"""The Ray DAG: ingest -> depth | megasam -> align -> tracks -> encode+write, one pipeline per shard.

A dataset's stages, their granularity and resources come from ``pipeline/stage_routes.py``.
Shape of the work, per shard of N clips in S scene passes (S = N with
``stages.scene.granularity: clip``)::

    ingest (N CPU tasks) -> depth (1 call to a model actor: S passes, each scene's frames once)
                         -> megasam (S GPU tasks, beside depth, reading the ingested clips)
        -> align (S CPU tasks: one metric fit per scene, cut into its clips)
        -> tracks (1 model-actor call, or N CPU tasks) -> write (1 CPU task)

Every stage call returns one object ref per clip (``num_returns``) and receives the previous
stage's refs as task arguments, so Ray starts it once they exist, on a node that holds them. (A
task handed refs inside a list started at once and waited in ``ray.get``, holding a worker
process while Ray started more for the work meanwhile: 44 at once on a 16-CPU GPU node, 14 on the
2-CPU demo; bench/RESULTS.md. A waiting task keeps its GPUs: MegaSaM held one while its scene was
still being read.) A stage's failure on a clip is a :class:`ClipFailure` value that
flows on to the write task (``_or_failures`` catches what escapes a stage); only a worker or node
lost even after Ray's retries is an error, which reaches the write task and fails the shard
transiently, as a clip failed transiently does (the shard is run again, then left for resume).
Stages whose data a dataset already has (e.g. ground-truth depth) are not called at all for its
shards.

Memory is bounded by ``max_inflight_shards``: the driver submits a new shard pipeline only
when one finishes, so at most that many shards' clips exist in the object store.
Model stages are actor pools (two calls in flight per actor, so the next shard's inputs arrive
while the model runs) whose actors request their declared ``num_gpus`` each, and MegaSaM runs
as tasks requesting ``stages.align.megasam_num_gpus``, whatever the cluster has when the build
starts: an autoscaling cluster adds GPU nodes for that demand (a local Ray, which cannot grow,
is refused up front when it lacks them). ``num_gpus: 0`` runs a model on CPU, by explicit
choice. CPU stages are tasks with retries for worker crashes.

Failures are classified (``pipeline/failures.py``): a clip lost to a transient cause (worker or
node death, out of memory, a timeout) keeps its shard from being published; the shard is run
again after a backoff and, when the failure persists, reported failed-transient for resume.
A shard pipeline none of whose tasks finishes for ``shard_deadline_s`` (a stage hangs) is
cancelled (a model actor it still occupies is replaced) and recorded failed (transient: it is
not re-run in this build, which already waited that long, but ``resume`` redoes it); shards
that lose their calls on a replaced actor are re-run like other transient failures. The clock
restarts whenever one of its tasks finishes, so a shard waiting for the cluster behind other
shards is not cut, and no stage may take longer than the deadline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator

import ray

from pipeline.clip import Clip, ClipFailure
from pipeline.config import BuildConfig, ConfigError
from pipeline.failures import ShardFailure, describe, device_fault_text, is_transient
from pipeline.feed import feed_for
from pipeline.plan import Plan
from pipeline.stage_routes import route
from stages.ingest import adapter_class
from stages.model_stage import add_stats

log = logging.getLogger("d4s")


# ------------------------------------------------------------------------------------------
# Ray setup


def ensure_ray(cfg: BuildConfig) -> None:
    """Join ``cfg.ray.address`` / ``RAY_ADDRESS`` if given, else start a local Ray."""
    if ray.is_initialized():
        return
    address = _cluster_address(cfg)
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        check_cluster_address(cfg)
        ray.init(address=address, **kwargs)
    else:
        # address="local": always start our own Ray, never join one another process left running.
        # Ray >= 2.60 leaves CUDA_VISIBLE_DEVICES unset for a task given no GPU (it sees them all):
        # its switch for the older "" is inherited by the workers this Ray starts (stages/gpus.py)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, **kwargs)


def check_cluster_address(cfg: BuildConfig, timeout_s: float = 10.0) -> None:
    """Refuse, in one line, a cluster address where nothing answers: ``ray.init`` retries such an
    address without end (and does not stop on Ctrl-C). A TCP connection to its host and port,
    with a deadline; ``auto`` and addresses without a port are left to Ray."""
    import socket

    address = _cluster_address(cfg)
    if not address:
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"ray address {address}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
            "is the Ray head running there (`ray start --head`), and is the address its GCS address?"
        ) from None


def _cluster_address(cfg: BuildConfig) -> str | None:
    """The cluster to join (``ray.address``, else ``RAY_ADDRESS``); None, or Ray's ``local``, for
    a Ray of our own (with ``ray.num_cpus`` / ``num_gpus``)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    return None if not address or address.strip().lower() == "local" else address


def _joined_cluster(cfg: BuildConfig) -> bool:
    """Whether the driver joined a cluster (which may autoscale) rather than starting its own Ray."""
    return _cluster_address(cfg) is not None


# ------------------------------------------------------------------------------------------
# Stage tasks (module-level so Ray can ship them)


def _or_failures(stage: str, clip_ids: list[str], work):
    """``work()``, or, when it raises, one :class:`ClipFailure` per clip (a list). The stages turn
    their own failures into clip failures; this is the backstop for what escapes them (a bug): an
    exception out of a task would fail every task after it and so the whole shard."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - the clips' failure, with the reason
        return [ClipFailure(cid, stage, describe(exc, 300), transient=is_transient(exc)) for cid in clip_ids]


def _trace_task(cfg: BuildConfig, stage: str, clip_ids: list[str], started: float) -> None:
    """Test hook (``fault.trace_dir``): when a task body of ``stage`` on these clips began and ended,
    appended as ``start end clip_id...`` to ``tasks/<stage>.<pid>``."""
    if cfg.fault.trace_dir:
        where = os.path.join(cfg.fault.trace_dir, "tasks")
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, f"{stage}.{os.getpid()}"), "a") as f:
            f.write(f"{started:.6f} {time.time():.6f} {' '.join(clip_ids)}\n")


def _timed(clip, stage: str, t0: float, share: int = 1):
    """Add the seconds since ``t0`` (split over ``share`` clips done together) to the clip's stage time."""
    if isinstance(clip, Clip):
        spent = (time.time() - t0) / share
        clip.aux.setdefault("timings", {})[stage] = clip.aux.get("timings", {}).get(stage, 0.0) + spent
    return clip


@ray.remote
def ingest_task(spec: dict, scene, cfg: BuildConfig):
    from stages.ingest.stage import ingest_clip

    t0 = time.time()
    (out,) = _or_failures("ingest", [spec["clip_id"]], lambda: [ingest_clip(spec, scene, cfg)])
    _trace_task(cfg, "ingest", [spec["clip_id"]], t0)
    return _timed(out, "ingest", t0)


@ray.remote
def ingest_scene_task(specs: list[dict], scene, cfg: BuildConfig):
    """A scene pass's clips read together, each shared frame once (route: ingest per scene)."""
    from stages.ingest.stage import ingest_scene

    t0 = time.time()
    ids = [s["clip_id"] for s in specs]
    out = _or_failures("ingest", ids, lambda: ingest_scene(specs, scene, cfg))
    _trace_task(cfg, "ingest", ids, t0)
    return _returns([_timed(c, "ingest", t0, len(out)) for c in out])


def _returns(out: list):
    return out[0] if len(out) == 1 else tuple(out)


@ray.remote
def megasam_task(key: str, clip_ids: list[str], cfg: BuildConfig, *clips):
    """MegaSaM for one scene pass, on the GPU Ray reserved for it (stages/align/megasam_stage.py)."""
    from stages.align.megasam_stage import PassFailure, megasam_pass

    t0 = time.time()
    try:
        out = megasam_pass(list(clips), key, cfg, gpu_ids=ray.get_gpu_ids())
    except Exception as exc:  # noqa: BLE001 - the pass's failure, its clips fail with it in align
        out = PassFailure("megasam", describe(exc, 300), transient=is_transient(exc))
    _trace_task(cfg, "megasam", clip_ids, t0)
    return out


@ray.remote
def align_task(clip_ids: list[str], megasam, cfg: BuildConfig, *clips):
    """One metric alignment over a pass's clips (a scene, or one clip); one return per clip.
    ``megasam``: the pass's MegaSaM result (or its failure), None where the route has none."""
    from stages.align.stage import align

    t0 = time.time()
    out = _or_failures("align", clip_ids, lambda: align(list(clips), cfg, megasam))
    per = (time.time() - t0) / max(1, len(out))
    for c in out:
        if isinstance(c, Clip):
            c.aux.setdefault("timings", {})["align"] = c.aux.get("timings", {}).get("align", 0.0) + per
    _trace_task(cfg, "align", clip_ids, t0)
    return _returns(out)


@ray.remote
def static_tracks_task(clip, clip_id: str, cfg: BuildConfig):
    from stages.tracks.stage import tracks_from_depth

    t0 = time.time()
    (out,) = _or_failures("tracks", [clip_id], lambda: [tracks_from_depth(clip, cfg)])
    _trace_task(cfg, "tracks", [clip_id], t0)
    return _timed(out, "tracks", t0)


@ray.remote
def encode_task(clip, clip_id: str, cfg: BuildConfig):
    """One clip's sample bytes, encoded as soon as the clip is done (stages/encode.py)."""
    from stages.encode import encode_for_shard

    t0 = time.time()
    (out,) = _or_failures("encode", [clip_id], lambda: [encode_for_shard(clip, cfg.jpeg_quality, cfg.depth_png_level)])
    _trace_task(cfg, "encode", [clip_id], t0)
    return out


@ray.remote
def write_task(shard: dict, clip_ids: list[str], cfg: BuildConfig, *clips) -> dict:
    """The shard's tar from its clips' encoded samples; a storage error fails the shard."""
    from stages.write import write_shard

    t0 = time.time()
    try:
        return write_shard(shard, list(clips), cfg)
    finally:
        _trace_task(cfg, "write", clip_ids, t0)


class _ModelClock:
    """When the actor's model was last released (None before its first call)."""

    released: float | None = None


class _TimedLock:
    """One call's hold on the actor's model lock; ``waited``: the seconds it waited to get it;
    ``holds``: (acquired, released) wall-clock times of each hold; ``idle``: the seconds the model
    had been free (no call holding it) when this call took it, since the last release on ``clock``:
    the model waiting for work, which is the GPU waiting when shards reach the actor too slowly."""

    def __init__(self, lock, clock: _ModelClock | None = None):
        self.lock, self.clock, self.waited, self.holds, self.idle = lock, clock or _ModelClock(), 0.0, [], 0.0

    def __enter__(self):
        t0 = time.time()
        self.lock.acquire()
        t1 = time.time()
        self.waited += t1 - t0
        if self.clock.released is not None:
            self.idle += max(0.0, t1 - self.clock.released)
        self.holds.append([t1, t1])
        return self

    def __exit__(self, *exc):
        self.holds[-1][1] = self.clock.released = time.time()
        self.lock.release()


class _ModelActor:
    """Holds one model stage's runner; ``process`` takes a shard's clips as one batch.

    Two calls may be in the actor at once (``max_concurrency=2``): one resolves its inputs and
    prepares them on the host (e.g. a scene's frames put together) while the other holds the model
    (a lock around the model calls only), so the GPU waits neither for the object store nor for
    that host work. A call's recorded stage seconds leave out its wait for the lock.
    """

    def __init__(self, stage: str, cfg: BuildConfig, device: str):
        import threading

        started = time.time()
        self.stage = stage
        self.cfg = cfg
        self.lock = threading.Lock()
        self.clock = _ModelClock()  # the model's last release: its idle time between calls
        if cfg.fault.trace_dir:  # test hook: which node each model actor landed on
            where = os.path.join(cfg.fault.trace_dir, "actors")
            os.makedirs(where, exist_ok=True)
            open(os.path.join(where, f"{stage}.{ray.get_runtime_context().get_node_id()}.{os.getpid()}"), "w").close()
        if cfg.fault.actor_start_delay_s:  # test hook: a slow start-up
            time.sleep(cfg.fault.actor_start_delay_s)
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():  # a broken GPU node: fail the actor (transient), never fall back
                raise RuntimeError(
                    f"{stage} actor was given GPUs {ray.get_gpu_ids()} but CUDA is not available "
                    f"on node {ray.get_runtime_context().get_node_id()}"
                )
        if stage == "depth":
            from stages.depth.stage import DepthModelStage

            self.impl = DepthModelStage(cfg, device)
        else:
            from stages.tracks.stage import TrackModelStage

            self.impl = TrackModelStage(cfg, device)
        built = time.time()
        if device != "cpu":
            self.impl.warm_up()
        if cfg.fault.trace_dir:  # bench hook: the actor's start-up (process up, model built, warmed up)
            where = os.path.join(cfg.fault.trace_dir, "startup")
            os.makedirs(where, exist_ok=True)
            with open(os.path.join(where, f"{stage}.{os.getpid()}"), "a") as f:
                f.write(f"{started:.6f} {built:.6f} {time.time():.6f}\n")

    def process(self, clip_ids: list[str], hang: bool, *clips):
        """One shard's clips through the model; Ray calls it once they all exist (task arguments).
        After a GPU fault (pipeline/failures.py: every later call of this process would fail at
        once) the next call ends the process: Ray restarts the actor with a new CUDA context (or,
        its restarts spent, the driver replaces it), and the call's shard is re-run."""
        if getattr(self, "device_fault", None):
            log.error("%s actor (pid %d) ends after a GPU fault: %s", self.stage, os.getpid(), self.device_fault)
            os._exit(3)
        started = time.time()
        if hang:
            _hang_once(self.cfg, self.stage)
        held = _TimedLock(self.lock, self.clock)
        t0 = time.time()
        out = _or_failures(self.stage, clip_ids, lambda: self.impl.process(list(clips), model_lock=held))
        if out and held.holds:  # summed per shard like the stage's own counters
            add_stats(out[0], {f"{self.stage}.model_idle_s": held.idle})
        per = (time.time() - t0 - held.waited) / max(1, len(out))
        if self.cfg.fault.trace_dir and held.holds:  # bench hook: when the model (the GPU) was held
            where = os.path.join(self.cfg.fault.trace_dir, "holds")
            os.makedirs(where, exist_ok=True)
            with open(os.path.join(where, f"{self.stage}.{os.getpid()}"), "a") as f:
                f.write("".join(f"{a:.6f} {b:.6f}\n" for a, b in held.holds))
        for c in out:
            if isinstance(c, Clip):
                c.aux.setdefault("timings", {})[self.stage] = per
            elif isinstance(c, ClipFailure) and device_fault_text(c.reason):
                self.device_fault = c.reason
        _trace_task(self.cfg, self.stage, clip_ids, started)
        return _returns(out)


ModelActor = ray.remote(_ModelActor)


def _hang_once(cfg: BuildConfig, stage: str) -> None:
    """Test hook (``fault.hang_stage``): hang for good, once per output (a marker file)."""
    marker_dir = cfg.fault.marker_dir or os.path.join(cfg.output, ".faults")
    os.makedirs(marker_dir, exist_ok=True)
    marker = os.path.join(marker_dir, f"hang_{stage}_{cfg.fault.hang_on_clip}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(10**6)


# ------------------------------------------------------------------------------------------
# The per-shard DAG


def _model_frames(clips: list[dict], granularity: str) -> int:
    """The frames a model call on these clips runs on: each frame of a scene once in scene
    passes, every clip's frames in clip passes."""
    if granularity == "scene":
        return len({(c["scene"], f) for c in clips for f in c["frames"]})
    return sum(len(c["frames"]) for c in clips)


def node_fit_problems(wanted: list[tuple[str, str, float, float]], nodes: list[dict]) -> list[str]:
    """What no node can hold: each ``(setting, what, cpus, gpus)`` of ``wanted`` is placed on one
    node, and one larger than every node of ``nodes`` (their resource dicts) waits for ever."""
    out = []
    for key, what, cpus, gpus in wanted:
        if any(n.get("CPU", 0.0) + 1e-9 >= cpus and n.get("GPU", 0.0) + 1e-9 >= gpus for n in nodes):
            continue
        big_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        big_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        out.append(
            f"{what} asks for {cpus:g} CPUs and {gpus:g} GPUs on one node ({key}), but no node has that much "
            f"(largest: {big_cpu:g} CPUs, {big_gpu:g} GPUs)"
        )
    return out


def _alive_node_resources() -> list[dict]:
    """The resources of each node of the cluster that is alive now."""
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def cuda_shortfall(stage_gpus: float, ray_gpus: float, cuda_devices: int, simulated: bool) -> str | None:
    """Why a local Ray's GPUs cannot run a model stage, or None: Ray counts ``ray.num_gpus`` GPUs
    whatever CUDA has, and an actor placed on one it cannot open dies at start, again and again."""
    if simulated or stage_gpus <= 0 or ray_gpus <= cuda_devices:
        return None
    return (
        f"ray.num_gpus is {ray_gpus:g} but CUDA sees {cuda_devices} device(s) on this machine: the model "
        f"actors given the others could not start. Set ray.num_gpus to at most {cuda_devices}"
        + (" or the model stages' num_gpus to 0 (CPU)" if not cuda_devices else "")
    )


class _ActorLoad:
    """The frames each actor of a pool has been sent and not yet returned.

    A shard's call goes to the actor with the fewest (:meth:`pick`). Round robin would give each
    actor the same number of calls, but shards hold whole scenes of unequal length and actors may
    run at unequal speed, so one GPU would idle at the end of a build while another still has a
    queue. A call counts until its first output is ready (all its outputs come together)."""

    def __init__(self, n: int):
        self.n = n
        self.calls: dict = {}  # a ref of each call not seen returned -> (actor index, frames)
        self.ready: list = [None] * n  # each actor's start-up ref (``__ray_ready__``) until seen done

    def outstanding(self) -> list[int]:
        if self.calls:  # one wait over the whole pool's calls (a pool may have a hundred actors)
            refs = list(self.calls)
            for r in ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0]:
                del self.calls[r]
        loads = [0] * self.n
        for i, frames in self.calls.values():
            loads[i] += frames
        return loads

    def starting(self, i: int, ready_ref) -> None:
        """Actor ``i`` is (re)starting; ``ready_ref`` resolves once it is placed and built."""
        self.ready[i] = ready_ref

    def up(self) -> list[int]:
        """The actors seen up (one that failed to start counts: its calls fail, and it is replaced)."""
        waiting = [r for r in self.ready if r is not None]
        if waiting:
            done = set(ray.wait(waiting, num_returns=len(waiting), timeout=0, fetch_local=False)[0])
            self.ready = [None if r in done else r for r in self.ready]
        return [i for i, r in enumerate(self.ready) if r is None]

    def pick(self) -> int:
        """The least loaded actor that is up; of all of them while none is. An actor that cannot
        be placed (its node never comes) would otherwise win every pick, having nothing
        outstanding, and its shards would wait for their deadline while the others idle."""
        loads = self.outstanding()
        candidates = self.up() or range(self.n)
        return min(candidates, key=lambda i: (loads[i], i))

    def add(self, i: int, ref, frames: int) -> None:
        self.calls[ref] = (i, frames)

    def reset(self, i: int) -> None:
        """Actor ``i`` was replaced: its calls ended with the old one."""
        self.calls = {r: v for r, v in self.calls.items() if v[0] != i}


@dataclass
class _Inflight:
    """One submitted shard pipeline: its progress, and what to cancel when it stalls."""

    shard: dict
    submitted: float  # time.monotonic()
    tasks: list = field(default_factory=list)  # refs of its tasks
    actor_calls: list = field(default_factory=list)  # (stage, actor handle, refs, its input refs)
    finished: int = 0  # refs of it seen finished
    progressed: float = 0.0  # when one last finished (or when it was submitted)

    def refs(self) -> list:
        return self.tasks + [r for _, _, refs, _ in self.actor_calls for r in refs]

    def check(self, now: float) -> None:
        """Note the time when more of its refs have finished than at the last check. Without
        fetching them: a default ``ray.wait`` counts an object on another node as finished only
        once it has been copied here, so every clip's frames and depth of every shard in flight
        flowed into the driver's node, and progress was seen one copy wave late."""
        refs = self.refs()
        n = len(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])
        if n > self.finished or not self.progressed:
            self.finished, self.progressed = n, now


class ShardDAG:
    def __init__(self, cfg: BuildConfig, plan: Plan, todo_clips: list[dict]):
        self.cfg = cfg
        self.plan = plan
        self.scene_refs = plan.scene_refs
        datasets = sorted({c["dataset"] for c in todo_clips})
        self.routes = {d: {s.name: s for s in route(cfg, d)} for d in datasets}
        self.needs_depth = {d for d in datasets if "depth" in self.routes[d]}
        self.needs_megasam = {d for d in datasets if "megasam" in self.routes[d]}
        self.needs_track_model = {
            d for d in datasets if self.routes[d].get("tracks") and self.routes[d]["tracks"].runs_as == "actor"
        }
        self.needs_static_tracks = {
            d for d in datasets if self.routes[d].get("tracks") and self.routes[d]["tracks"].runs_as == "task"
        }
        self._preflight()
        ensure_ray(cfg)
        self._check_gpus()
        # (setting, what, cpus, gpus) that no node of a joined cluster holds yet: _watch_unfit
        self._unfit: list[tuple[str, str, float, float]] = []
        self._unfit_since = self._unfit_next_look = time.monotonic()
        self._check_nodes()
        self.cfg_ref = ray.put(cfg)
        self.pools = {}
        if self.needs_depth:
            self.pools["depth"] = self._pool("depth")
        if self.needs_track_model:
            self.pools["tracks"] = self._pool("tracks")
        self.loads = {k: _ActorLoad(len(p)) for k, p in self.pools.items()}
        # the model actors not yet up (their constructor still running): see _admit_limit
        self._starting = []
        for stage, pool in self.pools.items():
            for i, a in enumerate(pool):
                self._starting.append(a.__ray_ready__.remote())
                self.loads[stage].starting(i, self._starting[-1])
        self._n_actors = len(self._starting)

    def _preflight(self) -> None:
        """Refuse to start when a dataset needs a model that is not configured."""
        dcfg, tcfg = self.cfg.stages.depth, self.cfg.stages.tracks
        if self.needs_depth and not dcfg.checkpoint and not dcfg.allow_random_weights:
            raise ConfigError(
                f"datasets {sorted(self.needs_depth)} need the depth model: set stages.depth.checkpoint "
                f"to a Video Depth Anything checkpoint (docs/MODELS.md)"
            )
        if self.needs_track_model and not tcfg.checkpoint and not tcfg.allow_random_weights:
            raise ConfigError(
                f"datasets {sorted(self.needs_track_model)} need the track model: set "
                f"stages.tracks.checkpoint to a CoTracker3 checkpoint (docs/MODELS.md)"
            )
        for d in self.needs_depth:
            src = self.cfg.datasets[d].depth_source
            if src == "megasam" and not self.cfg.stages.align.megasam_command:
                raise ConfigError(
                    f"dataset {d} uses MegaSaM as its metric reference: set stages.align.megasam_command "
                    f"(docs/ALIGNMENT.md)"
                )
            if src == "vda_metric" and not dcfg.metric:
                raise ConfigError(f"dataset {d} wants metric VDA depth but stages.depth.metric is false")
        if self.needs_megasam:
            from stages.align.megasam import MegaSaMConfigError, MegaSaMRunner

            try:  # the template parses and its executable exists here (the driver's node)
                MegaSaMRunner(self.cfg.stages.align.megasam_command)
            except MegaSaMConfigError as exc:
                raise ConfigError(f"stages.align.megasam_command: {exc}") from None
        for d in self.needs_static_tracks:
            if adapter_class(d).capabilities.dynamic:
                raise ConfigError(
                    f"dataset {d} is dynamic: track_source 'depth_static' is only exact for static scenes"
                )

    def _step(self, stage: str, runs_as: str | None = None):
        """The declared step of ``stage`` (the same for every dataset that runs it)."""
        return next(
            r[stage] for r in self.routes.values() if stage in r and (runs_as is None or r[stage].runs_as == runs_as)
        )

    def _actor_steps(self) -> list:
        return [
            self._step(s, "actor")
            for s, need in (("depth", self.needs_depth), ("tracks", self.needs_track_model))
            if need
        ]

    def _check_gpus(self) -> None:
        """Every model stage requests its declared GPUs whatever the cluster has now: on a joined
        cluster that demand is what an autoscaler answers with GPU nodes (a warning says the
        stage waits for them). A local Ray cannot grow, so one that cannot give each stage its
        GPUs, or the model actors and one MegaSaM run theirs together (a stage would wait for a
        GPU that never frees), is refused. Running a model on CPU is ``num_gpus: 0``."""
        total = ray.cluster_resources().get("GPU", 0.0)
        joined = _joined_cluster(self.cfg)
        wanted = [(st, f"stages.{st.name}.resources.num_gpus", st.actors) for st in self._actor_steps()]
        if self.needs_megasam:
            wanted.append((self._step("megasam"), "stages.align.megasam_num_gpus", 1))
        for st, key, n in wanted:
            if st.num_gpus <= 0 or st.num_gpus <= total + 1e-9:
                continue
            what = "MegaSaM" if st.name == "megasam" else f"the {st.name} model"
            if not joined:
                raise ConfigError(
                    f"{key} is {st.num_gpus:g} but this local Ray has {total:g} GPUs and cannot gain "
                    f"any: set {key}: 0 to run {what} on CPU (slow), or join a cluster with GPU nodes "
                    f"(--address)"
                )
            log.warning(
                "%s: %d %s request %g GPU(s) each and the cluster has %g now: they start when GPU nodes join "
                "(an autoscaler adds them for this demand)",
                st.name,
                n,
                "run(s)" if st.name == "megasam" else "actor(s)",
                st.num_gpus,
                total,
            )
        if not total:
            return
        actors = sum(st.num_gpus * st.actors for st in self._actor_steps())
        megasam = self._step("megasam").num_gpus if self.needs_megasam else 0.0
        if actors + megasam > total + 1e-9:
            msg = (
                f"the model actors take {actors:g} GPUs"
                + (f" and a MegaSaM run {megasam:g}" if megasam else "")
                + f", but the cluster has {total:g}: lower stages.depth/tracks.resources.num_gpus (fractions share a "
                f"GPU) or stages.align.megasam_num_gpus, or add GPUs"
            )
            if joined:
                log.warning(msg)
            else:
                raise ConfigError(msg)

    def _check_nodes(self) -> None:
        """Each model actor and each MegaSaM run must fit one node (``node_fit_problems``): a
        local Ray is refused, a joined cluster warned (its autoscaler may add a larger node). A
        local Ray counting GPUs CUDA does not have is refused (``cuda_shortfall``)."""
        wanted = [
            (f"stages.{st.name}.resources", f"the {st.name} model actor", self._actor_cpus(st), st.num_gpus)
            for st in self._actor_steps()
        ]
        if self.needs_megasam:
            st = self._step("megasam")
            wanted.append(
                ("stages.align.megasam_num_cpus / megasam_num_gpus", "a MegaSaM run", st.num_cpus, st.num_gpus)
            )
        nodes = _alive_node_resources()
        joined = _joined_cluster(self.cfg)
        for w in wanted:
            for problem in node_fit_problems([w], nodes):
                if not joined:
                    raise ConfigError(f"{problem}: this local Ray cannot gain nodes; lower the setting")
                log.warning(
                    "%s: it waits up to ray.unplaceable_wait_s = %g s for such a node to join (an autoscaler "
                    "node type must be that large)",
                    problem,
                    self.cfg.ray.unplaceable_wait_s,
                )
                self._unfit.append(w)
        gpus = max((st.num_gpus for st in self._actor_steps()), default=0.0)
        ray_gpus = ray.cluster_resources().get("GPU", 0.0)
        if not joined and gpus > 0 and ray_gpus > 0 and not self.cfg.fault.gpus_are_simulated:
            import torch

            why = cuda_shortfall(gpus, ray_gpus, torch.cuda.device_count(), simulated=False)
            if why:
                raise ConfigError(why)

    def _watch_unfit(self) -> None:
        """On a joined cluster, what no node could hold at the start (``_check_nodes``) gets
        ``ray.unplaceable_wait_s`` for a node that holds it to join (looked at every 10 s at most);
        past that the build stops in one line. Waiting on, every shard in flight would meet its
        deadline (6 h by default) and fail as transient, again on every resume."""
        if not self._unfit:
            return
        now = time.monotonic()
        if now < self._unfit_next_look:
            return
        self._unfit_next_look = now + 10.0
        problems = node_fit_problems(self._unfit, _alive_node_resources())
        if not problems:
            log.info("a node that holds %s joined", ", ".join(w[1] for w in self._unfit))
            self._unfit = []
            return
        wait = self.cfg.ray.unplaceable_wait_s
        if now - self._unfit_since >= wait:
            raise ConfigError(
                f"{problems[0]}: no such node joined within ray.unplaceable_wait_s = {wait:g} s; lower the "
                "setting or give the cluster a node type that large, then `d4s resume`"
            )

    def _actor_cpus(self, st) -> float:
        """The CPUs each actor of ``st`` reserves. On a small CPU-only cluster (a laptop) model
        actors that reserved CPUs, idle most of the time, would starve the ingest tasks that feed
        them: there they share the CPUs instead (0)."""
        total_cpus = ray.cluster_resources().get("CPU", 0)
        n_actors = sum(s.actors for s in self._actor_steps())
        if not st.num_gpus and st.num_cpus * n_actors >= total_cpus:
            return 0.0
        return float(st.num_cpus)

    def check_feed(self, clips_by_shard: dict[str, list[dict]]) -> str | None:
        """Warn when ``max_inflight_shards`` is too small to keep the GPUs busy (pipeline/feed.py);
        the warning, if any, is also returned."""
        warning = feed_for(self.cfg, ray.cluster_resources().get("GPU", 0.0), clips_by_shard).warning()
        if warning:
            log.warning(warning)
        return warning

    @staticmethod
    def spare_cpus() -> float:
        """CPUs of the cluster no task or actor holds now (pipeline/feed.py: whether the stages
        around the models are short of cores)."""
        return float(ray.available_resources().get("CPU", 0.0))

    def _pool(self, stage: str) -> list:
        """The stage's actors. They request the declared GPUs each from Ray, whatever the cluster
        has right now (``_check_gpus``): on an autoscaling cluster that demand brings GPU nodes up."""
        st = self._step(stage, "actor")
        gpus = float(st.num_gpus)
        device = "cuda" if gpus > 0 and not self.cfg.fault.gpus_are_simulated else "cpu"
        cpus = self._actor_cpus(st)
        if cpus != st.num_cpus:
            log.info("model actors share CPUs with tasks (%s CPUs in all)", ray.cluster_resources().get("CPU", 0))
        opts = dict(
            num_cpus=cpus,
            num_gpus=gpus,
            max_concurrency=2,
            max_restarts=self.cfg.ray.actor_restarts,
            max_task_retries=self.cfg.ray.task_retries,
        )
        self._actor_opts = {**getattr(self, "_actor_opts", {}), stage: (opts, device)}
        return [ModelActor.options(**opts).remote(stage, self.cfg, device) for _ in range(st.actors)]

    def _admit_limit(self) -> int:
        """Shards to keep in flight: ``max_inflight_shards`` once the model actors are up; while
        they start, one shard per actor, plus the share of the rest that the actors already up
        can take. A full pipeline's ingest would take every core from the actors building their
        models (session 9: the first model call 16-32 s into a build) while there is no model to
        feed; the first shards are ingested meanwhile."""
        cap = self.cfg.max_inflight_shards
        if not self._starting:
            return cap
        n = self._n_actors
        up = n - len(self._starting)
        return max(1, min(cap, n + (cap - n) * up // n))

    def _actors_up(self, ready: list) -> None:
        """Forget the start-up refs that are ready (an actor that failed to start counts as up:
        its calls fail and are handled like any other failure)."""
        done = set(ready)
        self._starting = [r for r in self._starting if r not in done]

    def _actor(self, stage: str) -> tuple[int, object]:
        """The stage's actor with the fewest frames outstanding, and its place in the pool."""
        i = self.loads[stage].pick()
        return i, self.pools[stage][i]

    def _megasam_options(self) -> dict:
        st = self._step("megasam")  # its declared GPUs, whatever the cluster has now (see _check_gpus)
        return dict(num_cpus=st.num_cpus, num_gpus=st.num_gpus, max_retries=self.cfg.ray.task_retries)

    def submit(self, shard: dict, clips: list[dict]) -> _Inflight:
        cfg, retries = self.cfg_ref, self.cfg.ray.task_retries
        rec = _Inflight(shard, time.monotonic())
        ids = [c["clip_id"] for c in clips]
        dataset = shard["dataset"]
        steps = self.routes.get(dataset, {})
        refs = self._ingest(clips, steps["ingest"].granularity if "ingest" in steps else "clip")
        rec.tasks += refs
        if clips and "depth" in steps:
            passes = _passes(clips, steps["depth"].granularity)
            megasam = {}
            if "megasam" in steps:
                for key, idx in passes.items():
                    megasam[key] = megasam_task.options(**self._megasam_options()).remote(
                        key, [ids[i] for i in idx], cfg, *[refs[i] for i in idx]
                    )
                    rec.tasks.append(megasam[key])
            frames = _model_frames(clips, steps["depth"].granularity)
            refs = self._model_call("depth", refs, ids, rec, frames, hang=self._hangs("depth", clips))
            aligned = list(refs)
            for key, idx in passes.items():
                out = align_task.options(max_retries=retries, num_returns=len(idx)).remote(
                    [ids[i] for i in idx], megasam.get(key), cfg, *[refs[i] for i in idx]
                )
                out = [out] if len(idx) == 1 else list(out)
                rec.tasks += out
                for i, r in zip(idx, out):
                    aligned[i] = r
            refs = aligned
        if clips and dataset in self.needs_track_model:
            refs = self._model_call("tracks", refs, ids, rec, _model_frames(clips, "clip"))
        elif clips and dataset in self.needs_static_tracks:
            refs = [static_tracks_task.options(max_retries=retries).remote(r, cid, cfg) for r, cid in zip(refs, ids)]
            rec.tasks += refs
        refs = [encode_task.options(max_retries=retries).remote(r, cid, cfg) for r, cid in zip(refs, ids)]
        rec.tasks += refs
        rec.tasks.append(write_task.options(max_retries=retries).remote(shard, ids, cfg, *refs))
        return rec

    def _ingest(self, clips: list[dict], granularity: str) -> list:
        """One ref per clip: a task per clip, or per scene where the route reads a scene's clips together."""
        cfg, retries = self.cfg_ref, self.cfg.ray.task_retries
        if granularity != "scene":
            return [
                ingest_task.options(max_retries=retries).remote(c, self.scene_refs[(c["dataset"], c["scene"])], cfg)
                for c in clips
            ]
        refs: list = [None] * len(clips)
        for idx in _passes(clips, "scene").values():
            first = clips[idx[0]]
            out = ingest_scene_task.options(max_retries=retries, num_returns=len(idx)).remote(
                [clips[i] for i in idx], self.scene_refs[(first["dataset"], first["scene"])], cfg
            )
            for i, r in zip(idx, [out] if len(idx) == 1 else list(out)):
                refs[i] = r
        return refs

    def _hangs(self, stage: str, clips: list[dict]) -> bool:
        f = self.cfg.fault
        return f.hang_stage == stage and any(c.get("ordinal") == f.hang_on_clip for c in clips)

    def _model_call(
        self, stage: str, refs: list, ids: list[str], rec: _Inflight, frames: int, hang: bool = False
    ) -> list:
        i, actor = self._actor(stage)
        out = actor.process.options(num_returns=len(refs)).remote(ids, hang, *refs)
        out = [out] if len(refs) == 1 else list(out)
        self.loads[stage].add(i, out[0], frames)
        rec.actor_calls.append((stage, actor, out, refs))
        return out

    def run(
        self, shards: list[dict], clips_by_shard: dict[str, list[dict]]
    ) -> Iterator[tuple[dict, dict | None, ShardFailure | None]]:
        """Yield (shard, result, failure) as shards finish; at most max_inflight_shards at once.

        A shard that fails transiently is run again after ``ray.retry_backoff_s`` (doubling), up
        to ``ray.shard_retries`` times, before its failure is yielded; a permanent failure is
        yielded at once. Other shards keep flowing while one waits for its re-run. A shard past
        ``shard_deadline_s`` is cancelled and yielded failed at once (see :meth:`_expire`).
        """
        self.check_feed({sh["shard_id"]: clips_by_shard[sh["shard_id"]] for sh in shards})
        queue = deque(shards)
        inflight: dict = {}
        deadline = self.cfg.shard_deadline_s
        waiting: list[tuple[float, int, dict]] = []  # (due on the monotonic clock, tie-break, shard)
        runs: Counter = Counter()
        tick = itertools.count()
        retries, backoff = self.cfg.ray.shard_retries, self.cfg.ray.retry_backoff_s

        def retry_or_fail(sh: dict, failure: ShardFailure):
            """None when the shard is queued for a re-run, else the failure to yield."""
            if failure.transient and failure.attempts <= retries:
                delay = backoff * 2 ** (failure.attempts - 1)
                log.warning(
                    "shard %s failed transiently (%s); run %d of %d in %.1f s",
                    sh["shard_id"],
                    failure.message,
                    failure.attempts + 1,
                    retries + 1,
                    delay,
                )
                heapq.heappush(waiting, (time.monotonic() + delay, next(tick), sh))
                return None
            return failure

        while queue or inflight or waiting:
            self._watch_unfit()
            now = time.monotonic()
            while waiting and waiting[0][0] <= now:
                queue.appendleft(heapq.heappop(waiting)[2])
            if self._starting:
                self._actors_up(
                    ray.wait(self._starting, num_returns=len(self._starting), timeout=0, fetch_local=False)[0]
                )
            while queue and len(inflight) < self._admit_limit():
                sh = queue.popleft()
                rec = self.submit(sh, clips_by_shard[sh["shard_id"]])
                inflight[rec.tasks[-1]] = rec
            if not inflight:
                time.sleep(max(0.0, min(1.0, waiting[0][0] - time.monotonic())))
                continue
            timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting else None
            now = time.monotonic()  # a wall-clock step (NTP, a VM resumed) must not expire shards
            for r in inflight.values():
                r.check(now)
            timeout = _deadline_wait(timeout, min(r.progressed for r in inflight.values()), deadline, now)
            if self._starting and len(inflight) < self.cfg.max_inflight_shards and queue:
                # wake up when an actor is up, too: then more shards are admitted
                woke, _ = ray.wait(list(inflight) + self._starting, num_returns=1, timeout=timeout)
                if woke and woke[0] not in inflight:
                    self._actors_up(woke)
                    continue
                ready = woke
            else:
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=timeout)
            if not ready:
                for sh, failure, rerun in self._expire(inflight, deadline):
                    runs[sh["shard_id"]] += 1
                    failure.attempts = runs[sh["shard_id"]]
                    if not rerun:  # it waited shard_deadline_s already: left for resume
                        yield sh, None, failure
                    elif (f := retry_or_fail(sh, failure)) is not None:
                        yield sh, None, f
                continue
            rec = inflight.pop(ready[0])
            sh = rec.shard
            runs[sh["shard_id"]] += 1
            try:
                result = ray.get(ready[0])
            except Exception as exc:
                self._replace_dead_actors(rec)
                f = retry_or_fail(sh, ShardFailure(describe(exc), is_transient(exc), runs[sh["shard_id"]]))
                if f is not None:
                    yield sh, None, f
                continue
            yield sh, result, None

    def _expire(self, inflight: dict, deadline: float) -> Iterator[tuple[dict, ShardFailure, bool]]:
        """Cancel the shard pipelines that made no progress (no task of theirs finishing) for
        ``deadline`` seconds, and replace a model actor one of them still occupies (a hung model
        never frees it). Shards with calls queued on a replaced actor lose them: they are
        cancelled too, with that reason. Yields (shard, failure, whether to re-run it in this
        build): the late shard is not (it may hang again; ``resume`` redoes it), the others are
        re-run like any transient failure. Elapsed time is the monotonic clock's."""
        now = time.monotonic()
        for r in inflight.values():
            r.check(now)
        late = [k for k, r in inflight.items() if now - r.progressed >= deadline]
        replaced = []
        for k in late:
            rec = inflight.pop(k)
            for stage, actor, refs, inputs in rec.actor_calls:
                pending = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[1]
                # a call whose inputs are not all there has not reached its actor: the shard hangs
                # upstream (a stuck read), and the actor, busy with other shards, is healthy
                reached = (
                    not ray.wait(inputs, num_returns=len(inputs), timeout=0, fetch_local=False)[1] if inputs else True
                )
                if pending and reached and self._replace_actor(stage, actor):
                    replaced.append((stage, actor, rec.shard["shard_id"]))
            self._cancel(rec)
            yield (
                rec.shard,
                ShardFailure(
                    f"deadline: no task of the shard pipeline finished within shard_deadline_s = "
                    f"{deadline:g} s (a stage hangs); cancelled",
                    transient=True,
                ),
                False,
            )
        for stage, actor, sid in replaced:
            for k, rec in list(inflight.items()):
                if any(
                    a is actor and ray.wait(r, num_returns=len(r), timeout=0, fetch_local=False)[1]
                    for _, a, r, _ in rec.actor_calls
                ):
                    del inflight[k]
                    self._cancel(rec)
                    yield (
                        rec.shard,
                        ShardFailure(
                            f"cancelled: its {stage} model actor was replaced after shard {sid} "
                            f"exceeded shard_deadline_s",
                            transient=True,
                        ),
                        True,
                    )

    def _replace_dead_actors(self, rec: _Inflight) -> None:
        """Replace the model actors whose calls for this failed shard ended in the actor's death.
        Ray restarts an actor ``actor_restarts`` times; after that it stays dead, and with nothing
        outstanding it would win every :meth:`_ActorLoad.pick`, failing every shard sent to it
        while the healthy actors idle (an actor that cannot start on a broken node is the same)."""
        for stage, actor, refs, _ in rec.actor_calls:
            for ref in ray.wait(refs, num_returns=len(refs), timeout=0)[0]:
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError:
                    self._replace_actor(stage, actor, "died (its restarts spent, or it could not start)")
                    break
                except Exception:  # noqa: BLE001 - the call's own failure: the actor lives
                    pass

    def _replace_actor(self, stage: str, actor, why: str = "held by a shard past its deadline") -> bool:
        pool = self.pools.get(stage, [])
        for i, a in enumerate(pool):
            if a is actor:
                ray.kill(actor, no_restart=True)
                opts, device = self._actor_opts[stage]
                pool[i] = ModelActor.options(**opts).remote(stage, self.cfg, device)
                self.loads[stage].reset(i)
                self.loads[stage].starting(i, pool[i].__ray_ready__.remote())
                log.warning("replaced a %s model actor: %s", stage, why)
                return True
        return False

    @staticmethod
    def _cancel(rec: _Inflight) -> None:
        for r in rec.tasks:
            try:
                ray.cancel(r, force=True)
            except Exception:  # noqa: BLE001 - finished, or an actor call (ended with its actor)
                pass


def _deadline_wait(timeout: float | None, progressed: float, deadline: float, now: float) -> float:
    """How long the loop may wait for a shard to finish: until the stalest shard's deadline, and
    never more than a tenth of the deadline (at most a minute). Progress is noted when the loop
    looks, so a wait of a whole deadline let a stall run almost two deadlines before it was seen."""
    left = max(0.0, progressed + deadline - now)
    cap = min(deadline / 10.0, 60.0)
    return min(left, cap) if timeout is None else min(timeout, left, cap)


def _passes(clips: list[dict], granularity: str) -> dict[str, list[int]]:
    """Positions of the shard's clips per pass: per scene (``dataset__scene``) or per clip."""
    out: dict[str, list[int]] = {}
    for i, c in enumerate(clips):
        key = c["clip_id"] if granularity == "clip" else c["clip_id"].rsplit("__", 1)[0]
        out.setdefault(key, []).append(i)
    return out
