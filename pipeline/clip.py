"""The clip contract: what every stage receives and returns, and what a shard sample decodes to.

A clip is T frames of one scene. Conventions (see :mod:`pipeline.geometry`): OpenCV camera,
camera-to-world 4x4, metres, pixel intrinsics fx fy cx cy for the stored image size.
:meth:`Clip.validate` is the single check of that contract; every stage calls it on what it
emits so a broken clip fails where it was broken, with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ClipError(ValueError):
    """A clip violates the contract or its source is bad. ``path`` names the offending file."""

    def __init__(self, reason: str, path: str | None = None):
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


DEPTH_SOURCES = ("none", "gt", "vda", "vda_metric", "megasam", "aligned")
TRACK_SOURCES = ("none", "gt", "cotracker", "depth_static")


@dataclass
class ClipMeta:
    """Metadata carried with every clip into the shard (JSON-serialisable)."""

    dataset: str
    scene: str
    clip_id: str
    frame_indices: list[int]
    dynamic: bool
    real: bool
    depth_source: str = "none"
    track_source: str = "none"
    loss_weights: dict[str, float] = field(default_factory=lambda: {"depth": 1.0, "motion": 1.0, "photo": 1.0})
    adapter_version: str = "0"
    config_hash: str = ""
    d4s_version: str = ""
    untrained_models: list[str] = field(default_factory=list)
    qc: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ClipMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Clip:
    """T frames of one scene in the d4s convention.

    rgb:        (T, H, W, 3) uint8
    intrinsics: (T, 4) float64, fx fy cx cy in pixels
    c2w:        (T, 4, 4) float64, OpenCV camera-to-world, metres
    depth:      optional (T, H, W) float32 metres (z-depth); ``depth_valid`` (T, H, W) bool
    tracks:     optional (T, N, 3) float32 world metres; ``track_visible`` (T, N) bool
    """

    meta: ClipMeta
    rgb: np.ndarray
    intrinsics: np.ndarray
    c2w: np.ndarray
    depth: np.ndarray | None = None
    depth_valid: np.ndarray | None = None
    tracks: np.ndarray | None = None
    track_visible: np.ndarray | None = None
    # Intermediate arrays passed between stages and never written to a shard, e.g.
    # "relative_depth" (the depth model's output before alignment), "dynamic_mask" (T,H,W).
    aux: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def key(self) -> str:
        return self.meta.clip_id

    def validate(self) -> "Clip":
        """Raise :class:`ClipError` if shapes, dtypes or values break the contract."""
        where = f"{self.meta.dataset}/{self.meta.scene}/{self.meta.clip_id}"
        t = self.rgb.shape[0] if self.rgb.ndim == 4 else -1
        if self.rgb.ndim != 4 or self.rgb.shape[-1] != 3 or self.rgb.dtype != np.uint8:
            raise ClipError(f"rgb must be (T,H,W,3) uint8, got {self.rgb.shape} {self.rgb.dtype}", where)
        _, h, w, _ = self.rgb.shape
        if len(self.meta.frame_indices) != t:
            raise ClipError(f"{len(self.meta.frame_indices)} frame indices for {t} frames", where)
        if self.intrinsics.shape != (t, 4):
            raise ClipError(f"intrinsics must be ({t},4), got {self.intrinsics.shape}", where)
        if self.c2w.shape != (t, 4, 4):
            raise ClipError(f"c2w must be ({t},4,4), got {self.c2w.shape}", where)
        if not np.all(np.isfinite(self.intrinsics)) or np.any(self.intrinsics[:, :2] <= 0):
            raise ClipError("intrinsics are non-finite or have non-positive focal length", where)
        if not np.all(np.isfinite(self.c2w)):
            raise ClipError("camera pose contains NaN/inf", where)
        if self.depth is not None:
            if self.depth.shape != (t, h, w):
                raise ClipError(f"depth must be ({t},{h},{w}), got {self.depth.shape}", where)
            if self.depth_valid is None or self.depth_valid.shape != self.depth.shape:
                raise ClipError("depth needs a validity mask of the same shape", where)
            if np.any(~np.isfinite(self.depth[self.depth_valid])) or np.any(self.depth[self.depth_valid] <= 0):
                raise ClipError("valid depth must be finite and positive", where)
        if self.tracks is not None:
            if self.tracks.ndim != 3 or self.tracks.shape[0] != t or self.tracks.shape[2] != 3:
                raise ClipError(f"tracks must be ({t},N,3), got {self.tracks.shape}", where)
            if self.track_visible is None or self.track_visible.shape != self.tracks.shape[:2]:
                raise ClipError("tracks need a (T,N) visibility mask", where)
            if np.any(~np.isfinite(self.tracks[self.track_visible])):
                raise ClipError("visible track points must be finite", where)
        if self.meta.depth_source not in DEPTH_SOURCES:
            raise ClipError(f"unknown depth_source {self.meta.depth_source!r}", where)
        if self.meta.track_source not in TRACK_SOURCES:
            raise ClipError(f"unknown track_source {self.meta.track_source!r}", where)
        return self


@dataclass
class ClipFailure:
    """A clip that could not be made: recorded in the ledger, never written to a shard."""

    clip_id: str
    stage: str
    reason: str
    path: str | None = None
    # counters of work done for the clip before it failed (``Clip.aux['stats']``): still counted
    # in the shard's write result, never written to the ledger's failure record
    stats: dict = field(default_factory=dict, repr=False, compare=False)
    # a lost worker or node, out of memory, a timeout, an unreachable store (pipeline/failures.py):
    # the shard is re-run, never published without the clip
    transient: bool = False

    def to_json(self) -> dict:
        rec = {"clip_id": self.clip_id, "stage": self.stage, "reason": self.reason, "path": self.path}
        if self.transient:  # never in a published shard's record: such a shard is re-run (stages/write.py)
            rec["transient"] = True
        return rec

    def carrying(self, clip: "Clip") -> "ClipFailure":
        """This failure with the counters ``clip`` had gathered (see ``stats``)."""
        self.stats = dict(clip.aux.get("stats", {}))
        return self

    @classmethod
    def from_exception(cls, clip_id: str, stage: str, exc: BaseException) -> "ClipFailure":
        from pipeline.failures import is_transient

        if isinstance(exc, ClipError):
            return cls(clip_id, stage, exc.reason, exc.path, transient=is_transient(exc))
        return cls(clip_id, stage, f"{type(exc).__name__}: {exc}", transient=is_transient(exc))
