"""Whether ``max_inflight_shards`` can keep a build's GPUs busy, said at the start of the build.

The driver keeps at most ``max_inflight_shards`` shard pipelines in flight (that bounds memory),
so only their scenes can be in MegaSaM and only their clips can reach the model actors:

* a model actor takes two calls at once (one holds the GPU while the other prepares its inputs
  on the host), so it waits unless about two shards are at its stage: 2 shards per actor;
* a MegaSaM run needs a scene pass of its own, and a shard brings its scenes' passes: the GPUs
  fit ``(GPUs - the actors' GPUs) / megasam_num_gpus`` runs at once, so the build needs that many
  passes in flight, ``runs / passes per shard`` shards.

Below either figure some GPUs the cluster has sit idle (bench/RESULTS.md §7, session 8: a
MegaSaM queue left the GPU idle for most of a build). The check cannot know a cluster that an
autoscaler has yet to grow; it sizes against the GPUs present at the start.

Nor can it know how long a shard spends in the CPU stages around the model actors (ingest before,
alignment and encoding after): by Little's law the shards in flight must cover that time too, and
it depends on the data and the nodes. So :class:`FeedMonitor` judges during the build, from what
the actors measure (``<stage>.model_idle_s``, the seconds their model waited between calls), and
says once when they wait for shards while shards are queued and CPUs are free (bench/RESULTS.md
§7, session 9: 8 shards in flight kept one depth actor busy, two only ~80 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.stage_routes import route

if TYPE_CHECKING:
    from pipeline.config import BuildConfig


@dataclass(frozen=True)
class Feed:
    """What keeps the GPUs fed: shards in flight, model actors, MegaSaM runs that fit the GPUs
    beside the actors (0 when MegaSaM uses no GPU or none is there yet), and MegaSaM passes per
    shard (the mean over the shards that run MegaSaM)."""

    inflight: int
    actors: int
    megasam_slots: int
    scenes_per_shard: float

    @property
    def megasam_shards(self) -> int:
        """The shards in flight whose scene passes fill every MegaSaM slot."""
        return math.ceil(self.megasam_slots / self.scenes_per_shard) if self.megasam_slots else 0

    def needed(self) -> int:
        """The fewest shards in flight that keep every model actor and every MegaSaM slot busy."""
        return max(2 * self.actors, self.megasam_shards, 1)

    def warning(self) -> str | None:
        need = self.needed()
        if self.inflight >= need:
            return None
        why = []
        if 2 * self.actors > self.inflight:
            why.append(f"{self.actors} model actors take 2 shards each")
        if self.megasam_shards > self.inflight:
            why.append(
                f"the GPUs fit {self.megasam_slots} MegaSaM runs and a shard brings "
                f"{self.scenes_per_shard:.3g} scene passes (at most "
                f"{self.inflight * self.scenes_per_shard:.0f} runs at once now)"
            )
        return (
            f"max_inflight_shards is {self.inflight}, too few to keep the GPUs busy: "
            + "; ".join(why)
            + f". Set max_inflight_shards to at least {need} (each shard in flight holds its clips in the "
            "object store: size it against the nodes' memory)"
        )


def feed_for(cfg: "BuildConfig", total_gpus: float, clips_by_shard: dict[str, list[dict]]) -> Feed:
    """The :class:`Feed` of a build of ``clips_by_shard`` (the plan's clips per shard) on a cluster
    of ``total_gpus`` GPUs, read from the stage declarations (``cfg`` resolved)."""
    present = {c["dataset"] for clips in clips_by_shard.values() for c in clips} & set(cfg.datasets)
    routes = {d: {s.name: s for s in route(cfg, d)} for d in sorted(present)}
    actors: dict[str, int] = {}
    actor_gpus = 0.0
    for steps in routes.values():
        for s in steps.values():
            if s.runs_as == "actor" and s.name not in actors:
                actors[s.name] = s.actors
                actor_gpus += s.actors * s.num_gpus
    megasam = next((r["megasam"] for r in routes.values() if "megasam" in r), None)
    slots = 0
    if megasam is not None and megasam.num_gpus > 0 and total_gpus > actor_gpus:
        slots = int((total_gpus - actor_gpus) / megasam.num_gpus + 1e-9)
    passes = []
    for clips in clips_by_shard.values():
        mine = [c for c in clips if "megasam" in routes.get(c["dataset"], {})]
        if mine:
            per_scene = megasam is not None and megasam.granularity == "scene"
            passes.append(len({c["scene"] for c in mine}) if per_scene else len(mine))
    return Feed(
        inflight=cfg.max_inflight_shards,
        actors=sum(actors.values()),
        megasam_slots=slots if passes else 0,
        scenes_per_shard=sum(passes) / len(passes) if passes else 1.0,
    )


IDLE_WARN = 0.10  # share of a model's time waiting between calls that is worth a warning
MAX_ASK = 4  # the setting the warning asks for is at most this many times the current one
FREE_CPUS = 2.0  # CPUs free at a shard's completion: more than the one its last task just released


class FeedMonitor:
    """Judges, once the pipeline has been full, whether the model actors wait for shards.

    ``observe`` takes each finished shard's stats (``<stage>.model_held_s`` and
    ``<stage>.model_idle_s`` of the calls that served it), how many shards are still queued, and
    a callable giving the cluster's unreserved CPUs (asked only while judging). The first
    ``inflight`` shards fill the pipeline (the actors wait for the first ingest) and are not
    judged; the next ``inflight`` are. The shards in flight are what limits the build when, at
    those completions, shards were queued **and** CPUs were free (the tasks around the models
    were not short of cores: a build short of them gains nothing from more shards). A model stage
    is judged only when every judged shard went through it: where other datasets' shards need no
    model, it waits while they flow, and more shards in flight would not change that (the demo).
    Then, when a model stage's idle share over them exceeds :data:`IDLE_WARN`, the
    warning (returned once) gives the share and ``inflight / (1 - share)`` (at most
    :data:`MAX_ASK` times the setting): a starved actor's throughput grows with the shards in flight.
    """

    def __init__(self, inflight: int, stages: tuple[str, ...] | list[str]):
        self.inflight, self.stages = inflight, tuple(stages)
        self.seen = 0
        self.held = dict.fromkeys(self.stages, 0.0)
        self.idle = dict.fromkeys(self.stages, 0.0)
        self.used = dict.fromkeys(self.stages, 0)  # judged shards that went through the model
        self.queued = 0  # judged completions with shards queued
        self.cpus_free = 0  # ... and with CPUs free
        self.said = False

    def observe(self, stats: dict, queued: int, spare_cpus) -> str | None:
        self.seen += 1
        if self.said or not self.stages or self.seen <= self.inflight:
            return None
        if queued > 0:
            self.queued += 1
            self.cpus_free += spare_cpus() >= FREE_CPUS
        for st in self.stages:
            held = float(stats.get(f"{st}.model_held_s", 0.0))
            self.used[st] += held > 0
            self.held[st] += held
            self.idle[st] += float(stats.get(f"{st}.model_idle_s", 0.0))
        if self.seen < 2 * self.inflight:
            return None
        self.said = True
        judged = self.seen - self.inflight
        share = {
            st: self.idle[st] / (self.held[st] + self.idle[st])
            for st in self.stages
            if self.used[st] == judged and self.held[st] + self.idle[st]
        }
        worst = max(share, key=share.get, default=None)
        # shards queued at every judged completion, CPUs free at most of them
        feed_bound = self.queued == judged and 2 * self.cpus_free > judged
        if worst is None or share[worst] <= IDLE_WARN or not feed_bound:
            return None
        cap = MAX_ASK * self.inflight
        need = min(cap, math.ceil(self.inflight / (1.0 - share[worst]) - 1e-9)) if share[worst] < 1 else cap
        return (
            f"the {worst} model waited for shards {share[worst]:.0%} of its time over the last {judged} "
            f"shards while shards were queued and CPUs were free: max_inflight_shards is {self.inflight}, "
            f"too few to cover a shard's time in the stages around the model. Set it to at least {need} "
            "for this data and cluster (each shard in flight holds its clips in the object store)"
        )
