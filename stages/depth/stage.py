"""Depth stage: Video Depth Anything on clips that carry no metric depth.

Runs in a model actor (one model per actor, loaded once). All clips of a shard go to the model
together, so their windows share forward passes. The output is not yet metric: it is stored in
``clip.aux['relative_depth']`` (with ``aux['relative_kind']``: 'disparity' for the relative
model, 'metric_depth' for the metric one) for the align stage, which makes it metric.
"""
from __future__ import annotations

from pipeline.clip import Clip, ClipFailure
from pipeline.config import BuildConfig
from stages.contract import StageContract

CONTRACT = StageContract(
    name="depth",
    inputs=("rgb",),
    outputs=("aux.relative_depth", "aux.relative_kind", "meta.untrained_models"),
    runs_as="actor pool (GPU per actor when present, else CPU)",
    acts_when="the dataset's depth_source is not 'gt' and the clip has no depth",
    errors="model failure on the clip's frames",
)


class DepthModelStage:
    def __init__(self, cfg: BuildConfig, device: str):
        from stages.depth.vda.runner import VDARunner

        d = cfg.stages.depth
        self.metric = d.metric
        self.runner = VDARunner(encoder=d.encoder, checkpoint=d.checkpoint, metric=d.metric, device=device,
                                dtype=d.dtype if device != "cpu" else "fp32", input_size=d.input_size,
                                compile=d.compile, allow_random_weights=d.allow_random_weights)

    def process(self, clips: list) -> list:
        todo = [c for c in clips if isinstance(c, Clip) and c.depth is None]
        if not todo:
            return clips
        try:
            preds = self.runner.predict([c.rgb for c in todo])
        except Exception:
            preds = None  # isolate the bad clip below instead of failing the batch
        out_by_id = {}
        for i, c in enumerate(todo):
            try:
                p = preds[i] if preds is not None else self.runner.predict([c.rgb])[0]
                c.aux["relative_depth"] = p
                c.aux["relative_kind"] = "metric_depth" if self.metric else "disparity"
                if self.runner.untrained and "vda" not in c.meta.untrained_models:
                    c.meta.untrained_models.append("vda")
                out_by_id[c.key] = c
            except Exception as exc:
                out_by_id[c.key] = ClipFailure.from_exception(c.key, "depth", exc)
        return [out_by_id.get(c.key, c) if isinstance(c, Clip) else c for c in clips]
