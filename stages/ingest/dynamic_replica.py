"""Dynamic Replica (facebookresearch/dynamic_stereo): synthetic dynamic indoor scenes, depth, 3D tracks.

Layout of the official release (docs/datasets/dynamic_replica.md has the sources)::

    <root>/<split>/frame_annotations_<split>.jgz        gzip JSON list, one entry per frame and view
    <root>/<split>/<seq>_source_<left|right>/images/<seq>_source_<view>-NNNN.png
                                            depths/<seq>_source_<view>_NNNN.geometric.png
                                            masks/..., flow_forward/..., trajectories/NNNNNN.pth

Every file is located through the annotation entry (``image.path``, ``depth.path``,
``trajectories.path``, all relative to ``<root>/<split>``), never by guessing names.

Conversions (all exact):

* Depth: a 16-bit PNG whose raw uint16 words are IEEE float16 depths in metres; decoded as
  ``uint16 -> view float16 -> float32`` and multiplied by ``depth.scale_adjustment`` (PyTorch3D
  implicitron semantics ``depth = png * scale_adjustment``; 1.0 in the release).
* Cameras: PyTorch3D convention, row vectors ``X_cam = X_world @ R + T`` with camera axes x left,
  y up, z forward. So the column-vector world-to-camera is ``[R^T | T]``; its inverse is the
  PyTorch3D c2w and ``c2w_cv = c2w_p3d @ diag(-1, -1, 1, 1)``.
* Intrinsics ``ndc_isotropic``: with ``s = min(W, H) / 2``, ``fx = f_ndc_x * s``,
  ``fy = f_ndc_y * s``, ``cx = W/2 - p_ndc_x * s``, ``cy = H/2 - p_ndc_y * s`` (pixel centres at
  j + 0.5, as in the PyTorch3D NDC grid). ``ndc_norm_image_bounds`` uses ``s = (W/2, H/2)``
  per axis instead.
* Tracks: ``trajectories/NNNNNN.pth`` per frame holds ``traj_3d_world`` (N,3) world positions of
  the same N mesh vertices in every frame and ``verts_inds_vis`` (N,) visibility. They are loaded
  with ``torch.load(weights_only=True)`` (dicts of tensors need no pickle code execution).
  ``verts_inds_vis`` does not apply the image bounds (the authors' loaders clear it for points
  outside the image), so a point is visible in d4s only if it is flagged *and* projects, with
  the frame's camera, in front of the camera and inside the image; the cleared point-frames are
  counted in ``meta.qc["gt_tracks"]["hidden_off_image"]``.

The world frame is the dataset's own; only the camera axes are converted. Scenes are
``<split>/<seq>_source_left`` (the left view carries the tracks; pass ``options={"views":
["left", "right"]}`` to also get right-view scenes).
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from pipeline.storage import PathEscapeError
from stages.ingest.base import AdapterDefaults, AdapterOptions, Capabilities, DatasetAdapter, SceneRef

ANNOTATION_TEMPLATE = "frame_annotations_{split}.jgz"


class DynamicReplicaOptions(AdapterOptions):
    """``datasets.dynamic_replica.options`` (docs/CONFIG.md)."""

    splits: list[str] | None = Field(None, description="split folders to read; None: all but 'real' (no ground truth)")
    views: list[Literal["left", "right"]] = Field(
        ["left"], description="views to read as scenes (the left one has the trajectories)"
    )
    tracks: bool = Field(True, description="read the ground-truth trajectories")


def in_view(points: np.ndarray, intrinsics: np.ndarray, c2w: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(T,N) points ``(T,N,3)`` that project in front of frame t's camera and inside its image
    (the image area [0, W] x [0, H], pixel centres at +0.5)."""
    h, w = hw
    out = np.zeros(points.shape[:2], dtype=bool)
    for i in range(points.shape[0]):
        uv, z = geo.project(points[i], intrinsics[i], c2w[i])
        with np.errstate(invalid="ignore"):
            out[i] = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
    return out


class DynamicReplicaAdapter(DatasetAdapter):
    name = "dynamic_replica"
    version = "2"  # 2: visible only inside the image and in front of the camera
    capabilities = Capabilities(dynamic=True, has_depth=True, has_tracks=True, real=False)
    options_model = DynamicReplicaOptions
    defaults = AdapterDefaults(
        clip_length=49,
        frame_stride=1,
        clip_stride=49,
        repeat_weight=1.0,
        depth_source="gt",
        track_source="gt",
        min_depth_m=0.01,
        max_depth_m=100.0,
    )

    def __init__(self, root, options=None, **kw):
        super().__init__(root, options, **kw)
        self._ann_cache: dict[str, dict[tuple[str, str], list[dict]]] = {}
        self._seq_problems: dict[str, dict[tuple[str, str], tuple[str, str]]] = {}

    # -- annotations -------------------------------------------------------------------------
    def _splits(self) -> list[str]:
        """Split folders ``<root>/<split>/frame_annotations_<split>.jgz`` (sorted).

        The ``real`` split (real stereo captures without ground truth) is skipped unless named in
        ``options["splits"]``.
        """
        wanted = self.opts.splits
        out = []
        for name in self.store.listdir(""):
            if wanted is not None and name not in wanted:
                continue
            if wanted is None and name == "real":
                continue
            # lookup, not exists: a split folder that cannot be read raises (its sequences cannot be
            # planned without it; make_plan says so in one line) instead of reading as absent
            if self.store.lookup(posixpath.join(name, ANNOTATION_TEMPLATE.format(split=name))) is not None:
                out.append(name)
        return out

    def _annotations(self, split: str) -> dict[tuple[str, str], list[dict]]:
        """(sequence_name, view) -> entries sorted by frame_number, parsed once per split."""
        if split in self._ann_cache:
            return self._ann_cache[split]
        rel = posixpath.join(split, ANNOTATION_TEMPLATE.format(split=split))
        raw = self.read(rel)
        try:
            entries = json.loads(gzip.decompress(raw).decode("utf-8"))
        except Exception as exc:
            raise ClipError(
                f"unreadable gzip JSON annotations ({type(exc).__name__}: {exc})", self.where(rel)
            ) from None
        if not isinstance(entries, list):
            raise ClipError("annotations must be a JSON list of frame entries", self.where(rel))
        seqs: dict[tuple[str, str], list[dict]] = {}
        for k, e in enumerate(entries):
            try:
                key = (str(e["sequence_name"]), str(e.get("camera_name") or "left"))
                int(e["frame_number"])
                e["image"]["path"]
            except (KeyError, TypeError, ValueError):
                raise ClipError(f"entry {k} lacks sequence_name/frame_number/image.path", self.where(rel)) from None
            seqs.setdefault(key, []).append(e)
        problems = {}
        for key, lst in seqs.items():
            lst.sort(key=lambda e: int(e["frame_number"]))
            problem = _repeated_frames(lst)
            if problem:  # this sequence's clips fail with it; the split's other sequences go on
                problems[key] = (f"sequence {key[0]} ({key[1]}) {problem}", self.where(rel))
        self._ann_cache[split] = seqs
        self._seq_problems[split] = problems
        return seqs

    @staticmethod
    def _scene_id(split: str, seq: str, view: str) -> str:
        return f"{split}/{seq}_source_{view}"

    def discover(self) -> list[SceneRef]:
        views = list(self.opts.views)
        scenes = []
        for split in self._splits():
            try:
                sequences = self._annotations(split)
            except ClipError as exc:  # bad content: this split fails with it, no other
                rel = posixpath.join(split, ANNOTATION_TEMPLATE.format(split=split))
                scenes.append(self.unreadable_scene(f"{split}/unreadable-annotations", exc, rel))
                continue
            for (seq, view), entries in sequences.items():
                if view in views:
                    problem = self._seq_problems[split].get((seq, view), ())
                    scenes.append(
                        SceneRef(
                            self.name,
                            self._scene_id(split, seq, view),
                            0 if problem else len(entries),
                            extra=(split, seq, view),
                            problem=problem,
                        )
                    )
        return sorted(scenes, key=lambda s: s.scene)

    def _entries(self, scene: SceneRef) -> tuple[str, list[dict], str]:
        if scene.extra:
            split, seq, view = scene.extra
        else:
            split, rest = scene.scene.split("/", 1)
            seq, view = rest.rsplit("_source_", 1)
        ann_rel = posixpath.join(split, ANNOTATION_TEMPLATE.format(split=split))
        entries = self._annotations(split).get((seq, view))
        if entries is None:
            raise ClipError(f"sequence {seq} ({view}) is not in the annotations", self.where(ann_rel))
        if len(entries) != scene.num_frames:
            raise ClipError(f"{len(entries)} annotated frames, expected {scene.num_frames}", self.where(ann_rel))
        return split, entries, ann_rel

    # -- decoding ----------------------------------------------------------------------------
    def _depth(self, rel: str, scale: float, hw: tuple[int, int]) -> np.ndarray:
        bits = self.read_png16(rel)
        if bits.shape != hw:
            raise ClipError(f"depth is {bits.shape[1]}x{bits.shape[0]}, image is {hw[1]}x{hw[0]}", self.where(rel))
        return np.ascontiguousarray(bits, dtype="<u2").view("<f2").astype(np.float32) * np.float32(scale)

    def _camera(self, e: dict, hw: tuple[int, int], ann_rel: str) -> tuple[np.ndarray, np.ndarray]:
        """(fx fy cx cy), OpenCV c2w from one entry's PyTorch3D viewpoint."""
        where = self.where(ann_rel)
        vp = e.get("viewpoint")
        tag = f"frame {e.get('frame_number')} of {e.get('sequence_name')}"
        if not isinstance(vp, dict):
            raise ClipError(f"{tag}: missing viewpoint", where)
        try:
            r = np.asarray(vp["R"], dtype=np.float64)
            t = np.asarray(vp["T"], dtype=np.float64)
            f = np.asarray(vp["focal_length"], dtype=np.float64).reshape(-1)
            p = np.asarray(vp["principal_point"], dtype=np.float64).reshape(-1)
        except (KeyError, TypeError, ValueError):
            raise ClipError(f"{tag}: viewpoint needs numeric R, T, focal_length, principal_point", where) from None
        if r.shape != (3, 3) or t.shape != (3,) or p.shape != (2,) or f.shape not in ((1,), (2,)):
            raise ClipError(f"{tag}: viewpoint shapes R{r.shape} T{t.shape} f{f.shape} p{p.shape}", where)
        for arr, what in ((r, "R"), (t, "T"), (f, "focal_length"), (p, "principal_point")):
            if not np.all(np.isfinite(arr)):
                raise ClipError(f"{tag}: viewpoint {what} contains NaN/inf", where)
        if not np.all(f > 0):
            raise ClipError(f"{tag}: viewpoint focal_length {f.tolist()} is not positive", where)
        if float(geo.rotation_error(r)) > 1e-4:
            raise ClipError(f"{tag}: viewpoint R is not a rotation (error {float(geo.rotation_error(r)):.2e})", where)
        f = np.broadcast_to(f, (2,))
        h, w = hw
        half = np.array([w / 2.0, h / 2.0])
        fmt = str(vp.get("intrinsics_format", "ndc_norm_image_bounds")).lower()
        if fmt == "ndc_isotropic":
            s = np.array([min(half), min(half)])
        elif fmt == "ndc_norm_image_bounds":
            s = half
        else:
            raise ClipError(f"{tag}: unknown intrinsics_format {fmt!r}", where)
        k = np.array([f[0] * s[0], f[1] * s[1], half[0] - p[0] * s[0], half[1] - p[1] * s[1]])
        w2c_p3d = geo.make_pose(r.T, t)  # column-vector form of X_cam = X_world @ R + T
        c2w = geo.invert_pose(w2c_p3d) @ geo.P3D_TO_CV
        return k, c2w

    def _trajectory_file(self, rel: str):
        """The trajectory file's object. Dicts of tensors load without executing pickle code
        (``weights_only``); anything needing more is refused. A local file is memory-mapped: the
        release's files also carry the frame's image (``img``, 2.7 MB at 1280x720), which d4s never
        reads; a legacy (not zip) file cannot be mapped and is read whole, as a remote one is."""
        import torch

        if self.store.is_local:
            try:
                return torch.load(self.store.path(rel), map_location="cpu", weights_only=True, mmap=True)
            except PathEscapeError:  # a path from the dataset's metadata: never read
                raise ClipError(f"path {rel!r} leaves the dataset root", self.where("")) from None
            except OSError as exc:
                raise self.read_error(exc, rel) from None
            except RuntimeError:
                pass  # not mappable (a legacy, not zip, file): read whole below, which names a bad one
        return torch.load(io.BytesIO(self.read(rel)), map_location="cpu", weights_only=True)

    def _tracks(self, rel: str, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        try:
            obj = self._trajectory_file(rel)
        except ClipError:
            raise
        except Exception as exc:
            raise ClipError(
                f"unreadable trajectory file ({type(exc).__name__}: {str(exc)[:200]})", self.where(rel)
            ) from None
        if not isinstance(obj, dict) or "traj_3d_world" not in obj or "verts_inds_vis" not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ClipError(f"trajectory file needs traj_3d_world and verts_inds_vis, has {keys}", self.where(rel))
        try:
            pts = np.asarray(
                obj["traj_3d_world"].numpy() if hasattr(obj["traj_3d_world"], "numpy") else obj["traj_3d_world"],
                dtype=np.float64,
            )
            vis = np.asarray(
                obj["verts_inds_vis"].numpy() if hasattr(obj["verts_inds_vis"], "numpy") else obj["verts_inds_vis"]
            ).astype(bool)
        except Exception as exc:
            raise ClipError(f"trajectory arrays unreadable ({type(exc).__name__})", self.where(rel)) from None
        if pts.ndim != 2 or pts.shape[1] != 3 or vis.shape != (pts.shape[0],):
            raise ClipError(
                f"traj_3d_world {pts.shape} / verts_inds_vis {vis.shape} are not (N,3)/(N,)", self.where(rel)
            )
        if not np.all(np.isfinite(pts[vis])):
            raise ClipError("traj_3d_world contains NaN/inf at visible points", self.where(rel))
        return pts, vis

    def _annotated_path(self, value, split: str, ann_rel: str, e: dict, what: str) -> str:
        """A file an entry names, relative to the split: a string that stays under the root."""
        tag = f"frame {e.get('frame_number')} of {e.get('sequence_name')}"
        if not isinstance(value, str) or not value:
            raise ClipError(f"{tag}: {what} is not a path ({value!r})", self.where(ann_rel))
        rel = posixpath.normpath(posixpath.join(split, value.replace("\\", "/")))
        if value.startswith("/") or rel == ".." or rel.startswith("../"):
            raise ClipError(f"{tag}: {what} {value!r} leaves the dataset root", self.where(ann_rel))
        return rel

    def _frame_fields(self, e: dict, split: str, ann_rel: str) -> tuple[str, tuple | None, str, float]:
        """(image path, annotated (H, W) or None, depth path, depth scale) of one entry, checked:
        a wrong type or value names the annotation file and the frame."""
        tag = f"frame {e.get('frame_number')} of {e.get('sequence_name')}"
        where = self.where(ann_rel)
        img_rel = self._annotated_path(e["image"].get("path"), split, ann_rel, e, "image.path")
        size = e["image"].get("size")
        if size is not None:
            try:
                size = tuple(int(v) for v in size)
            except (TypeError, ValueError):
                size = ()
            if len(size) != 2:
                raise ClipError(f"{tag}: image.size {e['image'].get('size')!r} is not (H, W)", where)
        d_ann = e.get("depth")
        if not isinstance(d_ann, dict) or "path" not in d_ann:
            raise ClipError(f"{tag} has no depth path", where)
        depth_rel = self._annotated_path(d_ann["path"], split, ann_rel, e, "depth.path")
        raw = d_ann.get("scale_adjustment")
        try:
            scale = 1.0 if raw is None else float(raw)  # absent or null: the depth as stored
        except (TypeError, ValueError):
            scale = float("nan")
        if not (np.isfinite(scale) and scale > 0):
            raise ClipError(f"{tag}: depth.scale_adjustment {raw!r} is not a positive number", where)
        return img_rel, size, depth_rel, scale

    # -- clips -------------------------------------------------------------------------------
    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        self.frame_window(scene, frames)
        split, entries, ann_rel = self._entries(scene)
        rgb, depth, ks, c2ws, tracks, vis = [], [], [], [], [], []
        want_tracks = self.opts.tracks
        for i in frames:
            e = entries[i]
            img_rel, size, depth_rel, scale = self._frame_fields(e, split, ann_rel)
            img = self.read_image(img_rel, expect_hw=rgb[0].shape[:2] if rgb else None)
            hw = img.shape[:2]
            if size is not None and size != hw:
                raise ClipError(f"image is {hw[1]}x{hw[0]} but annotated size (H,W) is {size}", self.where(img_rel))
            depth.append(self._depth(depth_rel, scale, hw))
            k, c2w = self._camera(e, hw, ann_rel)
            rgb.append(img)
            ks.append(k)
            c2ws.append(c2w)
            traj = e.get("trajectories")
            if want_tracks and isinstance(traj, dict) and traj.get("path"):
                t_rel = self._annotated_path(traj["path"], split, ann_rel, e, "trajectories.path")
                p, v = self._tracks(t_rel, hw)
                if tracks and p.shape != tracks[0].shape:
                    raise ClipError(
                        f"{p.shape[0]} tracked points, earlier frames have {tracks[0].shape[0]}", self.where(t_rel)
                    )
                tracks.append(p)
                vis.append(v)
        if tracks and len(tracks) != len(frames):
            raise ClipError(f"only {len(tracks)} of {len(frames)} frames have trajectory files", self.where(ann_rel))
        depth = np.stack(depth)
        ks, c2ws = np.stack(ks), np.stack(c2ws)
        points = visible = None
        if tracks:
            points, flagged = np.stack(tracks), np.stack(vis)
            seen = in_view(points, ks, c2ws, rgb[0].shape[:2])
            meta.qc["gt_tracks"] = {"hidden_off_image": int((flagged & ~seen).sum())}
            points, visible = points.astype(np.float32), flagged & seen
        clip = Clip(
            meta=meta,
            rgb=np.stack(rgb),
            intrinsics=ks,
            c2w=c2ws,
            depth=depth,
            depth_valid=self.depth_validity(depth),
            tracks=points,
            track_visible=visible,
        )
        return clip.validate()


def _repeated_frames(entries: list[dict]) -> str:
    """Why a sequence's entries (sorted by frame number) cannot be its frames, or '': a frame number
    twice, or two entries naming one image/depth/trajectory file (a copied entry would load the
    same frame twice)."""
    nums = [int(e["frame_number"]) for e in entries]
    if len(set(nums)) != len(nums):
        return "has duplicate frame numbers"
    for field in ("image", "depth", "trajectories"):
        seen: dict[str, int] = {}
        for num, e in zip(nums, entries):
            ann = e.get(field)
            path = ann.get("path") if isinstance(ann, dict) else None
            if not isinstance(path, str):
                continue  # a missing or malformed path is the frame's own error, at load
            if path in seen:
                return f"frames {seen[path]} and {num} name the same {field} file {path!r}"
            seen[path] = num
    return ""
