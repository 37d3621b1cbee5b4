"""Depth stage: Video Depth Anything on clips that carry no metric depth, once per scene.

Runs in a model actor (one model per actor, loaded once) on the :class:`ModelStage` loop. With
scene passes (``stages.scene.granularity: scene``, the default) the clips of one scene form one
pass: the model sees the scene's frame sequence (every frame any of its clips uses, once, in
order; ``stages/scene/sequence.py``), so VDA's 32-frame windows are full and its temporal
consistency spans the scene. Scenes longer than ``stages.scene.max_frames`` run as overlapping
segments joined like VDA joins its windows (``stages/scene/segments.py``). All passes of a shard
go to the model together, so their windows share forward passes. Each clip then gets its frames'
rows of the scene's prediction.

The output is not yet metric: it is stored in ``clip.aux['relative_depth']`` (with
``aux['relative_kind']``: 'disparity' for the relative model, 'metric_depth' for the metric one)
for the align stage, which makes it metric.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.clip import Clip
from pipeline.config import BuildConfig
from stages.contract import StageContract
from stages.model_stage import ModelStage
from stages.scene.segments import join_maps, plan_segments
from stages.scene.sequence import SceneSequence, group_key

CONTRACT = StageContract(
    name="depth",
    inputs=("rgb (all clips of a scene)",),
    outputs=("aux.relative_depth", "aux.relative_kind", "meta.untrained_models"),
    runs_as="actor pool, stages.depth.resources per actor (1 GPU by default; CPU only with num_gpus: 0); "
    "one pass per scene (or per clip)",
    acts_when="the dataset's depth_source is not 'gt' and the clip has no depth",
    errors="model failure on the scene's frames (fails the scene's clips)",
)


class DepthModelStage(ModelStage):
    name = "depth"
    untrained_tag = "vda"

    def __init__(self, cfg: BuildConfig, device: str, runner=None):
        d = cfg.stages.depth
        self.metric = d.metric
        self.granularity = cfg.stages.scene.granularity
        self.max_frames = cfg.stages.scene.max_frames
        self.input_size = d.input_size
        self.overlap = cfg.stages.scene.overlap_frames
        if runner is None:
            from stages.depth.vda.runner import VDARunner

            runner = VDARunner(
                encoder=d.encoder,
                checkpoint=d.checkpoint,
                metric=d.metric,
                device=device,
                dtype=d.dtype if device != "cpu" else "fp32",
                input_size=d.input_size,
                compile=d.compile,
                allow_random_weights=d.allow_random_weights,
            )
        self.runner = runner
        # warm every shape of a new frame size before the model call (VDARunner.warm_for): first-use
        # plan building is a GPU (cuDNN) cost; on the CPU a warm-up would only repeat work
        self.warm_per_size = device != "cpu"

    @property
    def untrained(self) -> bool:
        return bool(self.runner.untrained)

    def wants(self, clip: Clip) -> bool:
        return clip.depth is None

    def warm_up(self) -> None:
        """One window of blank frames at the network's input size through the model."""
        from stages.depth.vda.infer import INFER_LEN

        self.runner.predict([np.zeros((INFER_LEN, self.input_size, self.input_size, 3), np.uint8)])

    def group_of(self, clip: Clip) -> str:
        return group_key(clip, self.granularity)

    def prepare(self, members: list[Clip]):
        """The pass's frame sequence, put together from its clips, and its segments (host work, done
        outside the model lock)."""
        seq = SceneSequence.from_clips(group_key(members[0], self.granularity), members)
        rgb = seq.rgb()
        segs = plan_segments(seq.num_frames, self.max_frames, self.overlap)
        return seq, segs, [rgb[a:b] for a, b in segs]

    def infer(self, passes: list) -> list:
        """Every segment of every pass through the model in one call; joined per pass. A frame size
        the runner has not met yet is warmed up first (``depth.warmup_s``, not model time)."""
        videos = [v for _, _, vs in passes for v in vs]
        warm_s = self.runner.warm_for(videos) if videos and self.warm_per_size else 0.0
        t0 = time.perf_counter()
        preds = self.runner.predict(videos) if videos else []
        model_s = time.perf_counter() - t0
        total = max(1, sum(len(v) for v in videos))
        out, first = [], 0
        for seq, segs, _ in passes:
            parts = preds[first : first + len(segs)]
            first += len(segs)
            depth = parts[0] if len(parts) == 1 else join_maps(parts, segs, "scale" if self.metric else "affine")[0]
            frames = sum(b - a for a, b in segs)  # the call's seconds are shared by model frames
            out.append((seq, depth, segs, model_s * frames / total, warm_s * frames / total))
        return out

    def finish(self, clip: Clip, result, members: list[Clip]) -> Clip:
        seq, depth, *_ = result
        clip.aux["relative_depth"] = seq.cut(clip.key, depth)
        clip.aux["relative_kind"] = "metric_depth" if self.metric else "disparity"
        return clip

    def stats(self, members: list[Clip], result) -> dict[str, float]:
        seq, _, segs, model_s, warm_s = result
        return {
            "depth.passes": 1,
            "depth.source_frames": seq.num_frames,
            "depth.model_frames": sum(b - a for a, b in segs),
            "depth.clip_frames": sum(c.num_frames for c in members),
            "depth.model_s": model_s,
            "depth.warmup_s": warm_s,
        }
