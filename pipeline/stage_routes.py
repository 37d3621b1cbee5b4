"""Which stages run for a dataset, at which granularity and on what: the one statement of it.

Every consumer reads :func:`route` instead of restating the rules: ``pipeline/dag.py`` builds a
shard's pipeline from it, ``pipeline/plan.py`` packs shards by it (a dataset with a scene-level
stage gets shards that hold whole scenes), ``d4s status`` counts clips per stage in its order,
and ``pipeline/capacity.py`` costs its GPU stages. The rules, from a dataset's resolved config:

============  =====================================  ===========  ==================================
stage         runs when                              granularity  runs as
============  =====================================  ===========  ==================================
ingest        always                                 clip [+]_    CPU task
depth         ``depth_source`` is not ``gt``         scene [*]_   model actor (its declared GPUs)
megasam       ``depth_source`` is ``megasam``        scene [*]_   GPU task running the MegaSaM command
align         ``depth_source`` is not ``gt``         scene [*]_   CPU task (one metric fit per scene)
tracks        ``track_source`` ``cotracker``         clip         model actor (its declared GPUs)
tracks        ``track_source`` ``depth_static``      clip         CPU task
encode        always                                 clip         CPU task
write         always                                 shard        CPU task
============  =====================================  ===========  ==================================

.. [*] ``stages.scene.granularity: clip`` runs them once per clip instead (the older path).
.. [+] scene where the depth model runs per scene and the dataset's adapter cuts a scene's clips
   from one read of their frames (``DatasetAdapter.reads_scene_union``: RealEstate10K, Stereo4D): one task reads
   the scene's clips, each shared frame once; others read clip by clip, in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

#: Every stage in pipeline order (a clip meets a subset of them, in this order).
STAGE_ORDER = ("ingest", "depth", "megasam", "align", "tracks", "encode", "write")

Granularity = Literal["clip", "scene", "shard"]


@dataclass(frozen=True)
class StageStep:
    """One stage of a dataset's route.

    ``num_gpus`` is what the stage requests per actor or per run, whatever the cluster has when
    the build starts (an autoscaler adds GPU nodes for it; 0 is the explicit choice of CPU);
    ``actors`` is the pool size of actor stages.
    ``variant`` says which form of the stage runs (the track source, the alignment reference);
    ``model`` marks the stages that run a model (costed in GPU-hours by ``d4s plan``).
    """

    name: str
    granularity: Granularity
    runs_as: Literal["task", "actor"]
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: int = 0
    variant: str = ""
    model: bool = False

    @property
    def uses_gpu(self) -> bool:
        return self.num_gpus > 0


def route(cfg: "BuildConfig", dataset: str) -> tuple[StageStep, ...]:
    """The stages a clip of ``dataset`` passes through, in order (``cfg`` resolved)."""
    d = cfg.datasets[dataset]
    st = cfg.stages
    model_gran: Granularity = "scene" if st.scene.granularity == "scene" else "clip"
    steps = [
        StageStep("ingest", _ingest_granularity(dataset, model_gran if d.depth_source != "gt" else "clip"), "task")
    ]
    if d.depth_source != "gt":
        r = st.depth.resources
        steps.append(StageStep("depth", model_gran, "actor", r.num_cpus, r.num_gpus, max(1, r.actors), model=True))
        if d.depth_source == "megasam":
            a = st.align
            steps.append(StageStep("megasam", model_gran, "task", a.megasam_num_cpus, a.megasam_num_gpus, model=True))
        steps.append(StageStep("align", model_gran, "task", variant=str(d.depth_source)))
    if d.track_source == "cotracker":
        r = st.tracks.resources
        steps.append(
            StageStep("tracks", "clip", "actor", r.num_cpus, r.num_gpus, max(1, r.actors), "cotracker", model=True)
        )
    elif d.track_source == "depth_static":
        steps.append(StageStep("tracks", "clip", "task", variant="depth_static"))
    steps += [StageStep("encode", "clip", "task"), StageStep("write", "shard", "task")]
    return tuple(steps)


def _ingest_granularity(dataset: str, model_gran: Granularity) -> Granularity:
    from stages.ingest import adapter_class

    return "scene" if model_gran == "scene" and adapter_class(dataset).reads_scene_union() else "clip"


def stage_names(cfg: "BuildConfig", dataset: str) -> list[str]:
    return [s.name for s in route(cfg, dataset)]


def step(cfg: "BuildConfig", dataset: str, name: str) -> StageStep | None:
    return next((s for s in route(cfg, dataset) if s.name == name), None)


def model_stages(cfg: "BuildConfig", dataset: str) -> list[str]:
    """The dataset's stages that run a model (depth, megasam, tracks with CoTracker)."""
    return [s.name for s in route(cfg, dataset) if s.model]


def whole_scene_shards(cfg: "BuildConfig", dataset: str) -> bool:
    """Whether the dataset's shards hold whole scenes: true when any stage runs per scene, so a
    scene pass runs inside exactly one shard pipeline (once per build, redone with that shard)."""
    return any(s.granularity == "scene" for s in route(cfg, dataset))
