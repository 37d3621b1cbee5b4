"""PointOdyssey: ``<split>/<scene>/`` with JPEG frames, 16-bit PNG depth and ``anno.npz``.

Facts (``../shared/datasets/FORMATS.md`` §3, confirmed in docs/datasets/pointodyssey.md):

- ``rgbs/rgb_<NNNNN>.jpg`` (960x540), frame numbers from 00000, five digits.
- ``depths/depth_<NNNNN>.png`` 16-bit: the renderer's z-depth clipped to [0, 1000] m and stored
  as ``uint16(d * 65535 / 1000)``, so metres = v / 65535 * 1000. v = 65535 is the clip value
  (sky / anything at or beyond 1000 m) and v = 0 means no surface: both are invalid.
- ``anno.npz``: ``trajs_2d`` (T,N,2) pixels, ``trajs_3d`` (T,N,3) world, ``valids`` (T,N),
  ``visibs`` (T,N), ``intrinsics`` (T,3,3) pixel K, ``extrinsics`` (T,4,4) world-to-camera with
  OpenCV camera axes (x right, y down, z forward; u = fx x/z + cx). A track is visible in d4s
  when ``visibs & valids`` and its 3D position is finite (the release contains non-finite
  positions for invalid points; those are marked not visible, not rejected).
- Glitched tracks: a track whose world position jumps further than ``max_track_jump_m`` (option,
  default 1 m) per source frame between two of the clip's frames where it is valid is dropped
  (30 m/s at the release's 30 fps: faster than anything PointOdyssey animates, far slower than
  the glitches); the count is ``meta.qc["gt_tracks"]["dropped_jumps"]``.
- Scenes whose ``trajs_3d`` is empty (``array([None], dtype=object)`` in some releases, or no
  points) load without tracks: detected from the array header, never unpickled.

The world frame is PointOdyssey's own; c2w = inverse(extrinsics). The annotation file can be
hundreds of MB, so the per-frame rows of each array are read straight out of the (uncompressed)
npz member when possible instead of loading the whole file for every clip.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import struct
import zipfile

import numpy as np
from pydantic import Field

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from stages.ingest.base import (
    DISCOVERY_BLOCK,
    AdapterDefaults,
    AdapterOptions,
    Capabilities,
    DatasetAdapter,
    SceneRef,
    numbered_frame_count,
)

DEPTH_SCALE_M = 1000.0 / 65535.0  # metres per depth unit
DEPTH_CLIPPED = 65535  # the value written for depth >= 1000 m
ANNO_KEYS = ("trajs_3d", "visibs", "valids", "intrinsics", "extrinsics")
TRACK_KEYS = ("trajs_3d", "visibs", "valids")  # skipped together when trajs_3d is empty
MAX_TRACK_JUMP_M = 1.0  # metres per source frame (30 m/s at 30 fps)
_RGB_RE = re.compile(r"^rgb_(\d{5})\.jpg$")
# float16 annotations (older exports) leave rotations orthonormal only to ~1e-3.
_ROT_TOL = 1e-2


ROW_GAP_BYTES = 1 << 20  # rows this close are read in one request: cheaper than another request


def _row_runs(frames: list[int], row_bytes: int) -> list[tuple[int, int]]:
    """The (first, last) row ranges that cover ``frames``, nearby rows merged: a clip's rows at a
    frame stride are one read, not one request per frame."""
    gap = max(1, ROW_GAP_BYTES // max(1, row_bytes))
    runs: list[list[int]] = []
    for i in sorted(set(frames)):
        if runs and i - runs[-1][1] <= gap:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def _npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream at ``f``'s position; None if not v1/v2."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def _is_empty(shape: tuple, dtype: np.dtype) -> bool:
    """An annotation array that holds no tracks: no elements, or the release's placeholder
    ``array([None], dtype=object)`` (one object element; judged from the header alone)."""
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return size == 0 or (dtype.hasobject and size <= 1)


def impossible_jumps(tracks: np.ndarray, usable: np.ndarray, frames: list[int], max_jump_m: float) -> np.ndarray:
    """(N,) tracks that move further than ``max_jump_m`` per source frame between consecutive
    clip frames where they are usable (a frame where a track is not usable is skipped: the next
    usable position is compared with the last one, over the longer frame gap)."""
    t, n, _ = tracks.shape
    bad = np.zeros(n, dtype=bool)
    last_pos = np.zeros((n, 3), dtype=np.float64)
    last_frame = np.full(n, -1, dtype=np.int64)
    for i in range(t):
        ok = usable[i]
        seen = ok & (last_frame >= 0)
        gap = np.maximum(frames[i] - last_frame[seen], 1)
        step = np.linalg.norm(tracks[i, seen].astype(np.float64) - last_pos[seen], axis=-1)
        bad[np.flatnonzero(seen)[step > max_jump_m * gap]] = True
        last_pos[ok] = tracks[i, ok]
        last_frame[ok] = frames[i]
    return bad


def _orthonormalize(r: np.ndarray) -> np.ndarray:
    """Nearest rotation (polar decomposition); exact rotations come back unchanged."""
    u, _, vt = np.linalg.svd(r)
    return u @ vt


class PointOdysseyOptions(AdapterOptions):
    """``datasets.pointodyssey.options`` (docs/CONFIG.md)."""

    max_tracks: int | None = Field(None, ge=1, description="keep this many evenly spaced trajectories; None: all")
    max_track_jump_m: float = Field(
        MAX_TRACK_JUMP_M,
        gt=0,
        description="drop a track moving further than this "
        "per source frame between valid frames (glitched ground truth)",
    )


class PointOdysseyAdapter(DatasetAdapter):
    name = "pointodyssey"
    version = "2"  # 2: glitched-track filter, empty trajs_3d loads without tracks
    capabilities = Capabilities(dynamic=True, has_depth=True, has_tracks=True, real=False)
    options_model = PointOdysseyOptions
    defaults = AdapterDefaults(
        clip_length=49,
        frame_stride=2,
        clip_stride=128,
        repeat_weight=1.0,
        loss_weights={"depth": 1.0, "motion": 1.0, "photo": 1.0},
        depth_source="gt",
        track_source="gt",
        min_depth_m=0.01,
        max_depth_m=1000.0,
    )

    # -- discovery ---------------------------------------------------------------------------
    def discover(self) -> list[SceneRef]:
        scenes, errors = [], []
        for p in self.store.glob("*/*/anno.npz", errors):
            rel = posixpath.relpath(posixpath.dirname(p), self.store.root)
            try:
                names = self._frame_names(rel)
            except OSError as exc:  # the image folder cannot be listed: this scene fails with it
                errors.append((posixpath.join(rel, "rgbs"), exc))
                continue
            n = numbered_frame_count(names, _RGB_RE)
            if n:
                # the annotations' frame count too: a missing last image is then a missing file
                # of the clips that use it, not a scene one frame short of its annotations
                n = max(n, self._anno_frame_count(posixpath.join(rel, "anno.npz")))
                scenes.append(SceneRef(self.name, rel, n))
        # a path in a scene folder names its scene; a split folder holds many (discovery fails)
        scenes = self.listing_problems(
            scenes, errors, lambda rel: "/".join(rel.split("/")[:2]) if rel.count("/") >= 2 else None
        )
        return sorted(set(scenes), key=lambda s: s.scene)

    def _anno_frame_count(self, rel: str) -> int:
        """Frames the annotations hold, from the extrinsics' .npy header (0 when unreadable: the
        load names its problem)."""
        try:
            with self.store.open(rel, block_size=DISCOVERY_BLOCK) as f, zipfile.ZipFile(f) as zf:
                members = {posixpath.splitext(n)[0]: n for n in zf.namelist()}
                shape, _ = self._member_header(zf, members["extrinsics"])
            return int(shape[0]) if shape else 0
        except Exception:  # noqa: BLE001 - a damaged file is reported by the load, naming it
            return 0

    def _frame_names(self, scene_rel: str) -> list[str]:
        names = [n for n in self.store.listdir(posixpath.join(scene_rel, "rgbs")) if _RGB_RE.match(n)]
        return sorted(names)

    # -- annotation access -------------------------------------------------------------------
    def _anno_rows(self, rel: str, frames: list[int]) -> tuple[dict[str, np.ndarray], int]:
        """Rows ``frames`` of each array in ANNO_KEYS, and the file's frame count. When
        ``trajs_3d`` is empty (:func:`_is_empty`) the track arrays are left out."""
        out: dict[str, np.ndarray] = {}
        lengths = {}
        try:
            # a small read-ahead: on an object store each read then fetches about what it asks for
            # (s3fs's default, 50 MiB per miss, fetched most of the file for a clip's few rows)
            with (
                contextlib.ExitStack() as later,
                self.store.open(rel, "rb", block_size=DISCOVERY_BLOCK) as f,
                zipfile.ZipFile(f) as zf,
            ):
                whole = None  # for members read whole: the file again, with the large read-ahead
                members = {posixpath.splitext(n)[0]: n for n in zf.namelist()}
                keys = ANNO_KEYS
                if "trajs_3d" in members and _is_empty(*self._member_header(zf, members["trajs_3d"])):
                    keys = tuple(k for k in ANNO_KEYS if k not in TRACK_KEYS)
                for key in keys:
                    if key not in members:
                        raise ClipError(f"anno.npz has no {key!r} array (has {sorted(members)})", self.where(rel))
                    arr, t = self._member_rows(f, zf, members[key], frames, rel, key)
                    if arr is None:  # compressed: the member is read whole, with a large read-ahead
                        if whole is None:
                            whole = later.enter_context(
                                zipfile.ZipFile(later.enter_context(self.store.open(rel, "rb")))
                            )
                        arr, t = self._whole_member(whole, members[key], frames, rel, key)
                    out[key], lengths[key] = arr, t
        except ClipError:
            raise
        except FileNotFoundError:
            raise ClipError("file is missing", self.where(rel)) from None
        except Exception as exc:
            raise ClipError(f"unreadable .npz ({type(exc).__name__}: {exc})", self.where(rel)) from None
        if len(set(lengths.values())) != 1:
            raise ClipError(f"arrays disagree on the frame count: {lengths}", self.where(rel))
        return out, next(iter(lengths.values()))

    @staticmethod
    def _member_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple, np.dtype]:
        """(shape, dtype) from a member's .npy header; reads the header only, never the data."""
        with zf.open(member) as m:
            header = _npy_header(m)
        if header is None:
            return (), np.dtype(np.float32)  # unknown version: left to the full read to report
        shape, _, dtype = header
        return tuple(shape), dtype

    def _member_rows(self, f, zf: zipfile.ZipFile, member: str, frames: list[int], rel: str, key: str):
        """Rows ``frames`` of a stored C-order member, read straight from the file (nearby rows in
        one read), and its frame count; (None, 0) when the member cannot be read by rows."""
        info = zf.getinfo(member)
        if info.compress_type == zipfile.ZIP_STORED:
            # Stored member (np.savez): seek to each requested row in the raw file, no full read.
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ClipError(f"{key}: bad zip local header", self.where(rel))
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            data_start = info.header_offset + 30 + name_len + extra_len
            f.seek(data_start)
            header = _npy_header(f)
            if header is not None:
                shape, fortran, dtype = header
                t, row_shape, row_bytes = self._check_header(shape, dtype, frames, rel, key)
                if not fortran:
                    start = f.tell()
                    if start - data_start + t * row_bytes > info.file_size:
                        raise ClipError(f"{key} is truncated", self.where(rel))
                    got: dict[int, np.ndarray] = {}
                    for first, last in _row_runs(frames, row_bytes):
                        f.seek(start + first * row_bytes)
                        n = last - first + 1
                        buf = f.read(n * row_bytes)
                        if len(buf) != n * row_bytes:
                            raise ClipError(f"{key} is truncated", self.where(rel))
                        run = np.frombuffer(buf, dtype=dtype).reshape((n, *row_shape))
                        got.update((i, run[i - first]) for i in range(first, last + 1))
                    return np.stack([got[i] for i in frames]), t
        return None, 0  # not readable by rows

    def _whole_member(self, zf: zipfile.ZipFile, member: str, frames: list[int], rel: str, key: str):
        """A member that cannot be read by rows (compressed, Fortran order): the whole array."""
        with zf.open(member) as m:
            arr = np.lib.format.read_array(m, allow_pickle=False)
        t, _, _ = self._check_header(arr.shape, arr.dtype, frames, rel, key)
        return arr[frames], t

    def _check_header(self, shape, dtype, frames, rel, key):
        if dtype.hasobject:
            raise ClipError(f"{key} holds Python objects; refusing to unpickle", self.where(rel))
        if dtype.kind not in "biuf":  # text would be parsed by astype, complex lose its imaginary part
            raise ClipError(f"{key} must hold real numbers, got dtype {dtype}", self.where(rel))
        if not shape:
            raise ClipError(f"{key} is a scalar, expected a per-frame array", self.where(rel))
        t = int(shape[0])
        if max(frames) >= t:
            raise ClipError(f"{key} has {t} frames, frame {max(frames)} requested", self.where(rel))
        row_shape = tuple(int(s) for s in shape[1:])
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        return t, row_shape, row_bytes

    # -- tracks ------------------------------------------------------------------------------
    def _tracks(
        self, anno: dict[str, np.ndarray], anno_rel: str, frames: list[int], meta: ClipMeta
    ) -> tuple[np.ndarray, np.ndarray]:
        """World tracks (T,N,3) float32 and visibility (T,N) of the clip, after the filters."""
        tracks = anno["trajs_3d"]
        t = len(frames)
        if tracks.ndim != 3 or tracks.shape[0] != t or tracks.shape[2] != 3:
            raise ClipError(f"trajs_3d must be (T,N,3), got {tracks.shape[1:]} per frame", self.where(anno_rel))
        n = tracks.shape[1]
        for key in ("visibs", "valids"):
            if anno[key].shape != (t, n):
                raise ClipError(f"{key} must be (T,{n}), got {anno[key].shape[1:]} per frame", self.where(anno_rel))
        tracks = tracks.astype(np.float32)
        finite = np.all(np.isfinite(tracks), axis=-1)
        valid = (anno["valids"] > 0) & finite
        visible = (anno["visibs"] > 0) & valid
        tracks = np.where(finite[..., None], tracks, 0.0).astype(np.float32)
        jumps = impossible_jumps(tracks, valid, frames, self.opts.max_track_jump_m)
        tracks, visible = tracks[:, ~jumps], visible[:, ~jumps]
        meta.qc["gt_tracks"] = {"dropped_jumps": int(jumps.sum()), "num_tracks": int(n)}
        n = tracks.shape[1]
        max_tracks = self.opts.max_tracks
        if max_tracks is not None and n > int(max_tracks):
            keep = np.linspace(0, n - 1, int(max_tracks)).round().astype(int)
            tracks, visible = tracks[:, keep], visible[:, keep]
        return tracks, visible

    # -- loading -----------------------------------------------------------------------------
    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        self.frame_window(scene, frames)
        anno_rel = posixpath.join(scene.scene, "anno.npz")
        anno, t_anno = self._anno_rows(anno_rel, frames)
        if t_anno != scene.num_frames:
            raise ClipError(
                f"annotations cover {t_anno} frames but the images in rgbs/ are numbered up to "
                f"rgb_{scene.num_frames - 1:05d}.jpg ({scene.num_frames} frames)",
                self.where(anno_rel),
            )
        t = len(frames)

        k = anno["intrinsics"].astype(np.float64)
        if k.shape != (t, 3, 3):
            raise ClipError(f"intrinsics must be (T,3,3), got {k.shape[1:]} per frame", self.where(anno_rel))
        self.finite_or_fail(k, "intrinsics", anno_rel)
        if not (np.all(k[:, 0, 0] > 0) and np.all(k[:, 1, 1] > 0)):
            raise ClipError("intrinsics have a non-positive focal length", self.where(anno_rel))
        if np.abs(k[:, 2] - [0.0, 0.0, 1.0]).max() > 1e-6:
            raise ClipError("intrinsics bottom row is not [0 0 1]", self.where(anno_rel))
        if np.abs(k[:, 0, 1]).max() > 1e-6 * np.abs(k[:, 0, 0]).max() or np.abs(k[:, 1, 0]).max() > 1e-6:
            raise ClipError(
                f"intrinsics have skew {np.abs(k[:, 0, 1]).max():g} (d4s cameras are fx fy cx cy)", self.where(anno_rel)
            )
        w2c = anno["extrinsics"].astype(np.float64)
        if w2c.shape != (t, 4, 4):
            raise ClipError(f"extrinsics must be (T,4,4), got {w2c.shape[1:]} per frame", self.where(anno_rel))
        self.finite_or_fail(w2c, "extrinsics", anno_rel)
        if np.abs(w2c[:, 3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-3:
            raise ClipError("extrinsics bottom row is not [0 0 0 1]", self.where(anno_rel))
        err = geo.rotation_error(w2c[:, :3, :3])
        if np.any(err > _ROT_TOL):
            raise ClipError(f"extrinsics rotation is not orthonormal (error {err.max():.2e})", self.where(anno_rel))
        c2w = geo.invert_pose(geo.make_pose(_orthonormalize(w2c[:, :3, :3]), w2c[:, :3, 3]))
        intr = geo.intrinsics_vector(k)

        tracks, visible = self._tracks(anno, anno_rel, frames, meta) if "trajs_3d" in anno else (None, None)
        if tracks is None:
            meta.qc["gt_tracks"] = {"missing": True}

        rgb, depth, depth_ok = [], [], []
        for i in frames:
            img_rel = posixpath.join(scene.scene, "rgbs", f"rgb_{i:05d}.jpg")
            img = self.read_image(img_rel, expect_hw=rgb[0].shape[:2] if rgb else None)
            d_rel = posixpath.join(scene.scene, "depths", f"depth_{i:05d}.png")
            raw = self.read_png16(d_rel)
            if raw.shape != img.shape[:2]:
                raise ClipError(
                    f"depth is {raw.shape[1]}x{raw.shape[0]}, image is {img.shape[1]}x{img.shape[0]}", self.where(d_rel)
                )
            d = raw.astype(np.float32) * np.float32(DEPTH_SCALE_M)
            rgb.append(img)
            depth.append(d)
            depth_ok.append((raw > 0) & (raw < DEPTH_CLIPPED))
        depth = np.stack(depth)
        valid = np.stack(depth_ok) & self.depth_validity(depth)
        return Clip(
            meta=meta,
            rgb=np.stack(rgb),
            intrinsics=intr,
            c2w=c2w,
            depth=depth,
            depth_valid=valid,
            tracks=tracks,
            track_visible=visible,
        ).validate()
