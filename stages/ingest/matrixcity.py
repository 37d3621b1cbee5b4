"""MatrixCity (city-super/MatrixCity): Unreal Engine 5 city renders, static, metric poses and depth.

Layout of the official release (docs/datasets/matrixcity.md has the sources)::

    <root>/<small_city|big_city>/<aerial|street>/<split>/<block>/transforms.json
    <root>/<small_city|big_city>/<aerial|street>/<split>/<block>/NNNN.png     (or <block>/<block>/NNNN.png)
    <root>/<city>_depth/<view>/<split>/<block>_depth/NNNN.exr               (or .../<block>_depth/<block>_depth/)

``<split>`` is ``train``, ``test``, ``train_dense`` ... ; the per-block ``transforms.json`` holds
``camera_angle_x`` and ``frames[] = {frame_index, rot_mat}`` where ``rot_mat`` is the 4x4
camera-to-world in Blender/NeRF camera axes (x right, y up, z back), position in metres, and the
rotation block scaled by 0.01 (the README: "needs to be multiplied by 100 to normalize it").

Conversions:

* ``c2w_gl = rot_mat`` with ``c2w_gl[:3,:3] *= 100`` (auto-detected: a block whose rotation
  already has unit scale is taken as is); ``c2w_cv = c2w_gl @ diag(1, -1, -1, 1)``.
* Intrinsics: ``fx = fy = (W/2) / tan(camera_angle_x / 2)``, ``cx = W/2``, ``cy = H/2``.
* Depth: EXR, half float, z-depth in centimetres; the official loader takes channel 0 of
  OpenCV's BGR order (the B channel); 65504 (float16 max) marks invalid/sky. metres = cm / 100.
  Reading EXR needs the ``OpenEXR`` package (3.x wheels); without it, depth reading raises a
  ClipError that says so.

World frame: the dataset's own (Blender import of the UE world, z up, metres).
"""

from __future__ import annotations

import io
import json
import posixpath

import numpy as np
from pydantic import Field

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from stages.ingest.base import AdapterDefaults, AdapterOptions, Capabilities, DatasetAdapter, SceneRef

CITIES = ("small_city", "big_city")
VIEWS = ("aerial", "street")
FLOAT16_MAX = 65504.0


def read_exr_depth(data: bytes, where: str) -> np.ndarray:
    """First colour channel (B, as OpenCV's ``[..., 0]``; else R/Y/Z) of an EXR as float32 (H,W)."""
    try:
        import OpenEXR
    except ImportError:
        raise ClipError(
            "reading MatrixCity depth (.exr) needs the OpenEXR package: pip install OpenEXR", where
        ) from None
    try:
        with OpenEXR.File(io.BytesIO(data), separate_channels=True) as f:
            chans = {k: v.pixels for k, v in f.channels().items()}
    except Exception as exc:
        raise ClipError(f"unreadable EXR ({type(exc).__name__}: {exc})", where) from None
    for name in ("B", "R", "Y", "Z", "V"):
        if name in chans:
            arr = np.asarray(chans[name])
            break
    else:
        raise ClipError(f"EXR has no B/R/Y/Z channel (channels: {sorted(chans)})", where)
    if arr.ndim != 2:
        raise ClipError(f"EXR channel has shape {arr.shape}, expected (H, W)", where)
    return arr.astype(np.float32)


class MatrixCityOptions(AdapterOptions):
    """``datasets.matrixcity.options`` (docs/CONFIG.md)."""

    depth: bool = Field(True, description="read the depth maps (false: RGB and poses only)")


def _scene_of(rel: str) -> str | bool | None:
    """The block a path that discovery could not read belongs to (None: a folder above the blocks;
    False: a ``pose`` folder, which holds no block)."""
    parts = rel.split("/")
    if len(parts) == 5 and parts[-1] == "transforms.json":
        return False if parts[2] == "pose" else "/".join(parts[:4])
    return False if len(parts) >= 3 and parts[2] == "pose" else None


class MatrixCityAdapter(DatasetAdapter):
    name = "matrixcity"
    version = "1"
    capabilities = Capabilities(dynamic=False, has_depth=True, has_tracks=False, real=False)
    options_model = MatrixCityOptions
    # float16 centimetres top out at 655.04 m: farther (and sky) pixels are invalid.
    defaults = AdapterDefaults(
        clip_length=49,
        frame_stride=1,
        clip_stride=49,
        repeat_weight=1.0,
        depth_source="gt",
        track_source="depth_static",
        min_depth_m=0.05,
        max_depth_m=655.0,
    )

    def discover(self) -> list[SceneRef]:
        scenes, errors, found = [], [], []
        # one listing per folder level down to the blocks, each looked up for its transforms.json:
        # never a block's image folder
        for city in CITIES:
            for view in VIEWS:
                found += self.store.glob(f"{city}/{view}/*/*/transforms.json", errors)
        for p in sorted(found):
            rel = posixpath.relpath(posixpath.dirname(p), self.store.root)
            if rel.split("/")[2] == "pose":
                continue
            try:
                frames = self._frames(rel)
            except ClipError as exc:  # bad content: this block fails with it, no other
                scenes.append(self.unreadable_scene(rel, exc, posixpath.join(rel, "transforms.json")))
                continue
            scenes.append(SceneRef(self.name, rel, len(frames)))
        scenes = self.listing_problems(scenes, errors, _scene_of)
        return sorted(scenes, key=lambda s: s.scene)

    # -- files -------------------------------------------------------------------------------
    def _transforms(self, scene: str) -> tuple[float, list[dict], str]:
        rel = posixpath.join(scene, "transforms.json")
        try:
            tj = json.loads(self.read(rel).decode("utf-8"))
            angle = float(tj["camera_angle_x"])
            frames = list(tj["frames"])
        except ClipError:
            raise
        except Exception as exc:
            raise ClipError(
                f"not a MatrixCity transforms.json ({type(exc).__name__}: {exc})", self.where(rel)
            ) from None
        if not np.isfinite(angle) or not 0.0 < angle < np.pi:
            raise ClipError(f"camera_angle_x {angle} is not an angle in (0, pi)", self.where(rel))
        return angle, frames, rel

    def _frames(self, scene: str, transforms: tuple[float, list[dict], str] | None = None) -> list[dict]:
        """The scene's frames ordered by frame_index (``transforms``: what :meth:`_transforms`
        returned, when the caller read it already)."""
        _, frames, rel = transforms or self._transforms(scene)
        try:
            frames = sorted(frames, key=_frame_index)
        except (KeyError, TypeError, ValueError):
            raise ClipError("every frame needs an integer frame_index", self.where(rel)) from None
        idx = [_frame_index(f) for f in frames]
        if len(set(idx)) != len(idx):
            raise ClipError("duplicate frame_index values", self.where(rel))
        return frames

    def _image_dir(self, scene: str) -> str:
        block = posixpath.basename(scene)
        nested = posixpath.join(scene, block)
        return nested if self.store.isdir(nested) else scene

    def _depth_dir(self, scene: str) -> str:
        city, view, split, block = scene.split("/")
        base = posixpath.join(f"{city}_depth", view, split, f"{block}_depth")
        nested = posixpath.join(base, f"{block}_depth")
        if self.store.isdir(nested):
            return nested
        if not self.store.isdir(base):
            raise ClipError("depth folder is missing (download <city>_depth for this block)", self.where(base))
        return base

    @staticmethod
    def _frame_name(idx: int, ext: str) -> str:
        return f"{idx:04d}.{ext}"

    def _pose(self, frame: dict, rel: str) -> np.ndarray:
        tag = f"frame_index {frame.get('frame_index')}"
        if "rot_mat" not in frame:
            raise ClipError(
                f"{tag}: no rot_mat (derived pose/ files with transform_matrix in 100 m units are not read)",
                self.where(rel),
            )
        try:
            m = np.asarray(frame["rot_mat"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ClipError(f"{tag}: rot_mat is not numeric", self.where(rel)) from None
        if m.shape != (4, 4):
            raise ClipError(f"{tag}: rot_mat has shape {m.shape}, expected (4, 4)", self.where(rel))
        if not np.all(np.isfinite(m)):
            raise ClipError(f"{tag}: rot_mat contains NaN/inf", self.where(rel))
        det = np.linalg.det(m[:3, :3])
        scale = np.cbrt(det) if det > 0 else 0.0
        if abs(scale - 0.01) < 1e-4:
            rot = m[:3, :3] * 100.0
        elif abs(scale - 1.0) < 1e-2:
            rot = m[:3, :3]
        else:
            raise ClipError(f"{tag}: rot_mat rotation has scale {scale:.4g}, expected 0.01 (or 1)", self.where(rel))
        err = float(geo.rotation_error(rot))
        if err > 1e-3:
            raise ClipError(f"{tag}: rot_mat is not a scaled rotation (error {err:.2e})", self.where(rel))
        return geo.opengl_c2w_to_opencv(geo.make_pose(rot, m[:3, 3]))

    # -- clips -------------------------------------------------------------------------------
    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        self.frame_window(scene, frames)
        transforms = self._transforms(scene.scene)
        angle, _, tj_rel = transforms
        all_frames = self._frames(scene.scene, transforms)
        if len(all_frames) != scene.num_frames:
            raise ClipError(f"{len(all_frames)} frames listed, expected {scene.num_frames}", self.where(tj_rel))
        img_dir = self._image_dir(scene.scene)
        depth_dir = self._depth_dir(scene.scene) if self.opts.depth else None
        rgb, depth, c2w = [], [], []
        for i in frames:
            fr = all_frames[i]
            idx = _frame_index(fr)
            c2w.append(self._pose(fr, tj_rel))
            img_rel = posixpath.join(img_dir, self._frame_name(idx, "png"))
            if not self.store.exists(img_rel) and self.store.exists(posixpath.join(img_dir, f"{idx}.png")):
                img_rel = posixpath.join(img_dir, f"{idx}.png")  # some copies drop the zero padding
            img = self.read_image(img_rel, expect_hw=rgb[0].shape[:2] if rgb else None)
            rgb.append(img)
            if depth_dir is not None:
                d_rel = posixpath.join(depth_dir, self._frame_name(idx, "exr"))
                cm = read_exr_depth(self.read(d_rel), self.where(d_rel))
                if cm.shape != img.shape[:2]:
                    raise ClipError(
                        f"depth is {cm.shape[1]}x{cm.shape[0]}, image is {img.shape[1]}x{img.shape[0]}",
                        self.where(d_rel),
                    )
                m = cm / np.float32(100.0)
                m[cm >= FLOAT16_MAX] = 0.0  # float16-max sentinel: sky / beyond range -> invalid
                depth.append(m)
        h, w = rgb[0].shape[:2]
        f = 0.5 * w / np.tan(0.5 * angle)
        k = np.tile([f, f, w / 2.0, h / 2.0], (len(frames), 1))
        d = np.stack(depth) if depth else None
        return Clip(
            meta=meta,
            rgb=np.stack(rgb),
            intrinsics=k,
            c2w=np.stack(c2w),
            depth=d,
            depth_valid=self.depth_validity(d) if d is not None else None,
        ).validate()


def _frame_index(frame: dict) -> int:
    """A frame's ``frame_index``: a JSON integer (2.0 too); 1.9, true or "1" raise ValueError rather
    than being read as another frame's number."""
    v = frame["frame_index"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
        raise ValueError(f"frame_index {v!r}")
    return int(v)
