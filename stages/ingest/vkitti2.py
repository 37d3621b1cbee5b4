"""Virtual KITTI 2: ``Scene<NN>/<variation>/`` with JPEG frames, centimetre PNG depth, camera tables.

Facts (``../shared/datasets/FORMATS.md`` §6, confirmed in docs/datasets/vkitti2.md):

- ``frames/rgb/Camera_<k>/rgb_<NNNNN>.jpg`` and ``frames/depth/Camera_<k>/depth_<NNNNN>.png``
  (1242x375), frame numbers from 00000. Depth is uint16 centimetres (metres = v / 100); 65535
  (655.35 m) is sky / beyond the far plane and is invalid, as is 0.
- ``intrinsic.txt``: a header line, then ``frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]``.
  The release's principal point is (620.5, 187.0) for 1242x375, i.e. ((W-1)/2, (H-1)/2): pixel
  centres at integer coordinates. d4s puts pixel centres at j + 0.5, so cx = K[0,2] + 0.5 and
  cy = K[1,2] + 0.5.
- ``extrinsic.txt``: a header line, then ``frame cameraID`` and the 16 entries of the 4x4
  world-to-camera matrix, row-major, OpenCV camera axes, metres. c2w = inverse.

The release ships as separate archives (``vkitti_2.0.3_rgb.tar``, ``..._depth.tar``,
``..._textgt.tar.gz``); they may be extracted into one tree (``Scene01/clone/frames/rgb/...``
next to ``Scene01/clone/extrinsic.txt``) or side by side (``vkitti_2.0.3_rgb/Scene01/...``,
``vkitti_2.0.3_depth/Scene01/...``, ``vkitti_2.0.3_textgt/Scene01/...``); both are found.

Cameras: Camera_0 and Camera_1 are the left/right cameras of a stereo rig (0.53 m apart) seeing
the same scene, so by default only Camera_0 is used; ``options["cameras"] = [0, 1]`` adds the
right camera as separate scenes ``Scene<NN>/<variation>/Camera_1``. ``options["variations"]``
restricts the variations (default: all). The world frame is the dataset's own.
"""

from __future__ import annotations

import posixpath
import re
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from pipeline.failures import is_transient
from stages.ingest.base import (
    AdapterDefaults,
    AdapterOptions,
    Capabilities,
    DatasetAdapter,
    SceneRef,
    numbered_frame_count,
)

DEPTH_SCALE_M = 0.01  # metres per unit (centimetres)
DEPTH_SKY = 65535
PIXEL_CENTRE_SHIFT = 0.5  # release pixel centres at integers -> d4s centres at j + 0.5
_SCENE_RE = re.compile(r"^Scene\d+$")
_RGB_RE = re.compile(r"^rgb_(\d{5})\.jpg$")
_ROT_TOL = 1e-3  # the tables are printed with limited digits


def _orthonormalize(r: np.ndarray) -> np.ndarray:
    """Nearest rotation (polar decomposition); exact rotations come back unchanged."""
    u, _, vt = np.linalg.svd(r)
    return u @ vt


class VKITTI2Options(AdapterOptions):
    """``datasets.vkitti2.options`` (docs/CONFIG.md)."""

    cameras: list[Literal[0, 1]] = Field(
        [0], description="cameras to read; Camera_1 scenes are added as separate scenes"
    )
    variations: list[str] | None = Field(None, description="variation folders to read (e.g. clone, fog); None: all")


class VKITTI2Adapter(DatasetAdapter):
    name = "vkitti2"
    version = "1"
    capabilities = Capabilities(dynamic=True, has_depth=True, has_tracks=False, real=False)
    options_model = VKITTI2Options
    # Ten variations re-render the same geometry (weather, time of day, small camera rotations):
    # weight each below 1 so the five driving scenes are not over-sampled.
    defaults = AdapterDefaults(
        clip_length=49,
        frame_stride=1,
        clip_stride=49,
        repeat_weight=0.5,
        loss_weights={"depth": 1.0, "motion": 1.0, "photo": 1.0},
        depth_source="gt",
        track_source="cotracker",
        min_depth_m=0.05,
        max_depth_m=655.0,
    )

    # -- discovery ---------------------------------------------------------------------------
    def _cameras(self) -> list[int]:
        cams = self.opts.cameras
        return sorted({int(c) for c in cams})

    def _locate(self, base_candidates: list[str], scene: str, variation: str, kind: str, cam: int) -> str | None:
        for base in base_candidates:
            rel = posixpath.join(base, scene, variation, "frames", kind, f"Camera_{cam}")
            info = self.store.lookup(rel)  # a folder on the way that cannot be read raises
            if info is not None and info["type"] == "directory":
                return rel
        return None

    def discover(self) -> list[SceneRef]:
        top = [d for d in self.store.listdir("") if self.store.isdir(d)]
        nested = [d for d in top if not _SCENE_RE.match(d)]
        bases = [""] + nested  # merged tree first, then side-by-side archive folders
        rgb_bases = [""] + [d for d in nested if "rgb" in d.lower()] + [d for d in nested if "rgb" not in d.lower()]
        depth_bases = (
            [""] + [d for d in nested if "depth" in d.lower()] + [d for d in nested if "depth" not in d.lower()]
        )
        wanted_vars = self.opts.variations
        found: dict[str, SceneRef] = {}
        # a scene some folder of which could not be read (a Scene folder that cannot be listed
        # holds several scenes: that one raises, and discovery fails in one line naming it)
        problems: dict[str, SceneRef] = {}
        for base in bases:
            for scene in (s for s in self.store.listdir(base) if _SCENE_RE.match(s)):
                for variation in self.store.listdir(posixpath.join(base, scene)):
                    if wanted_vars is not None and variation not in wanted_vars:
                        continue
                    text_dir = posixpath.join(base, scene, variation)
                    sids = {cam: f"{scene}/{variation}/Camera_{cam}" for cam in self._cameras()}
                    ext = posixpath.join(text_dir, "extrinsic.txt")
                    try:
                        if self.store.lookup(ext) is None:
                            continue
                    except OSError as exc:
                        self._unlistable(problems, list(sids.values()), exc, ext)
                        continue
                    for cam, sid in sids.items():
                        if sid in found:
                            continue
                        try:
                            rgb_dir = self._locate(rgb_bases, scene, variation, "rgb", cam)
                            depth_dir = self._locate(depth_bases, scene, variation, "depth", cam)
                            if rgb_dir is None or depth_dir is None:
                                continue
                            n = numbered_frame_count(self.store.listdir(rgb_dir), _RGB_RE)
                        except OSError as exc:
                            self._unlistable(problems, [sid], exc, posixpath.join(text_dir, "frames"))
                            continue
                        if n:
                            # the camera table's rows count too: a missing last image is then a
                            # missing file of the clips that use it, not a short scene
                            n = max(n, self._table_frames(ext, cam))
                            found[sid] = SceneRef(self.name, sid, n, extra=(text_dir, rgb_dir, depth_dir, cam))
        for sid, ref in problems.items():
            found.setdefault(sid, ref)  # found readable in another archive folder: that one
        return [found[k] for k in sorted(found)]

    def _unlistable(self, problems: dict[str, SceneRef], sids: list[str], exc: OSError, rel: str) -> None:
        """Record ``sids`` as scenes discovery could not read (``exc`` under ``rel``); a transient
        error (the network) raises, for the retry."""
        if is_transient(exc):
            raise exc
        for sid in sids:
            problems.setdefault(sid, self.unlistable_scene(sid, exc, exc.filename or self.where(rel)))

    # -- tables ------------------------------------------------------------------------------
    def _table_frames(self, rel: str, cam: int) -> int:
        """1 + the highest frame a camera table lists for ``cam`` (0 when unreadable: the load
        names its problem)."""
        try:
            table = self.read_table(rel, ncols=18, skip_header=1)
        except ClipError:
            return 0
        frames = table[table[:, 1] == cam, 0]
        return int(frames.max()) + 1 if len(frames) and np.all(frames == np.round(frames)) else 0

    def _camera_table(self, rel: str, ncols: int, cam: int, num_frames: int) -> np.ndarray:
        """Rows of ``cam`` ordered by frame, checked to be exactly frames 0..num_frames-1."""
        data = self.read(rel)
        text = data.decode("utf-8", errors="replace").splitlines()
        if not text or not text[0].strip().lower().startswith("frame"):
            raise ClipError("missing header line ('frame cameraID ...')", self.where(rel))
        table = self.read_table(rel, ncols=ncols, skip_header=1, data=data)
        ids = table[:, :2]
        if np.any(ids != np.round(ids)):
            raise ClipError("frame / cameraID columns must be integers", self.where(rel))
        rows = table[table[:, 1] == cam]
        frames = rows[:, 0].astype(np.int64)
        values, counts = np.unique(frames, return_counts=True)
        if np.any(counts > 1):
            dup = int(values[counts > 1][0])
            raise ClipError(f"camera {cam}: frame {dup} appears more than once", self.where(rel))
        rows = rows[np.argsort(frames, kind="stable")]
        frames = np.sort(frames)
        if len(frames) != num_frames or not np.array_equal(frames, np.arange(num_frames)):
            raise ClipError(
                f"camera {cam}: {len(frames)} rows for frames {frames[:1].tolist()}..{frames[-1:].tolist()}, "
                f"expected frames 0..{num_frames - 1} (one per image)",
                self.where(rel),
            )
        return rows[:, 2:]

    # -- loading -----------------------------------------------------------------------------
    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        self.frame_window(scene, frames)
        text_dir, rgb_dir, depth_dir, cam = scene.extra
        ext_rel = posixpath.join(text_dir, "extrinsic.txt")
        int_rel = posixpath.join(text_dir, "intrinsic.txt")
        ext = self._camera_table(ext_rel, 18, cam, scene.num_frames)[frames]
        intr = self._camera_table(int_rel, 6, cam, scene.num_frames)[frames]
        self.finite_or_fail(ext, "extrinsic", ext_rel)
        self.finite_or_fail(intr, "intrinsic", int_rel)
        w2c = ext.reshape(-1, 4, 4)
        if np.abs(w2c[:, 3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-6:
            raise ClipError("extrinsic rows must end with 0 0 0 1", self.where(ext_rel))
        err = geo.rotation_error(w2c[:, :3, :3])
        if np.any(err > _ROT_TOL):
            raise ClipError(f"extrinsic rotation is not orthonormal (error {err.max():.2e})", self.where(ext_rel))
        c2w = geo.invert_pose(geo.make_pose(_orthonormalize(w2c[:, :3, :3]), w2c[:, :3, 3]))
        if np.any(intr[:, :2] <= 0):
            raise ClipError("non-positive focal length", self.where(int_rel))
        k = intr.copy()
        k[:, 2:] += PIXEL_CENTRE_SHIFT

        rgb, depth, depth_ok = [], [], []
        for i in frames:
            img_rel = posixpath.join(rgb_dir, f"rgb_{i:05d}.jpg")
            img = self.read_image(img_rel, expect_hw=rgb[0].shape[:2] if rgb else None)
            d_rel = posixpath.join(depth_dir, f"depth_{i:05d}.png")
            raw = self.read_png16(d_rel)
            if raw.shape != img.shape[:2]:
                raise ClipError(
                    f"depth is {raw.shape[1]}x{raw.shape[0]}, image is {img.shape[1]}x{img.shape[0]}", self.where(d_rel)
                )
            rgb.append(img)
            depth.append(raw.astype(np.float32) * np.float32(DEPTH_SCALE_M))
            depth_ok.append((raw > 0) & (raw < DEPTH_SKY))
        depth = np.stack(depth)
        valid = np.stack(depth_ok) & self.depth_validity(depth)
        return Clip(meta=meta, rgb=np.stack(rgb), intrinsics=k, c2w=c2w, depth=depth, depth_valid=valid).validate()
