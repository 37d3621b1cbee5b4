"""A scene's frame sequence, assembled from the clips of one shard, and cut back into clips.

The model stages that run per scene (depth, MegaSaM, the metric fit) need every frame that any
clip of the scene uses, once and in order. The clips are ingested as usual (one task per clip,
so bad input still fails only its clip); this module puts their frames together: the sequence
is the sorted union of the clips' source frame indices, and ``positions[clip_id]`` maps each
clip frame to its place in the sequence, so a per-frame result of the scene cuts back into
clips by indexing. With ``clip_stride`` a multiple of ``frame_stride`` (every default) the
sequence is the scene at its frame stride; otherwise clips interleave and the steps vary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.clip import Clip, ClipError


def group_key(clip: Clip, granularity: str) -> str:
    """Which pass a clip belongs to: its scene (``granularity == 'scene'``) or itself."""
    if granularity == "clip":
        return clip.key
    return clip.key.rsplit("__", 1)[0]


def group_clips(clips: list, granularity: str) -> dict[str, list[Clip]]:
    """The :class:`Clip` s of ``clips`` by group key, in first-seen order (failures left out)."""
    out: dict[str, list[Clip]] = {}
    for c in clips:
        if isinstance(c, Clip):
            out.setdefault(group_key(c, granularity), []).append(c)
    return out


@dataclass
class SceneSequence:
    """Frames ``frames`` (source indices, increasing) of one scene, assembled from ``clips``."""

    key: str
    dataset: str
    scene: str
    frames: np.ndarray  # (T,) int64
    positions: dict[str, np.ndarray] = field(default_factory=dict)  # clip id -> (T_clip,) positions
    _first: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)  # position -> (clip, frame)
    clips: list[Clip] = field(default_factory=list, repr=False)

    @classmethod
    def from_clips(cls, key: str, clips: list[Clip]) -> "SceneSequence":
        if not clips:
            raise ValueError(f"{key}: a scene sequence needs at least one clip")
        frames = np.unique(np.concatenate([np.asarray(c.meta.frame_indices, np.int64) for c in clips]))
        seq = cls(key, clips[0].meta.dataset, clips[0].meta.scene, frames, clips=list(clips))
        hw = clips[0].rgb.shape[1:3]
        for ci, c in enumerate(clips):
            if c.meta.scene != seq.scene:
                raise ValueError(f"{key}: clip {c.key} is of scene {c.meta.scene!r}, not {seq.scene!r}")
            if c.rgb.shape[1:3] != hw:
                raise ClipError(
                    f"frames of {c.rgb.shape[2]}x{c.rgb.shape[1]} in a scene of {hw[1]}x{hw[0]} (clip "
                    f"{clips[0].key}): a scene pass needs one image size",
                    f"{seq.dataset}/{seq.scene}",
                )
            pos = np.searchsorted(frames, np.asarray(c.meta.frame_indices, np.int64))
            seq.positions[c.key] = pos
            for fi, p in enumerate(pos):
                seq._first.setdefault(int(p), (ci, fi))
        return seq

    @property
    def num_frames(self) -> int:
        return int(self.frames.size)

    def gather(self, get: Callable[[Clip], np.ndarray]) -> np.ndarray:
        """A per-frame array of the scene from the clips' per-frame arrays ``get(clip)`` (T_clip, ...):
        each sequence position takes the frame of the first clip holding it."""
        sources = [np.asarray(get(c)) for c in self.clips]
        first = sources[0]
        out = np.empty((self.num_frames,) + first.shape[1:], dtype=first.dtype)
        for p in range(self.num_frames):
            ci, fi = self._first[p]
            out[p] = sources[ci][fi]
        return out

    def rgb(self) -> np.ndarray:
        return self.gather(lambda c: c.rgb)

    def cut(self, clip_id: str, arr: np.ndarray) -> np.ndarray:
        """The rows of a per-frame scene array ``arr`` that belong to clip ``clip_id``."""
        return np.asarray(arr)[self.positions[clip_id]]

    def subset_positions(self, frames: np.ndarray) -> np.ndarray:
        """Positions of this sequence's frames inside another sequence with frames ``frames``
        (which must contain them all): to use a result computed over a superset of frames."""
        frames = np.asarray(frames, np.int64)
        pos = np.searchsorted(frames, self.frames)
        if np.any(pos >= frames.size) or np.any(frames[np.minimum(pos, frames.size - 1)] != self.frames):
            missing = sorted(set(self.frames.tolist()) - set(frames.tolist()))[:5]
            raise ValueError(f"{self.key}: frames {missing} are not in the result's frames")
        return pos
