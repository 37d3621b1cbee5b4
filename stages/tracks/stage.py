"""Track stage: 3D point tracks for clips without ground-truth tracks.

Two routes, chosen per dataset by ``track_source``:

* ``depth_static`` (static scenes): exact tracks from metric depth and poses — a grid of
  points unprojected in query frames and reprojected into every frame, visibility by a depth
  test. CPU task.
* ``cotracker``: CoTracker3 2D tracks from a model actor, lifted to world metres with the
  clip's (aligned) metric depth and c2w, with an occlusion test (stages/tracks/lift.py).
"""

from __future__ import annotations

import numpy as np

from pipeline.clip import Clip, ClipFailure
from pipeline.config import BuildConfig
from stages.contract import StageContract
from stages.model_stage import ModelStage

CONTRACT = StageContract(
    name="tracks",
    inputs=("rgb", "depth", "depth_valid", "intrinsics", "c2w"),
    outputs=("tracks", "track_visible", "meta.track_source", "meta.qc"),
    runs_as="actor pool for cotracker, stages.tracks.resources per actor (1 GPU by default; CPU only with "
    "num_gpus: 0), CPU task for depth_static",
    acts_when="the clip has no ground-truth tracks and the dataset's track_source is cotracker or depth_static",
    errors="no metric depth to lift with; model failure",
)


def tracks_from_depth(clip, cfg: BuildConfig):
    if isinstance(clip, ClipFailure) or clip.tracks is not None:
        return clip
    from stages.tracks.lift import tracks_from_depth_static

    try:
        if clip.depth is None:
            raise ValueError("track_source 'depth_static' needs metric depth, and this clip has none")
        tracks, vis = tracks_from_depth_static(
            clip.depth, clip.depth_valid, clip.intrinsics, clip.c2w, grid=cfg.stages.tracks.grid_size
        )
        clip.tracks, clip.track_visible = np.asarray(tracks, np.float32), np.asarray(vis, bool)
        clip.meta.track_source = "depth_static"
        apply_static_track_qc(clip, cfg)
        return clip.validate()
    except Exception as exc:
        return ClipFailure.from_exception(clip.key, "tracks", exc).carrying(clip)


def apply_static_track_qc(clip: Clip, cfg: BuildConfig) -> None:
    """Static scenes: lifted tracks of one physical point must stay put in the world.

    Records median drift (metres and relative to the camera distance) and the share of tracks
    that stay within ``max_rel_drift`` in ``meta.qc['tracks']``; below ``min_kept_fraction`` the
    clip is dropped with the reason (unless ``drop_on_qc`` is off). With no track visible in two
    frames nothing can be measured: recorded as ``checked: false``, and the clip kept.
    """
    if clip.meta.dynamic:
        return
    from stages.tracks.lift import static_drift_qc

    t = cfg.stages.tracks
    qc = static_drift_qc(clip.tracks, clip.track_visible, clip.c2w, max_rel_drift=t.max_rel_drift)
    clip.meta.qc["tracks"] = qc
    if t.drop_on_qc and qc["checked"] and qc["kept_fraction"] < t.min_kept_fraction:
        raise ValueError(
            f"track QC: only {qc['kept_fraction']:.0%} of lifted tracks stay put in this static scene "
            f"(median drift {qc['median_drift_m']:.3f} m, {qc['median_drift_rel']:.1%} of depth)"
        )


class TrackModelStage(ModelStage):
    """CoTracker3 per clip on the :class:`ModelStage` loop: the clips of a shard in one batch."""

    name = "tracks"
    untrained_tag = "cotracker3"

    def __init__(self, cfg: BuildConfig, device: str, runner=None):
        t = cfg.stages.tracks
        self.cfg = cfg
        if runner is None:
            from stages.tracks.cotracker.runner import CoTrackerRunner

            runner = CoTrackerRunner(
                variant=t.variant,
                checkpoint=t.checkpoint,
                device=device,
                dtype=t.dtype if device != "cpu" else "fp32",
                grid_size=t.grid_size,
                query_frames=t.query_frames,
                allow_random_weights=t.allow_random_weights,
            )
        self.runner = runner

    @property
    def untrained(self) -> bool:
        return bool(self.runner.untrained)

    def wants(self, clip: Clip) -> bool:
        return clip.tracks is None

    def infer(self, passes: list[list[Clip]]) -> list:  # prepared passes: the clips (default prepare)
        return self.runner.track([members[0].rgb for members in passes])

    def finish(self, clip: Clip, result, members: list[Clip]) -> Clip:
        from stages.tracks.lift import lift_tracks

        tr2d, vis2d = result
        if clip.depth is None:
            raise ValueError("cannot lift 2D tracks: the clip has no metric depth (align stage output)")
        world, vis = lift_tracks(tr2d, vis2d, clip.depth, clip.depth_valid, clip.intrinsics, clip.c2w)
        clip.tracks, clip.track_visible = np.asarray(world, np.float32), np.asarray(vis, bool)
        clip.meta.track_source = "cotracker"
        apply_static_track_qc(clip, self.cfg)
        return clip.validate()

    def stats(self, members: list[Clip], result) -> dict[str, float]:
        return {"tracks.model_frames": sum(c.num_frames for c in members)}
