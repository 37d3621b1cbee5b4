"""MegaSaM stage: the metric reference of a scene (or of a clip), from the MegaSaM command.

One Ray task per scene pass, requesting the GPUs of ``stages.align.megasam_num_gpus`` whatever
the cluster has at start (an autoscaler adds GPU nodes for it; 0 runs it without a GPU, by
explicit choice); the GPU ids Ray assigned are the command's ``CUDA_VISIBLE_DEVICES``, which is
``""`` when Ray assigned none (Ray >= 2.60 leaves a task given no GPU seeing every GPU of its node,
``stages/gpus.py``, and the command must not take one held by a model actor). The
task assembles the scene's frame sequence from its ingested clips (``stages/scene/sequence.py``),
runs the command once per segment (one segment unless the scene is longer than
``stages.scene.max_frames``), each through the cache in the output store
(:func:`stages.align.megasam.run_cached`), joins the segments (``stages/scene/segments.py``) and
returns a :class:`SceneReference` for the align stage. It runs beside the depth stage, both
reading the ingested clips. A failure of the command is returned as a :class:`PassFailure`:
the align stage fails the scene's clips with its reason (transiently when the cause was, e.g. a
cache store that did not answer; a MegaSaM run that fails or times out after its own retries is
permanent, pipeline/failures.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.clip import Clip, ClipError
from pipeline.config import BuildConfig
from stages.align.megasam import MegaSaMCache, MegaSaMOutput, MegaSaMRunner, run_cached
from stages.align.references import MEGASAM_DEPTH_CEILING_M
from stages.contract import StageContract
from stages.gpus import cuda_visible_devices, ray_gpu_ids
from stages.scene.segments import join_maps, join_trajectories, plan_segments
from stages.scene.sequence import SceneSequence

CONTRACT = StageContract(
    name="megasam",
    inputs=("rgb (all clips of a scene)",),
    outputs=("metric reference of the scene: depth, cameras",),
    runs_as="task requesting GPUs (stages.align.megasam_num_gpus), the MegaSaM command once per scene "
    "or segment; results cached in the output store",
    acts_when="the dataset's depth_source is 'megasam'",
    errors="command crash, timeout or bad output (fails the scene's clips)",
)


@dataclass
class SceneReference:
    """MegaSaM's answer for the frames ``frames`` (source indices) of one pass."""

    key: str
    frames: np.ndarray
    output: MegaSaMOutput
    stats: dict = field(default_factory=dict)

    def for_frames(self, frames: np.ndarray, positions: np.ndarray) -> MegaSaMOutput:
        """The result restricted to sequence positions ``positions`` (of the frames ``frames``)."""
        o = self.output
        return MegaSaMOutput(
            images=None,
            depths=o.depths[positions],
            intrinsic=o.intrinsic,
            cam_c2w=o.cam_c2w[positions],
            path=o.path,
            cached=o.cached,
        )


@dataclass
class PassFailure:
    """A scene pass that failed: every clip of the pass fails with this stage and reason."""

    stage: str
    reason: str
    path: str | None = None
    # a lost worker or node, out of memory, an unreachable cache store (pipeline/failures.py): the
    # scene's clips fail transiently, so their shard is re-run rather than published without them
    transient: bool = False


def cache_url(cfg: BuildConfig) -> str:
    """Where MegaSaM results are cached: ``stages.align.cache_dir`` or ``OUT/cache/megasam``."""
    a = cfg.stages.align
    if a.cache_dir:
        return a.cache_dir
    return cfg.output.rstrip("/") + "/cache/megasam"


def megasam_pass(clips: list, key: str, cfg: BuildConfig, gpu_ids=None) -> SceneReference | PassFailure:
    """MegaSaM for the frames of the ingested ``clips`` of pass ``key`` (failures are skipped).

    ``gpu_ids``: the GPUs Ray assigned to this task (``[]``: none); None asks Ray, and outside a
    Ray worker leaves the command this process's environment."""
    members = [c for c in clips if isinstance(c, Clip)]
    if not members:
        return PassFailure("megasam", "no clip of this scene was ingested")
    a, sc = cfg.stages.align, cfg.stages.scene
    try:
        seq = SceneSequence.from_clips(key, members)
        rgb = seq.rgb()
        runner = MegaSaMRunner(
            a.megasam_command,
            None,  # this user's private scratch folder on the node
            timeout_s=a.megasam_timeout_s,
            retries=a.megasam_retries,
        )
        cache = MegaSaMCache(cache_url(cfg), a.megasam_cache_max_side)
        env = command_env(gpu_ids)
        segs = plan_segments(seq.num_frames, sc.max_frames, sc.overlap_frames)
        scene_part = members[0].key.rsplit("__", 1)[0]  # run ids: dataset__scene__<first frame>
        parts, stats = (
            [],
            {
                "megasam.passes": 1,
                "megasam.runs": 0,
                "megasam.cached": 0,
                "megasam.cache_bytes": 0,
                "megasam.frames": 0,
            },
        )
        for s, e in segs:
            run = run_cached(
                runner,
                cache,
                f"{scene_part}__{int(seq.frames[s]):06d}",
                rgb[s:e],
                frame_ids=seq.frames[s:e],
                version=a.megasam_version,
                env=env,
            )
            parts.append(run.output)
            stats["megasam.cached" if run.cached else "megasam.runs"] += 1
            stats["megasam.cache_bytes"] += run.bytes
            stats["megasam.frames"] += e - s
        out = parts[0] if len(parts) == 1 else _join(parts, segs)
        return SceneReference(key, seq.frames, out, stats)
    except ClipError as exc:  # AlignmentError: crash, timeout, bad output
        return PassFailure("megasam", exc.reason, exc.path)
    except Exception as exc:  # noqa: BLE001 - e.g. a bad template: the scene's clips fail with it
        from pipeline.failures import is_transient

        return PassFailure("megasam", f"{type(exc).__name__}: {exc}", transient=is_transient(exc))


def command_env(gpu_ids=None) -> dict:
    """The MegaSaM command's environment: this process's, with ``CUDA_VISIBLE_DEVICES`` set to the
    GPUs Ray assigned (``""`` for none) inside a Ray worker, or to ``gpu_ids`` when given."""
    if gpu_ids is None:
        gpu_ids = ray_gpu_ids()
    env = dict(os.environ)
    if gpu_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(gpu_ids)
    return env


def _join(parts: list[MegaSaMOutput], segs: list[tuple[int, int]]) -> MegaSaMOutput:
    depth, coeffs = join_maps([p.depths for p in parts], segs, "scale", ceiling=MEGASAM_DEPTH_CEILING_M)
    c2w = join_trajectories([p.cam_c2w for p in parts], segs, [s for s, _ in coeffs])
    return MegaSaMOutput(
        images=None,
        depths=depth,
        intrinsic=parts[0].intrinsic,
        cam_c2w=c2w,
        path=parts[0].path,
        cached=all(p.cached for p in parts),
    )
