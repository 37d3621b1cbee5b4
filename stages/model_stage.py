"""The one loop every model stage runs on a shard's clips: select, group, batch, fall back, mark.

A model stage (Video Depth Anything, CoTracker3, ...) receives a shard's clips (some already
:class:`ClipFailure` s) and returns them in the same order. :meth:`ModelStage.process`:

1. selects the clips that need work (:meth:`wants`); the others pass through untouched;
2. groups them into passes (:meth:`group_of`): a scene for scene passes, else the clip itself;
3. prepares each pass's model input on the host (:meth:`prepare`: e.g. a scene's frames put
   together from its clips) *outside* ``model_lock``, so a model actor taking two calls at once
   assembles one while the other holds the GPU; a pass whose preparation raises fails alone;
4. runs the model once over all prepared passes (:meth:`infer`, batched as the stage likes) while
   holding ``model_lock``; when that batch fails, every pass is retried alone, so one bad input
   cannot fail its neighbours;
5. hands each clip its part of its pass's result (:meth:`finish`, outside the lock); an exception
   there fails that clip only, an exception of its pass fails the pass's clips, each with the reason;
6. marks clips whose model ran with random weights (``meta.untrained_models``);
7. leaves counters (``aux['stats']``: e.g. frames through the model, and ``<stage>.model_held_s``,
   the seconds the call held the model) on the first clip of each pass (carried on by the clip's
   failure if it fails later), for the shard's write result.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from typing import Any

from pipeline.clip import Clip, ClipFailure


class ModelStage(ABC):
    #: stage name recorded with failures
    name: str = "model"
    #: the tag ``meta.untrained_models`` gets when the model has random weights
    untrained_tag: str = ""

    @property
    def untrained(self) -> bool:
        return False

    # -- what a stage implements -----------------------------------------------------------------
    @abstractmethod
    def wants(self, clip: Clip) -> bool:
        """Whether this clip needs the stage (e.g. has no depth yet)."""

    def warm_up(self) -> None:
        """Run the model once on made-up input. The model actor calls it at start on a GPU, so the
        one-time costs of a first forward (CUDA context, loading the CUDA libraries' kernels,
        allocator growth: seconds on a fresh node) fall in the actor's start-up instead of in the
        first shard's time and deadline. Default: nothing."""
        return None

    def group_of(self, clip: Clip) -> str:
        """The pass a clip belongs to; default: each clip is its own pass."""
        return clip.key

    def prepare(self, members: list[Clip]) -> Any:
        """One pass's model input, made on the host outside the model lock; raising fails the pass.
        Default: the pass's clips as they are."""
        return members

    @abstractmethod
    def infer(self, passes: list[Any]) -> list[Any]:
        """One result per prepared pass (:meth:`prepare`'s outputs, same order); may batch across
        passes. Raising fails the batch (then each pass is retried alone); an exception *returned* for
        a pass fails that pass only."""

    @abstractmethod
    def finish(self, clip: Clip, result: Any, members: list[Clip]) -> Clip:
        """Put the clip's part of its pass's ``result`` into it; raising fails this clip."""

    def stats(self, members: list[Clip], result: Any) -> dict[str, float]:
        """Counters of one pass (summed into the shard's write result)."""
        return {}

    # -- the loop --------------------------------------------------------------------------------
    def process(self, clips: list, model_lock=None) -> list:
        """``model_lock``: held around the model calls only (the actor's lock over its one model)."""
        todo = [c for c in clips if isinstance(c, Clip) and self.wants(c)]
        if not todo:
            return clips
        passes: dict[str, list[Clip]] = {}
        for c in todo:
            passes.setdefault(self.group_of(c), []).append(c)
        groups = list(passes.values())
        prepared: list = []
        for members in groups:
            try:
                prepared.append(self.prepare(members))
            except Exception as exc:  # noqa: BLE001 - this pass fails, the others run
                prepared.append(exc)
        live = [i for i, p in enumerate(prepared) if not isinstance(p, BaseException)]
        results: dict[int, Any] = {}
        with model_lock if model_lock is not None else contextlib.nullcontext():
            t_held = time.perf_counter()
            try:
                got = self.infer([prepared[i] for i in live]) if live else []
                if len(got) != len(live):
                    raise RuntimeError(f"{self.name}: {len(got)} results for {len(live)} passes")
                results = dict(zip(live, got))
            except Exception as exc:  # noqa: BLE001 - retried pass by pass, so the bad input is isolated
                if len(live) == 1:  # one pass: it is the bad input (no second, doomed attempt)
                    results[live[0]] = exc
                for i in live if len(live) > 1 else []:
                    try:
                        results[i] = self.infer([prepared[i]])[0]
                    except Exception as exc:  # noqa: BLE001 - the pass's failure, raised below
                        results[i] = exc
            held_s = time.perf_counter() - t_held
        out: dict[str, Clip | ClipFailure] = {}
        # seconds this call held the model (the GPU), shared by the passes that reached it: what a
        # GPU-bound actor's throughput is made of (``prepare`` and ``finish`` overlap the other
        # call's hold); a pass that failed in the model carries its share too, so a shard's sum is
        # the whole hold
        held_share = {f"{self.name}.model_held_s": held_s / len(live)} if live else {}
        for i, members in enumerate(groups):
            try:
                res = results[i] if i in results else prepared[i]
                if isinstance(res, BaseException):
                    raise res
            except Exception as exc:  # noqa: BLE001 - the pass's failure is each of its clips' failure
                for c in members:
                    out[c.key] = ClipFailure.from_exception(c.key, self.name, exc).carrying(c)
                if i in results:
                    add_stats(out[members[0].key], held_share)
                continue
            for c in members:
                try:
                    done = self.finish(c, res, members)
                    if self.untrained and self.untrained_tag not in done.meta.untrained_models:
                        done.meta.untrained_models.append(self.untrained_tag)
                    out[c.key] = done
                except Exception as exc:  # noqa: BLE001 - this clip's failure only
                    out[c.key] = ClipFailure.from_exception(c.key, self.name, exc).carrying(c)
            add_stats(out[members[0].key], self.stats(members, res) | held_share)
        return [out.get(c.key, c) if isinstance(c, Clip) else c for c in clips]


def add_stats(clip: Clip | ClipFailure, stats: dict[str, float]) -> None:
    """Add counters to ``clip.aux['stats']`` (or a failure's ``stats``), summed per shard by the
    write stage."""
    acc = clip.aux.setdefault("stats", {}) if isinstance(clip, Clip) else clip.stats
    for k, v in stats.items():
        acc[k] = acc.get(k, 0) + v
