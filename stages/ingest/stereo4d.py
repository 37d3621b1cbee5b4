"""Stereo4D: per-clip ``.npz`` annotations plus the rectified left-eye perspective video.

Facts (sources in docs/datasets/stereo4d.md; FORMATS.md §9 is corrected there): the released
``<split>/<clip>.npz`` (clip = ``<youtube_id>_<first_timestamp_us>``) holds ``name``,
``video_id``, ``timestamps`` (T,) in microseconds, ``camera2world`` (T,3,4) poses of the
rectified left camera (OpenCV axes, metres), the 3D tracks packed as ``track_lengths`` (N,),
``track_indices`` (sum of lengths,) frame indices and ``track_coordinates`` (sum, 3) world
metres, and ``rectified2rig``/``fov_bounds`` (only needed to make the video). The official
loader ``utils.load_dataset_npz`` unpacks the tracks into ``track3d`` (N,T,3) with NaN where a
track has no point, and turns the poses into ``extrs_rectified`` = world-to-camera (T,3,4); a
file already holding those two keys (a saved output of that loader) is read too.

Frames, from one of two videos (option ``source``; ``auto`` takes the first found):

- ``rectified``: ``<clip>-left_rectified.mp4``, made by the authors' ``rectify.py`` from the
  YouTube VR180 video: 512x512, 60 degree horizontal FOV, principal point at the image centre,
  pixel rays sampled at pixel centres (+0.5), i.e. exactly the d4s convention with
  fx = fy = (W/2)/tan(30 deg), cx = W/2, cy = H/2, one frame per timestamp. Looked for beside the
  npz (``<split>/<clip>-left_rectified.mp4``), in rectify.py's per-clip output folder
  (``<split>/<clip>/<clip>-left_rectified.mp4``) or ``processed/<clip>/...`` (rectify.py's
  default output folder next to ``npz/``); ``video_pattern`` overrides this with a template
  relative to the root using ``{split}`` and ``{clip}``.
- ``raw``: the side-by-side equirectangular VR180 video ``<video_id>.mp4`` as downloaded
  (``raw_video_pattern``, default ``raw/{video_id}.mp4`` as in rectify.py's
  ``stereo4d_dataset/raw``). d4s takes the frame nearest each timestamp (``video_times``) and
  makes the rectified left view itself with the npz's ``rectified2rig`` and ``fov_bounds``, the
  same two resamplings as rectify.py (``vr180``), on the GPU when there is one.
  ``output_size`` (512) and ``hfov_deg`` (60) are rectify.py's ``imh = imw`` and ``--output_hfov``.

Tracks: a point present in the file is one the authors kept as visible with valid stereo
depth, so ``track_visible`` = present; absent entries are NaN in ``clip.tracks``. Only tracks
with at least one point in the clip's frames are returned. There is no dense depth: a later
stage projects the tracks for sparse metric depth (``depth_source = "sparse"``).
"""

from __future__ import annotations

import io
import posixpath
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from stages.ingest.base import (
    DISCOVERY_BLOCK,
    AdapterDefaults,
    AdapterOptions,
    Capabilities,
    DatasetAdapter,
    SceneRef,
    union_index,
)

HFOV_DEG = 60.0  # rectify.py NewCropFlags.output_hfov / --output_hfov default
VIDEO_SUFFIX = "-left_rectified.mp4"
ROTATION_TOL = 1e-3
RAW_KEYS = ("timestamps", "camera2world", "track_lengths", "track_indices", "track_coordinates")
DECODED_KEYS = ("timestamps", "extrs_rectified", "track3d")


class Stereo4DOptions(AdapterOptions):
    """``datasets.stereo4d.options`` (docs/CONFIG.md)."""

    source: Literal["auto", "rectified", "raw"] = Field(
        "auto", description="the authors' rectified left video, or the raw VR180 video rectified by d4s"
    )
    video_pattern: str | None = Field(
        None,
        description="rectified video template ({split}, {clip}), relative "
        "to the root; default: the rectify.py output places",
    )
    raw_video_pattern: list[str] = Field(
        ["raw/{video_id}.mp4", "{split}/raw/{video_id}.mp4"],
        description="raw VR180 video templates ({video_id}, {split}, {clip})",
    )
    hfov_deg: float = Field(HFOV_DEG, gt=0, lt=180, description="horizontal FOV of the rectified view")
    output_size: int = Field(512, ge=8, le=4096, description="rectified view size (S x S) made from raw videos")
    min_vr180_height: int = Field(1920, ge=0, description="refuse raw videos lower than this (as rectify.py)")
    timestamp_tolerance_us: float | None = Field(
        None, gt=0, description="largest |frame time - timestamp| accepted (default: a quarter of the frame period)"
    )
    decoder: Literal["auto", "pyav", "torchcodec"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("raw_video_pattern", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


def stereo4d_intrinsics(width: int, height: int, hfov_deg: float = HFOV_DEG) -> np.ndarray:
    """fx fy cx cy of the rectified perspective video (square pixels, centred principal point)."""
    f = geo.fov_to_focal(np.deg2rad(hfov_deg), width)
    return np.array([f, f, width / 2.0, height / 2.0])


class Stereo4DAdapter(DatasetAdapter):
    name = "stereo4d"
    version = "2"
    capabilities = Capabilities(dynamic=True, has_depth=False, has_tracks=True, real=True, metric_poses=True)
    # Real, dynamic, metric cameras and sparse metric 3D tracks. Depth comes from projecting the
    # tracks (sparse); GT tracks. Official tools treat depth beyond 20 m as invalid
    # (utils.Track3d valid_depth_max=20): beyond that the 63 mm baseline gives < 1.5 px disparity.
    # 49-frame clips (1 + 4k, what the trainer consumes), overlapping by 9 (stride 40): the depth
    # model and the metric fit run once per scene however many clips use a frame.
    defaults = AdapterDefaults(
        clip_length=49,
        frame_stride=1,
        clip_stride=40,
        repeat_weight=1.0,
        loss_weights={"depth": 0.5, "motion": 1.0, "photo": 1.0},
        depth_source="sparse",
        track_source="gt",
        min_depth_m=0.05,
        max_depth_m=20.0,
    )
    options_model = Stereo4DOptions
    opts: Stereo4DOptions

    # -- discovery ---------------------------------------------------------------------------
    def discover(self) -> list[SceneRef]:
        scenes, errors = [], []
        for p in self.store.glob("*/*.npz", errors):
            rel = posixpath.relpath(p, self.store.root)
            try:  # a small block: only the timestamps and the zip directory are fetched, not the tracks
                with self.store.open(rel, block_size=DISCOVERY_BLOCK) as f, np.load(f, allow_pickle=False) as z:
                    if "timestamps" not in z.files:
                        continue  # not a Stereo4D annotation (e.g. a disparity npz)
                    n = int(np.asarray(z["timestamps"]).reshape(-1).shape[0])
                problem = () if n else ("the npz has no timestamps", self.where(rel))
            except Exception as exc:  # noqa: BLE001 - listed, so that its clip fails with the reason
                problem = (f"unreadable .npz ({type(exc).__name__}: {exc})", self.where(rel))
            scenes.append(SceneRef(self.name, rel[: -len(".npz")], n if not problem else 0, problem=problem))
        scenes = self.listing_problems(scenes, errors, lambda rel: None)  # a split folder: many scenes
        return sorted(set(scenes), key=lambda s: s.scene)

    def video_candidates(self, scene: SceneRef) -> list[str]:
        split, clip = posixpath.split(scene.scene)
        pattern = self.opts.video_pattern
        if pattern:
            return [pattern.format(split=split, clip=clip)]
        parent = posixpath.dirname(split)
        return [
            posixpath.join(split, clip + VIDEO_SUFFIX),
            posixpath.join(split, clip, clip + VIDEO_SUFFIX),
            posixpath.join(parent, "processed", clip, clip + VIDEO_SUFFIX),
        ]

    # -- annotations ---------------------------------------------------------------------------
    def read_annotations(self, scene: SceneRef) -> dict:
        """c2w (T,4,4), timestamps (T,), and the packed tracks, validated."""
        rel = scene.scene + ".npz"
        where = self.where(rel)
        data = self.read(rel)
        try:
            z = np.load(io.BytesIO(data), allow_pickle=False)
            files = set(z.files)
        except Exception as exc:
            raise ClipError(f"unreadable .npz ({type(exc).__name__}: {exc})", where) from None

        def get(key):
            try:
                arr = np.asarray(z[key])
            except Exception as exc:
                raise ClipError(f"unreadable array {key!r} ({type(exc).__name__}: {exc})", where) from None
            if arr.dtype.kind not in "biuf":  # text would be parsed by astype, complex lose its imaginary part
                raise ClipError(f"{key!r} must hold real numbers, got dtype {arr.dtype}", where)
            return arr

        if set(RAW_KEYS) <= files:
            form = "raw"
        elif set(DECODED_KEYS) <= files:
            form = "decoded"
        else:
            missing = [k for k in RAW_KEYS if k not in files]
            raise ClipError(f"missing keys {missing} (has {sorted(files)})", where)
        ts = get("timestamps").reshape(-1)
        t = len(ts)
        if t == 0:
            raise ClipError("no frames: 'timestamps' is empty", where)
        if not np.all(np.isfinite(ts.astype(np.float64))) or np.any(np.diff(ts.astype(np.float64)) <= 0):
            raise ClipError("'timestamps' must be finite and strictly increasing", where)
        if t != scene.num_frames:
            raise ClipError(f"{t} timestamps, expected {scene.num_frames} (file changed since discovery?)", where)
        out = {"timestamps": ts.astype(np.int64), "form": form}
        for key in ("name", "video_id"):
            if key in files:
                try:
                    out[key] = str(np.asarray(z[key]).reshape(-1)[0]) if np.asarray(z[key]).size else ""
                except Exception:
                    pass
        for key in ("rectified2rig", "fov_bounds"):  # needed only to rectify a raw video
            if key in files:
                out[key] = get(key)
        if form == "raw":
            pose = get("camera2world").astype(np.float64)
            if pose.ndim != 3 or pose.shape[1:] not in ((3, 4), (4, 4)):
                raise ClipError(f"'camera2world' must be (T,3,4), got {pose.shape}", where)
            if len(pose) != t:
                raise ClipError(f"'camera2world' has {len(pose)} poses for {t} timestamps", where)
            c2w = geo.make_pose(pose[:, :3, :3], pose[:, :3, 3])
        else:
            pose = get("extrs_rectified").astype(np.float64)
            if pose.ndim != 3 or pose.shape[1:] not in ((3, 4), (4, 4)):
                raise ClipError(f"'extrs_rectified' must be (T,3,4), got {pose.shape}", where)
            if len(pose) != t:
                raise ClipError(f"'extrs_rectified' has {len(pose)} poses for {t} timestamps", where)
            c2w = geo.invert_pose(geo.make_pose(pose[:, :3, :3], pose[:, :3, 3]))
        if not np.all(np.isfinite(pose)):
            bad = int(np.flatnonzero(~np.isfinite(pose).all(axis=(1, 2)))[0])
            raise ClipError(f"camera pose of frame {bad} contains NaN/inf", where)
        err = geo.rotation_error(pose[:, :3, :3])
        if np.any(err > ROTATION_TOL):
            bad = int(np.argmax(err))
            raise ClipError(f"rotation of frame {bad} is not orthonormal (error {err[bad]:.2e})", where)
        out["c2w"] = c2w
        if form == "raw":
            lengths = get("track_lengths").reshape(-1)
            idx = get("track_indices").reshape(-1)
            coords = get("track_coordinates")
            if not (np.issubdtype(lengths.dtype, np.integer) and np.issubdtype(idx.dtype, np.integer)):
                raise ClipError(
                    f"'track_lengths'/'track_indices' must be integers, got {lengths.dtype}/{idx.dtype}", where
                )
            if np.any(lengths < 0):
                raise ClipError("'track_lengths' has negative entries", where)
            total = int(lengths.sum())
            if coords.ndim != 2 or coords.shape[1] != 3:
                raise ClipError(f"'track_coordinates' must be (M,3), got {coords.shape}", where)
            if len(idx) != total or len(coords) != total:
                raise ClipError(
                    f"track arrays disagree: sum(track_lengths) = {total}, {len(idx)} track_indices, "
                    f"{len(coords)} track_coordinates",
                    where,
                )
            if total and (idx.min() < 0 or idx.max() >= t):
                raise ClipError(f"'track_indices' outside 0..{t - 1} (min {idx.min()}, max {idx.max()})", where)
            if not np.all(np.isfinite(coords)):
                raise ClipError("'track_coordinates' contains NaN/inf", where)
            rows = np.repeat(np.arange(len(lengths)), lengths)
            if total and len(np.unique(rows.astype(np.int64) * t + idx)) != total:
                raise ClipError("a track has two points for the same frame in 'track_indices'", where)
            out.update(track_rows=rows, track_frames=idx.astype(np.int64), track_xyz=coords, num_tracks=len(lengths))
        else:
            tracks = get("track3d")
            if tracks.ndim != 3 or tracks.shape[1] != t or tracks.shape[2] != 3:
                raise ClipError(f"'track3d' must be (N,{t},3), got {tracks.shape}", where)
            present = np.isfinite(tracks).all(axis=2)
            partial = np.isfinite(tracks).any(axis=2) & ~present
            if np.any(partial) or np.any(np.isinf(tracks)):
                raise ClipError("'track3d' has inf or partly-NaN points", where)
            rows, frames_ = np.nonzero(present)
            out.update(
                track_rows=rows,
                track_frames=frames_.astype(np.int64),
                track_xyz=tracks[rows, frames_],
                num_tracks=tracks.shape[0],
            )
        return out

    # -- frames ----------------------------------------------------------------------------------
    def raw_video_candidates(self, scene: SceneRef, ann: dict) -> list[str]:
        split, clip = posixpath.split(scene.scene)
        video_id = ann.get("video_id") or clip.rpartition("_")[0] or clip
        return [p.format(video_id=video_id, split=split, clip=clip) for p in self.opts.raw_video_pattern]

    def _frames(self, scene: SceneRef, ann: dict, frames: list[int]) -> tuple[np.ndarray, np.ndarray, str]:
        """(rgb, intrinsics, "rectified" | "raw") for the clip's frames."""
        want = self.opts.source
        tried = []
        if want in ("auto", "rectified"):
            cands = self.video_candidates(scene)
            rel = next((c for c in cands if self.store.exists(c)), None)
            if rel is not None:
                from stages.ingest.video import read_video

                rgb = read_video(
                    self.read(rel),
                    self.where(rel),
                    frames=frames,
                    expect_frames=scene.num_frames,
                    decoder=self.opts.decoder,
                    device=self.opts.device,
                )
                h, w = rgb.shape[1:3]
                return rgb, np.tile(stereo4d_intrinsics(w, h, self.opts.hfov_deg), (len(frames), 1)), "rectified"
            tried += cands
        if want in ("auto", "raw"):
            cands = self.raw_video_candidates(scene, ann)
            rel = next((c for c in cands if self.store.exists(c)), None)
            if rel is not None:
                rgb = self._rectify_raw(scene, ann, frames, rel)
                s = self.opts.output_size
                return rgb, np.tile(stereo4d_intrinsics(s, s, self.opts.hfov_deg), (len(frames), 1)), "raw"
            tried += cands
        what = {
            "auto": "rectified left video or raw VR180 video",
            "rectified": "rectified left video",
            "raw": "raw VR180 video",
        }[want]
        raise ClipError(
            f"{what} is missing (looked for {', '.join(tried)}; make the rectified one with the authors' "
            "rectify.py, or put the YouTube VR180 video where raw_video_pattern points)",
            self.where(tried[0]),
        )

    def _rectify_raw(self, scene: SceneRef, ann: dict, frames: list[int], rel: str) -> np.ndarray:
        """Rectified left-eye views from the raw side-by-side VR180 video (see vr180.py)."""
        from stages.ingest.video_decoders import open_decoder, stored_video
        from stages.ingest.video_times import check_covers, frames_at_times
        from stages.ingest.vr180 import RectifySpec, check_calibration, check_layout, rectifier

        npz_where = self.where(scene.scene + ".npz")
        if "rectified2rig" not in ann or "fov_bounds" not in ann:
            raise ClipError(
                "the npz lacks 'rectified2rig'/'fov_bounds', which rectifying a raw VR180 video needs", npz_where
            )
        check_calibration(ann["rectified2rig"], ann["fov_bounds"], npz_where)
        where = self.where(rel)
        with (
            stored_video(self.store, rel) as source,
            open_decoder(source, where, backend=self.opts.decoder, device=self.opts.device) as dec,
        ):
            eye_h, eye_w = check_layout(dec.info.width, dec.info.height, where, self.opts.min_vr180_height)
            spec = RectifySpec(
                eye_hw=(eye_h, eye_w),
                rectified2rig=tuple(np.asarray(ann["rectified2rig"][0], np.float64).reshape(-1)),
                fov_bounds=tuple(np.asarray(ann["fov_bounds"], np.float64).reshape(-1)),
                size=self.opts.output_size,
                hfov_deg=self.opts.hfov_deg,
            )
            on_gpu = dec.info.device == "cuda" and dec.info.backend == "torchcodec"
            rect = rectifier(spec, "cuda" if on_gpu else self.opts.device)
            check_covers(
                dec.info,
                float(ann["timestamps"][-1]),
                where,
                "the npz timestamps",
                self.opts.timestamp_tolerance_us,
            )
            got = frames_at_times(
                dec,
                ann["timestamps"][frames],
                tolerance_us=self.opts.timestamp_tolerance_us,
                as_tensor=on_gpu,
                transform=lambda f: rect(f[None])[0],
                what="the npz timestamps",
            )
        return np.stack(got.frames)

    # -- clip ----------------------------------------------------------------------------------
    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        ann, rgb, k, source = self.read_union(scene, frames, meta)
        return self._clip(ann, frames, rgb, k, source, meta)

    @classmethod
    def reads_scene_union(cls) -> bool:
        """A scene's clips overlap (by 9 of 49 frames at the defaults): their frames are decoded
        (and, from the raw VR180 video, rectified) once; each clip's tracks are then chosen from the
        scene's annotations for its own frames, as when it is read alone."""
        return True

    def read_union(self, scene: SceneRef, union: list[int], meta: ClipMeta):
        """(annotations, rgb, intrinsics, source) of the frames ``union``."""
        self.frame_window(scene, union)
        ann = self.read_annotations(scene)
        return (ann, *self._frames(scene, ann, union))

    def cut_union(self, whole, union: list[int], frame_lists: list[list[int]], metas: list[ClipMeta]) -> list:
        ann, rgb, k, source = whole
        at = {f: i for i, f in enumerate(union)}
        out: list = []
        for frames, meta in zip(frame_lists, metas):
            idx = union_index([at[f] for f in frames])
            try:
                out.append(self._clip(ann, list(frames), rgb[idx], k[idx], source, meta))
            except Exception as exc:  # noqa: BLE001 - this clip's failure, as data
                out.append(exc)
        return out

    def _clip(self, ann: dict, frames: list[int], rgb: np.ndarray, k: np.ndarray, source: str, meta: ClipMeta) -> Clip:
        """The clip of these scene frames from their decoded views: cameras, and the tracks of the
        scene's annotations that are seen in them."""
        meta.extra.setdefault("frames_from", source)
        c2w = ann["c2w"][frames]

        # Tracks of the clip's frames: column j of the clip is scene frame frames[j].
        col = np.full(len(ann["timestamps"]), -1, dtype=np.int64)
        col[np.asarray(frames)] = np.arange(len(frames))
        sel = col[ann["track_frames"]] >= 0
        rows, cols, xyz = ann["track_rows"][sel], col[ann["track_frames"][sel]], ann["track_xyz"][sel]
        keep, rows_c = np.unique(rows, return_inverse=True)
        tracks = np.full((len(frames), len(keep), 3), np.nan, dtype=np.float32)
        visible = np.zeros((len(frames), len(keep)), dtype=bool)
        tracks[cols, rows_c] = xyz
        visible[cols, rows_c] = True

        meta.extra.setdefault("timestamps_us", [int(ann["timestamps"][i]) for i in frames])
        meta.extra.setdefault("num_tracks_in_file", int(ann["num_tracks"]))
        for key in ("name", "video_id"):
            if key in ann:
                meta.extra.setdefault(key, ann[key])
        meta.extra.setdefault("hfov_deg", self.opts.hfov_deg)
        return Clip(meta=meta, rgb=rgb, intrinsics=k, c2w=c2w, tracks=tracks, track_visible=visible).validate()
