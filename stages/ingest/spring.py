"""Spring: ``<split>/<NNNN>/`` with PNG frames, 2x-resolution HDF5 disparity and camera tables.

Facts (``../shared/datasets/FORMATS.md`` §5, confirmed in docs/datasets/spring.md):

- ``frame_left/frame_left_<NNNN>.png`` (1920x1080), frame numbers from 0001.
- ``disp1_left/disp1_left_<NNNN>.dsp5``: HDF5 with one dataset ``"disparity"``, (2H, 2W) —
  twice the image resolution per axis — but the values are disparities in pixels of the
  full-HD images. Sky is encoded as disparity 0 (infinitely far); NaN occurs occasionally.
- ``cam_data/intrinsics.txt``: one ``fx fy cx cy`` line per frame (the focal length can change
  within a sequence); ``cam_data/extrinsics.txt``: 16 numbers per frame, the 4x4 world-to-camera
  matrix row-major, OpenCV camera axes, metres (train split only).
- Metric depth = fx * 0.065 / disparity (orthoparallel stereo rig, baseline 0.065 m).

Disparity to the image grid: sample (2i+a, 2j+b) of the 4K grid has its centre at image
coordinates (j + 0.25 + b/2, i + 0.25 + a/2), so the official ``disp[::2, ::2]`` is a quarter
pixel off the d4s pixel centre (j + 0.5, i + 0.5). Disparity on a plane is affine in the image
coordinates, so the mean of each 2x2 block is exactly the disparity at the pixel centre; the
default ``disparity_downsample: "block_mean"`` uses it where the block is consistent with one
plane (|d00 + d11 - d01 - d10| <= 1% and max - min <= 5% of the block mean) and marks the
other (edge) pixels invalid.
``disparity_downsample: "subsample"`` reproduces the official ``[::2, ::2]``.

Only the left camera is read (its poses are the ones given); the world frame is Spring's own.
"""

from __future__ import annotations

import io
import posixpath
import re
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from stages.ingest.base import (
    AdapterDefaults,
    AdapterOptions,
    Capabilities,
    DatasetAdapter,
    SceneRef,
    numbered_frame_count,
)

BASELINE_M = 0.065
DSP5_KEY = "disparity"
PLANARITY_TOL = 0.01  # |d00 + d11 - d01 - d10| relative to the block mean
SPREAD_TOL = 0.05  # (max - min) of a block relative to its mean
_SCENE_RE = re.compile(r"^\d{4}$")
_FRAME_RE = re.compile(r"^frame_left_(\d{4})\.png$")


def _scene_of(rel: str) -> str | bool | None:
    """The scene a path that discovery could not read belongs to (None: a folder above the scenes;
    False: a folder not named like a scene)."""
    parts = rel.split("/")
    if len(parts) < 3:
        return None
    return "/".join(parts[:2]) if _SCENE_RE.match(parts[1]) else False


_ROT_TOL = 1e-3


def _orthonormalize(r: np.ndarray) -> np.ndarray:
    """Nearest rotation (polar decomposition); exact rotations come back unchanged."""
    u, _, vt = np.linalg.svd(r)
    return u @ vt


class SpringOptions(AdapterOptions):
    """``datasets.spring.options`` (docs/CONFIG.md)."""

    disparity_downsample: Literal["block_mean", "subsample"] = Field(
        "block_mean",
        description="2x disparity grid to image pixels: planar 2x2 blocks averaged, or the official [::2, ::2]",
    )


class SpringAdapter(DatasetAdapter):
    name = "spring"
    version = "1"
    capabilities = Capabilities(dynamic=True, has_depth=True, has_tracks=False, real=False)
    options_model = SpringOptions
    # Small (37 train sequences, ~5k frames) and high quality: overlapping clips.
    defaults = AdapterDefaults(
        clip_length=49,
        frame_stride=1,
        clip_stride=24,
        repeat_weight=1.0,
        loss_weights={"depth": 1.0, "motion": 1.0, "photo": 1.0},
        depth_source="gt",
        track_source="cotracker",
        min_depth_m=0.05,
        max_depth_m=1000.0,
    )

    # -- discovery ---------------------------------------------------------------------------
    def discover(self) -> list[SceneRef]:
        scenes, errors = [], []
        # one listing per folder level down to the scenes, each looked up for its camera table:
        # never a frame folder, but the scene's frame_left (its frame count)
        for p in self.store.glob("*/*/cam_data/extrinsics.txt", errors):
            rel = posixpath.relpath(posixpath.dirname(posixpath.dirname(p)), self.store.root)
            if not _SCENE_RE.match(posixpath.basename(rel)) or not self.store.isdir(posixpath.join(rel, "disp1_left")):
                continue
            try:
                names = self._frame_names(rel)
            except OSError as exc:  # the frame folder cannot be listed: this scene fails with it
                errors.append((posixpath.join(rel, "frame_left"), exc))
                continue
            n = numbered_frame_count(names, _FRAME_RE, first=1)
            if n:
                # the camera table's lines count too: a missing last image is then a missing
                # file of the clips that use it, not a scene one frame short of its table
                n = max(n, self._table_lines(posixpath.relpath(p, self.store.root)))
                scenes.append(SceneRef(self.name, rel, n))
        scenes = self.listing_problems(scenes, errors, _scene_of)
        return sorted(set(scenes), key=lambda s: s.scene)

    def _table_lines(self, rel: str) -> int:
        """Frames a camera table lists (0 when unreadable: the load names its problem)."""
        try:
            return len(self.read_table(rel, ncols=16))
        except ClipError:
            return 0

    def _frame_names(self, scene_rel: str) -> list[str]:
        return sorted(n for n in self.store.listdir(posixpath.join(scene_rel, "frame_left")) if _FRAME_RE.match(n))

    # -- readers -----------------------------------------------------------------------------
    def _table(self, rel: str, ncols: int, num_frames: int) -> np.ndarray:
        table = self.read_table(rel, ncols=ncols)
        if len(table) != num_frames:
            raise ClipError(f"{len(table)} lines, expected {num_frames} (one per frame)", self.where(rel))
        return table

    def read_dsp5(self, rel: str) -> np.ndarray:
        import h5py  # optional dependency: only this adapter needs it

        data = self.read(rel)
        try:
            with h5py.File(io.BytesIO(data), "r") as f:
                if DSP5_KEY not in f:
                    raise ClipError(
                        f"no {DSP5_KEY!r} dataset in the HDF5 file (has {sorted(f.keys())})", self.where(rel)
                    )
                disp = np.asarray(f[DSP5_KEY][()])
        except ClipError:
            raise
        except Exception as exc:
            raise ClipError(f"unreadable .dsp5/HDF5 ({type(exc).__name__}: {exc})", self.where(rel)) from None
        if disp.ndim != 2 or not np.issubdtype(disp.dtype, np.floating):
            raise ClipError(f"disparity must be a 2-D float array, got {disp.shape} {disp.dtype}", self.where(rel))
        return disp.astype(np.float32)

    def _downsample(self, disp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) disparity at the image pixel centres and its validity, from the (2H, 2W) grid."""
        ok = np.isfinite(disp) & (disp > 0)
        if self.opts.disparity_downsample == "subsample":
            return np.where(ok, disp, 0)[::2, ::2], ok[::2, ::2]
        d00, d01, d10, d11 = (np.where(ok, disp, 0)[a::2, b::2] for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)))
        all_ok = ok[0::2, 0::2] & ok[0::2, 1::2] & ok[1::2, 0::2] & ok[1::2, 1::2]
        mean = 0.25 * (d00 + d01 + d10 + d11)
        planar = np.abs(d00 + d11 - d01 - d10) <= PLANARITY_TOL * mean
        lo = np.minimum(np.minimum(d00, d01), np.minimum(d10, d11))
        hi = np.maximum(np.maximum(d00, d01), np.maximum(d10, d11))
        # Two surfaces split along a row or column satisfy the planarity test; the spread test
        # rejects them (a real plane changes little over half a pixel except near its horizon).
        smooth = (hi - lo) <= SPREAD_TOL * mean
        return mean, all_ok & planar & smooth

    # -- loading -----------------------------------------------------------------------------
    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        self.frame_window(scene, frames)
        below = [n for n in self._frame_names(scene.scene) if int(_FRAME_RE.match(n).group(1)) < 1]
        if below:
            raise ClipError(
                "frame numbering must start at 0001", self.where(posixpath.join(scene.scene, "frame_left", below[0]))
            )
        ext_rel = posixpath.join(scene.scene, "cam_data", "extrinsics.txt")
        int_rel = posixpath.join(scene.scene, "cam_data", "intrinsics.txt")
        ext = self._table(ext_rel, 16, scene.num_frames)[frames]
        intr = self._table(int_rel, 4, scene.num_frames)[frames]
        self.finite_or_fail(ext, "extrinsics", ext_rel)
        self.finite_or_fail(intr, "intrinsics", int_rel)
        w2c = ext.reshape(-1, 4, 4)
        if np.abs(w2c[:, 3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-6:
            raise ClipError("extrinsics bottom row is not 0 0 0 1", self.where(ext_rel))
        err = geo.rotation_error(w2c[:, :3, :3])
        if np.any(err > _ROT_TOL):
            raise ClipError(f"extrinsics rotation is not orthonormal (error {err.max():.2e})", self.where(ext_rel))
        c2w = geo.invert_pose(geo.make_pose(_orthonormalize(w2c[:, :3, :3]), w2c[:, :3, 3]))
        if np.any(intr[:, :2] <= 0):
            raise ClipError("non-positive focal length", self.where(int_rel))

        rgb, depth, depth_ok = [], [], []
        for k, i in enumerate(frames):
            num = i + 1  # files are numbered from 0001
            img_rel = posixpath.join(scene.scene, "frame_left", f"frame_left_{num:04d}.png")
            img = self.read_image(img_rel, expect_hw=rgb[0].shape[:2] if rgb else None)
            d_rel = posixpath.join(scene.scene, "disp1_left", f"disp1_left_{num:04d}.dsp5")
            disp = self.read_dsp5(d_rel)
            h, w = img.shape[:2]
            if disp.shape != (2 * h, 2 * w):
                raise ClipError(
                    f"disparity is {disp.shape[1]}x{disp.shape[0]}, expected {2 * w}x{2 * h} (twice the {w}x{h} image)",
                    self.where(d_rel),
                )
            d, ok = self._downsample(disp)
            with np.errstate(divide="ignore"):
                z = np.where(ok, intr[k, 0] * BASELINE_M / np.where(ok, d, 1.0), 0.0).astype(np.float32)
            rgb.append(img)
            depth.append(z)
            depth_ok.append(ok)
        depth = np.stack(depth)
        valid = np.stack(depth_ok) & self.depth_validity(depth)
        return Clip(
            meta=meta, rgb=np.stack(rgb), intrinsics=intr.astype(np.float64), c2w=c2w, depth=depth, depth_valid=valid
        ).validate()
