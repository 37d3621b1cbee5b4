"""The adapter interface: one subclass per dataset turns its official layout into clips.

An adapter knows three things about its dataset: where scenes are (``discover``), how many
frames each has, and how to read frames ``[i0, i1, ...]`` of a scene into a :class:`Clip` in the
d4s convention (``load_clip``). Everything else — planning, stages, shards — is generic.
Adapters raise :class:`ClipError` naming the offending file for any bad input; the runner
records that against the clip and moves on.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from pipeline.clip import Clip, ClipError, ClipMeta
from pipeline.config import ConfigError, DepthSource, TrackSource
from pipeline.failures import is_transient
from pipeline.storage import PathEscapeError, Store

#: Bytes fetched ahead of a read that misses the buffer, for discovery's reads of a few bytes here
#: and there of big files on an object store (an npz's small array, TFRecord record headers):
#: fsspec's default block (50 MiB on s3fs) would download the whole file (``Store.open``).
DISCOVERY_BLOCK = 1 << 16


@dataclass(frozen=True)
class Capabilities:
    """What the dataset provides; later stages decide from this what they must compute."""

    dynamic: bool
    has_depth: bool
    has_tracks: bool
    real: bool
    metric_poses: bool = True
    has_dynamic_mask: bool = False


@dataclass(frozen=True)
class AdapterDefaults:
    """Per-dataset defaults, overridable per dataset in the config."""

    clip_length: int = 16
    frame_stride: int = 1
    clip_stride: int = 16
    repeat_weight: float = 1.0
    loss_weights: dict = field(default_factory=lambda: {"depth": 1.0, "motion": 1.0, "photo": 1.0})
    depth_source: DepthSource = "gt"
    track_source: TrackSource = "gt"
    min_depth_m: float = 0.05
    max_depth_m: float = 1000.0


class AdapterOptions(BaseModel):
    """An adapter's options (``datasets.<name>.options``): none. An adapter that takes options
    declares them in a subclass and names it in its class attribute ``options_model``; the config
    validates ``options`` against it at load, so a misspelt option fails with its path and the
    allowed names, the adapter reads them typed as ``self.opts``, and docs/CONFIG.md lists every
    adapter's options (pipeline/config_doc.py)."""

    model_config = ConfigDict(extra="forbid")


def numbered_frame_count(names: list[str], pattern, first: int = 0) -> int:
    """A scene's frame count from its numbered image files (``pattern``'s group 1 is the number,
    counted from ``first``): the highest + 1. An image missing below it is a missing file of the
    clips that use that frame (each fails naming it), not a count that fails every clip."""
    nums = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return max(nums) - first + 1 if nums else 0


@dataclass(frozen=True)
class SceneRef:
    """One scene of a dataset: ``scene`` is its id relative to the root ('/'-separated)."""

    dataset: str
    scene: str
    num_frames: int
    extra: tuple = ()  # adapter-private, hashable (e.g. timestamps)
    # (reason, path) when discovery could not read the scene: it is planned one clip, which
    # fails at ingest with them (recorded like any bad input), and no other scene is held up
    problem: tuple = ()

    def refuse_if_unreadable(self) -> None:
        """Raise the :class:`ClipError` that discovery found, if any (the ingest stage asks)."""
        if self.problem:
            raise ClipError(*self.problem)


@dataclass
class ClipsRead:
    """What :meth:`DatasetAdapter.load_clips` read: per requested clip its Clip or the exception
    that failed it, and the frames read to make them (each distinct frame once when the clips
    were cut from one read of their union)."""

    clips: list
    frames_read: int


def union_index(pos: list[int]) -> slice | np.ndarray:
    """Index of a clip's frames in its scene's union read: a slice where they are a run of it (a
    strided clip always is), so the clip's arrays are views, not a copy of its pixels (Ray stores
    each returned clip's own bytes); else the positions."""
    if pos == list(range(pos[0], pos[0] + len(pos))):
        return slice(pos[0], pos[0] + len(pos))
    return np.array(pos)


class DatasetAdapter(ABC):
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    capabilities: ClassVar[Capabilities]
    defaults: ClassVar[AdapterDefaults] = AdapterDefaults()
    options_model: ClassVar[type[AdapterOptions]] = AdapterOptions
    #: An adapter whose clips are the scene's per-frame arrays (frames, cameras, depth; nothing
    #: chosen per clip, such as Stereo4D's tracks) names here the ``meta.extra`` keys that hold one
    #: value per frame. :meth:`load_clips` then reads the union of a scene's clips once and cuts
    #: each clip from it. None: every clip is read on its own, unless the adapter cuts its clips
    #: itself (:meth:`reads_scene_union`, :meth:`read_union`, :meth:`cut_union`).
    union_extras: ClassVar[tuple[str, ...] | None] = None

    def __init__(
        self,
        root: str,
        options: dict[str, Any] | AdapterOptions | None = None,
        *,
        depth_range: tuple[float | None, float | None] = (None, None),
    ):
        self.store = Store(root)
        self.opts = self.validate_options(options)
        self.options = self.opts.model_dump()  # the same values as a plain dict, defaults filled in
        lo, hi = depth_range
        # metres of valid depth: the dataset config's min/max_depth_m, else the adapter's defaults
        self.depth_range = (
            self.defaults.min_depth_m if lo is None else float(lo),
            self.defaults.max_depth_m if hi is None else float(hi),
        )

    @classmethod
    def validate_options(cls, options: dict[str, Any] | AdapterOptions | None) -> AdapterOptions:
        """The typed options; a pydantic ``ValidationError`` names each bad one."""
        if isinstance(options, cls.options_model):
            return options
        return cls.options_model.model_validate(dict(options or {}))

    # -- to implement ----------------------------------------------------------------------
    @abstractmethod
    def discover(self) -> list[SceneRef]:
        """All scenes under the root, sorted by id (deterministic)."""

    @abstractmethod
    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        """Read frames (positions in the scene's frame list) into a validated Clip."""

    @classmethod
    def reads_scene_union(cls) -> bool:
        """Whether :meth:`load_clips` reads a scene's clips from one read of their frames' union
        (the build then ingests a scene pass's clips in one task)."""
        return cls.union_extras is not None

    def load_clips(self, scene: SceneRef, frame_lists: list[list[int]], metas: list[ClipMeta]) -> ClipsRead:
        """Several clips of one scene (a scene pass's): where :meth:`reads_scene_union`, the union
        of their frames is read once (overlapping clips share frames) and each clip cut from it, the
        same arrays and meta as :meth:`load_clip` gives it alone; should the union fail, each clip is
        read alone, so a bad frame fails only the clips that use it, each with its reason."""
        if self.reads_scene_union() and len(frame_lists) > 1:
            union = sorted(set().union(*map(set, frame_lists)))
            try:
                whole = self.read_union(scene, union, metas[0])
            except Exception:  # noqa: BLE001 - found again, per clip, below
                whole = None
            if whole is not None:
                return ClipsRead(self.cut_union(whole, union, frame_lists, metas), len(union))
        out: list = []
        for frames, meta in zip(frame_lists, metas):
            try:
                out.append(self.load_clip(scene, list(frames), meta))
            except Exception as exc:  # noqa: BLE001 - this clip's failure, as data
                out.append(exc)
        return ClipsRead(out, sum(len(f) for f in frame_lists))

    def read_union(self, scene: SceneRef, union: list[int], meta: ClipMeta):
        """One read of the frames ``union``, in the order given (the scene pass gives them sorted;
        an adapter's own ``load_clip`` may give a clip's order), for :meth:`cut_union`; by default
        the clip of those frames (:meth:`load_clip`), its per-frame extras named in ``union_extras``."""
        return self.load_clip(scene, union, dataclasses.replace(meta, frame_indices=union, extra={}, qc={}))

    def cut_union(self, whole, union: list[int], frame_lists: list[list[int]], metas: list[ClipMeta]) -> list:
        """Each clip (or the exception that fails it) cut from :meth:`read_union`'s result."""
        if whole.tracks is not None or whole.aux:
            raise TypeError(f"{self.name}: clips with tracks or aux arrays are chosen per clip; unset union_extras")
        at = {f: i for i, f in enumerate(union)}
        out: list = []
        for frames, meta in zip(frame_lists, metas):
            pos = [at[f] for f in frames]
            for key, value in whole.meta.extra.items():  # in the adapter's order: meta.json's bytes
                meta.extra.setdefault(
                    key, [value[i] for i in pos] if key in self.union_extras else copy.deepcopy(value)
                )
            idx = union_index(pos)
            part = Clip(meta=meta, rgb=whole.rgb[idx], intrinsics=whole.intrinsics[idx], c2w=whole.c2w[idx])
            if whole.depth is not None:
                part.depth, part.depth_valid = whole.depth[idx], whole.depth_valid[idx]
            try:
                out.append(part.validate())
            except Exception as exc:  # noqa: BLE001 - this clip's failure, as data
                out.append(exc)
        return out

    # -- shared helpers --------------------------------------------------------------------
    def where(self, rel: str) -> str:
        return self.store.display(rel)

    def unreadable_scene(self, scene: str, exc: Exception, rel: str) -> SceneRef:
        """A scene discovery could not read (``exc`` while reading ``rel``): planned, and failing
        its clip with the reason (:attr:`SceneRef.problem`)."""
        if isinstance(exc, ClipError):
            return SceneRef(self.name, scene, 0, problem=(exc.reason, exc.path or self.where(rel)))
        return SceneRef(self.name, scene, 0, problem=(f"{type(exc).__name__}: {exc}", self.where(rel)))

    def unlistable_scene(self, scene: str, exc: OSError, where: str) -> SceneRef:
        """A scene whose folder or file at ``where`` discovery could not list or look up: planned,
        and failing its clip with the reason."""
        why = f"{type(exc).__name__}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
        return SceneRef(self.name, scene, 0, problem=(f"cannot list or read ({why})", where))

    def listing_problems(self, scenes: list[SceneRef], errors: list, scene_of) -> list[SceneRef]:
        """``scenes`` with what discovery could not list or look up (``Store.glob``'s ``errors``:
        (path, exception)) added. ``scene_of(path)`` names the scene the path belongs to: that
        scene is planned with the reason, and its clip fails at ingest naming the path; False:
        the path could hold no scene of the dataset (ignored); None: it may hold several scenes,
        which cannot be planned without it, so discovery fails, in one line naming the folder."""
        have = {s.scene for s in scenes}
        out = list(scenes)
        for rel, exc in errors:
            scene = scene_of(rel)
            if scene is False or scene in have:
                continue
            why = f"{type(exc).__name__}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
            if scene is None:
                raise ConfigError(
                    f"dataset {self.name}: cannot list {self.where(rel)} ({why}): the scenes under it cannot "
                    "be planned; make it readable, or move it out of the dataset root"
                )
            have.add(scene)
            out.append(self.unlistable_scene(scene, exc, self.where(rel)))
        return out

    def read(self, rel: str) -> bytes:
        try:
            return self.store.read_bytes(rel)
        except PathEscapeError:  # a path from the dataset's metadata: never read
            raise ClipError(f"path {rel!r} leaves the dataset root", self.where("")) from None
        except OSError as exc:
            raise self.read_error(exc, rel) from None

    def read_error(self, exc: OSError, rel: str) -> ClipError:
        """The ClipError for an OSError reading ``rel``, naming the file: missing, a directory,
        unreadable (permission, I/O error, ...). A transient error (the network, a full disk) is
        not the input's fault: it is raised as it is, for the retry."""
        if isinstance(exc, FileNotFoundError):
            return ClipError("file is missing", self.where(rel))
        if isinstance(exc, IsADirectoryError):
            return ClipError("expected a file, found a directory", self.where(rel))
        if is_transient(exc):
            raise exc
        return ClipError(f"cannot read the file ({type(exc).__name__}: {exc.strerror or exc})", self.where(rel))

    def read_all(self, rels: list[str], batch: int = 256) -> dict[str, bytes | ClipError]:
        """Several files at once (concurrent requests on an object store, ``batch`` at a time): each
        its bytes, or the ClipError :meth:`read` would raise (a transient error raises)."""
        out: dict[str, bytes | ClipError] = {}
        for k in range(0, len(rels), batch):
            for rel, got in self.store.read_many(rels[k : k + batch]).items():
                if isinstance(got, OSError):
                    got = self.read_error(got, rel)
                elif isinstance(got, Exception):
                    raise got
                out[rel] = got
        return out

    def read_image(self, rel: str, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
        """RGB uint8 (H,W,3); a truncated or unreadable file is a ClipError naming it."""
        data = self.read(rel)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                arr = np.asarray(im.convert("RGB"))
        except Exception as exc:  # PIL raises several types for corrupt data
            raise ClipError(f"unreadable or truncated image ({type(exc).__name__}: {exc})", self.where(rel)) from None
        if expect_hw is not None and arr.shape[:2] != tuple(expect_hw):
            raise ClipError(
                f"image is {arr.shape[1]}x{arr.shape[0]}, expected {expect_hw[1]}x{expect_hw[0]}", self.where(rel)
            )
        return arr

    def read_png16(self, rel: str) -> np.ndarray:
        """A 16-bit single-channel PNG as uint16 (H,W)."""
        data = self.read(rel)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                    raise ValueError(f"expected a 16-bit single-channel PNG, got mode {im.mode}")
                arr = np.asarray(im).astype(np.uint16)
        except ClipError:
            raise
        except Exception as exc:
            raise ClipError(f"unreadable 16-bit PNG ({type(exc).__name__}: {exc})", self.where(rel)) from None
        return arr

    def read_npy(self, rel: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(self.read(rel)), allow_pickle=False)
        except ClipError:
            raise
        except Exception as exc:
            raise ClipError(f"unreadable .npy ({type(exc).__name__}: {exc})", self.where(rel)) from None

    def read_table(
        self, rel: str, ncols: int, skip_header: int = 0, comment: str = "#", data: bytes | None = None
    ) -> np.ndarray:
        """Whitespace-separated numbers; wrong column counts or non-numbers name the line.
        ``data``: the file's bytes when the caller has read them already (not fetched again)."""
        rows = []
        text = (self.read(rel) if data is None else data).decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines()[skip_header:], start=skip_header + 1):
            line = line.strip()
            if not line or line.startswith(comment):
                continue
            parts = line.replace(",", " ").split()
            if len(parts) != ncols:
                raise ClipError(f"line {lineno}: expected {ncols} values, found {len(parts)}", self.where(rel))
            try:
                rows.append([float(p) for p in parts])
            except ValueError:
                raise ClipError(f"line {lineno}: not a number in {line[:60]!r}", self.where(rel)) from None
        return np.asarray(rows, dtype=np.float64).reshape(-1, ncols)

    def finite_or_fail(self, arr: np.ndarray, what: str, rel: str) -> np.ndarray:
        if not np.all(np.isfinite(arr)):
            raise ClipError(f"{what} contains NaN/inf", self.where(rel))
        return arr

    def depth_validity(self, depth: np.ndarray) -> np.ndarray:
        lo, hi = self.depth_range
        return np.isfinite(depth) & (depth >= lo) & (depth <= hi)

    def frame_window(self, scene: SceneRef, frames: list[int]) -> None:
        """Every adapter's load starts here: a scene discovery could not read fails with what it
        found (:attr:`SceneRef.problem`); frames outside the scene are refused."""
        scene.refuse_if_unreadable()
        if not frames or min(frames) < 0 or max(frames) >= scene.num_frames:
            raise ClipError(f"frames {frames[:3]}... outside 0..{scene.num_frames - 1}", self.where(scene.scene))
