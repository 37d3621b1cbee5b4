"""RealEstate10K in the three forms users hold it: camera files with frames, camera files with the
downloaded YouTube videos, or pixelSplat/MVSplat chunks.

Facts (``../shared/datasets/FORMATS.md`` §8; sources in docs/datasets/realestate10k.md): each
camera file ``{train,test}/<sequence_id>.txt`` has the YouTube URL on line 1, then one line per
frame of 19 numbers::

    timestamp_us fx fy cx cy k1 k2 r11 r12 r13 t1 r21 r22 r23 t2 r31 r32 r33 t3

with fx, cx divided by the image width and fy, cy by the image height, k1 = k2 = 0, and the last
12 numbers a row-major 3x4 world-to-camera matrix with OpenCV camera axes. Poses come from
SLAM + bundle adjustment and are known only up to one unknown scale per sequence, so d4s keeps
them in the dataset's units (``capabilities.metric_poses = False``): c2w = inverse([R|t; 0 0 0 1]).
Pixel intrinsics for the stored frames (W x H) are fx*W, fy*H, cx*W, cy*H.

Where a camera file's frames come from (option ``frames``, default: the first that exists):

- ``images``: extracted beside the camera file, ``<split>/<sequence_id>/<timestamp_us>.png|jpg``;
- ``clip_video``: ``<split>/<sequence_id>.mp4`` holding exactly one frame per camera line, in order;
- ``video``: the downloaded YouTube video of the URL (``realestate10k_videos``: ``video_map`` or
  ``video_pattern``), each frame taken at its camera line's timestamp: the nearest displayed frame,
  within ``timestamp_tolerance_us`` (``video_times``), seeking rather than decoding the whole video.

Chunks (``<split>/*.torch``, ``realestate10k_chunks``) hold camera rows and JPEG frames together;
their examples are scenes ``<split>/<key>`` like camera files. Option ``form`` picks camera files,
chunks, or (``auto``) both; a sequence found in both forms, or in two chunks, fails with the reason.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from stages.ingest.base import AdapterDefaults, AdapterOptions, Capabilities, DatasetAdapter, SceneRef
from stages.ingest.realestate10k_chunks import decode_image, example_problem, list_examples, load_example
from stages.ingest.realestate10k_videos import DEFAULT_PATTERNS, VideoLocator, youtube_id

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
# RealEstate10K names a camera file after its sequence: 16 hex digits (as in the release and the
# shared sample). Such a file without the URL line is a damaged camera file (a failing scene); any
# other text file is skipped.
CAMERA_FILE_NAME = re.compile(r"[0-9a-f]{16}\.txt")
NUM_COLUMNS = 19
ROTATION_TOL = 1e-3  # the files print 9 decimals; real rotations are orthonormal to ~1e-8


@dataclass
class CameraFile:
    """A parsed camera file. ``problems`` lists (line number, reason) for everything wrong."""

    url: str
    timestamps: np.ndarray  # (T,) int64 microseconds
    line_numbers: list[int]  # 1-based line of each camera row
    intrinsics_norm: np.ndarray  # (T,4) fx/W fy/H cx/W cy/H
    distortion: np.ndarray  # (T,2)
    w2c: np.ndarray  # (T,4,4) world-to-camera, OpenCV, dataset scale
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(len(self.timestamps))

    def c2w(self) -> np.ndarray:
        return geo.invert_pose(self.w2c)


def parse_camera_text(text: str) -> CameraFile:
    """Parse a RealEstate10K camera file; never raises, records every problem with its line."""
    problems: list[tuple[int, str]] = []
    lines = text.splitlines()
    url = lines[0].strip() if lines else ""
    first_data = 1
    if not lines or not url:
        problems.append((1, "file is empty: expected the YouTube URL on line 1"))
    elif not url.lower().startswith("http"):
        problems.append((1, f"line 1 should be the video URL, found {url[:60]!r}"))
        # A headerless file: still parse line 1 as a camera line so that all problems show.
        first_data = 0 if len(url.split()) == NUM_COLUMNS else 1
    rows, line_numbers = [], []
    for idx in range(first_data, len(lines)):
        lineno = idx + 1
        s = lines[idx].strip()
        if not s:
            continue
        parts = s.split()
        if len(parts) != NUM_COLUMNS:
            problems.append((lineno, f"line {lineno}: expected {NUM_COLUMNS} values, found {len(parts)}"))
            continue
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            problems.append((lineno, f"line {lineno}: not a number in {s[:60]!r}"))
            continue
        if not np.all(np.isfinite(vals)):
            problems.append((lineno, f"line {lineno}: NaN/inf value"))
            continue
        if not parts[0].isdigit():
            problems.append((lineno, f"line {lineno}: timestamp {parts[0]!r} is not a whole number of microseconds"))
            continue
        rows.append(vals)
        line_numbers.append(lineno)
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, NUM_COLUMNS)
    ts = np.asarray([int(float(r[0])) for r in rows], dtype=np.int64)
    cam = cameras_from_rows(url, ts, arr[:, 1:], problems, line_numbers, lambda i: f"line {line_numbers[i]}")
    if not rows:
        problems.append((max(len(lines), 1), "no valid camera lines after the URL"))
    return cam


def cameras_from_rows(
    url: str,
    timestamps: np.ndarray,
    rows18: np.ndarray,
    problems: list | None = None,
    line_numbers: list[int] | None = None,
    label=lambda i: f"camera {i}",
) -> CameraFile:
    """A CameraFile from timestamps and the 18 numbers after each (a camera line, a chunk row),
    with every content problem recorded as (number, reason); ``label(i)`` names row ``i``."""
    problems = [] if problems is None else problems
    rows18 = np.asarray(rows18, dtype=np.float64).reshape(-1, NUM_COLUMNS - 1)
    ts = np.asarray(timestamps, dtype=np.int64).reshape(-1)
    numbers = line_numbers if line_numbers is not None else list(range(len(ts)))
    w2c = np.tile(np.eye(4), (len(ts), 1, 1))
    w2c[:, :3, :] = rows18[:, 6:].reshape(-1, 3, 4)
    cam = CameraFile(
        url=url,
        timestamps=ts,
        line_numbers=list(numbers),
        intrinsics_norm=rows18[:, :4].copy(),
        distortion=rows18[:, 4:6].copy(),
        w2c=w2c,
        problems=problems,
    )
    for i in range(len(ts)):
        where, num = label(i), numbers[i]
        if not np.all(np.isfinite(rows18[i])):
            problems.append((num, f"{where}: NaN/inf value"))
            continue
        if i > 0 and ts[i] <= ts[i - 1]:
            what = "repeats" if ts[i] == ts[i - 1] else "goes back from"
            problems.append((num, f"{where}: timestamp {ts[i]} {what} the previous {ts[i - 1]}"))
        if np.any(cam.intrinsics_norm[i, :2] <= 0):
            problems.append((num, f"{where}: non-positive focal length {cam.intrinsics_norm[i, :2].tolist()}"))
        if np.any(cam.distortion[i] != 0):
            problems.append(
                (
                    num,
                    f"{where}: distortion k1 k2 = {cam.distortion[i].tolist()} (the format "
                    "defines them as 0; undistortion is not supported)",
                )
            )
        err = float(geo.rotation_error(w2c[i, :3, :3]))
        if err > ROTATION_TOL:
            problems.append((num, f"{where}: rotation is not orthonormal (error {err:.2e})"))
    return cam


def intrinsics_to_pixels(k_norm: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised (fx/W, fy/H, cx/W, cy/H) to pixels for a W x H image."""
    return np.asarray(k_norm, dtype=np.float64) * np.array([width, height, width, height], dtype=np.float64)


class RealEstate10KOptions(AdapterOptions):
    """``datasets.realestate10k.options`` (docs/CONFIG.md)."""

    form: Literal["auto", "camera_files", "chunks"] = Field(
        "auto", description="camera files (<split>/<id>.txt), pixelSplat chunks (<split>/*.torch), or both"
    )
    frames: Literal["auto", "images", "clip_video", "video"] = Field(
        "auto", description="where a camera file's frames come from; auto: the first of these that exists"
    )
    video_pattern: list[str] = Field(
        list(DEFAULT_PATTERNS),
        description="where a YouTube id's video is, tried "
        "in order, relative to video_root; {video_id} {split} {sequence}",
    )
    video_map: str | None = Field(
        None,
        description="CSV 'video_id,path' or JSON {video_id: path}; relative to "
        "the dataset root, or absolute; replaces video_pattern",
    )
    video_root: str | None = Field(None, description="folder the video paths are relative to (default: root)")
    timestamp_tolerance_us: float | None = Field(
        None, gt=0, description="largest |frame time - timestamp| accepted (default: a quarter of the frame period)"
    )
    decoder: Literal["auto", "pyav", "torchcodec"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("video_pattern", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class RealEstate10KAdapter(DatasetAdapter):
    name = "realestate10k"
    version = "2"
    capabilities = Capabilities(dynamic=False, has_depth=False, has_tracks=False, real=True, metric_poses=False)
    # Real, static, camera-only: depth comes from MegaSaM (anchored by a metric prior) and
    # tracks from CoTracker. Camera files are at the video frame rate (~30 fps) with slow
    # walkthrough motion, hence a stride of 2; 49-frame clips (1 + 4k, what the trainer consumes)
    # span 97 camera lines; consecutive clips share half of them (stride 48): the scene passes
    # run each frame once however many clips use it. Pseudo-depth gets a lower weight than GT.
    defaults = AdapterDefaults(
        clip_length=49,
        frame_stride=2,
        clip_stride=48,
        repeat_weight=1.0,
        loss_weights={"depth": 0.5, "motion": 0.5, "photo": 1.0},
        depth_source="megasam",
        track_source="cotracker",
        min_depth_m=0.05,
        max_depth_m=100.0,
    )
    options_model = RealEstate10KOptions
    opts: RealEstate10KOptions
    # a scene pass's clips are read as one (load_clips): each shared frame decoded once
    union_extras = ("timestamps_us", "frame_times_us")

    # -- discovery ---------------------------------------------------------------------------
    def discover(self) -> list[SceneRef]:
        found: dict[str, list[SceneRef]] = {}
        if self.opts.form in ("auto", "camera_files"):
            for ref in self._camera_scenes():
                found.setdefault(ref.scene, []).append(ref)
        if self.opts.form in ("auto", "chunks"):
            for ref in self._chunk_scenes():
                found.setdefault(ref.scene, []).append(ref)
        out = []
        for scene in sorted(found):
            refs = found[scene]
            if len(refs) == 1:
                out.append(refs[0])
            else:  # the same sequence twice: one failing scene naming every place it is in
                places = tuple(r.extra[1] if r.extra[:1] in (("chunk",), ("bad",)) else r.scene + ".txt" for r in refs)
                out.append(SceneRef(self.name, scene, max(r.num_frames for r in refs), extra=("dup", *places)))
        return out

    def _camera_scenes(self) -> list[SceneRef]:
        out, errors = [], []
        rels = [posixpath.relpath(p, self.store.root) for p in self.store.glob("*/*.txt", errors)]
        self.listing_problems([], errors, lambda rel: None)  # a split folder that cannot be listed: ConfigError
        data = self.read_all(rels)  # concurrent requests on an object store, not two per file in turn
        for rel in rels:
            got = data[rel]
            if isinstance(got, ClipError):  # unreadable (permission, I/O): a camera file's scene fails with it
                if got.reason != "file is missing" and CAMERA_FILE_NAME.fullmatch(posixpath.basename(rel)):
                    out.append(SceneRef(self.name, rel[: -len(".txt")], 0, problem=(got.reason, got.path)))
                continue  # removed since the listing, or not a camera file
            text = got.decode("utf-8", errors="replace")  # bad bytes: read_cameras names them
            lines = text.splitlines()
            first = lines[0].strip() if lines else ""
            if not first.lower().startswith("http"):
                if CAMERA_FILE_NAME.fullmatch(posixpath.basename(rel)):  # a damaged camera file
                    why = f"line 1 should be the video URL, found {first[:60]!r}"
                    out.append(SceneRef(self.name, rel[: -len(".txt")], 0, problem=(why, self.where(rel))))
                continue  # not a camera file (README etc.)
            n = sum(1 for line in lines[1:] if line.strip())
            out.append(SceneRef(self.name, rel[: -len(".txt")], n))
        return out

    def _chunk_scenes(self) -> list[SceneRef]:
        out, errors = [], []
        found = self.store.glob("*/*.torch", errors)
        self.listing_problems([], errors, lambda rel: None)  # a split folder that cannot be listed: ConfigError
        for p in sorted(found):
            rel = posixpath.relpath(p, self.store.root)
            split = posixpath.dirname(rel)
            try:
                examples = list_examples(self.store, rel)
            except ClipError as exc:  # the whole chunk is unreadable: one failing scene names it
                stem = posixpath.basename(rel)[: -len(".torch")]
                out.append(SceneRef(self.name, f"{split}/chunk-{stem}", 0, problem=(exc.reason, self.where(rel))))
                continue
            for i, ex in enumerate(examples):
                extra = ("chunk", rel, i) if not ex.problem else ("bad", rel, ex.problem)
                out.append(SceneRef(self.name, f"{split}/{ex.key}", max(ex.num_frames, 1), extra=extra))
        return out

    # -- reading -----------------------------------------------------------------------------
    def read_cameras(self, scene: SceneRef) -> CameraFile:
        rel = scene.scene + ".txt"
        data = self.read(rel)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ClipError("camera file is not UTF-8 text", self.where(rel)) from None
        cam = parse_camera_text(text)
        if cam.problems:
            more = f" (+{len(cam.problems) - 1} more problems)" if len(cam.problems) > 1 else ""
            raise ClipError(cam.problems[0][1] + more, self.where(rel))
        if cam.num_frames != scene.num_frames:
            raise ClipError(
                f"{cam.num_frames} camera lines, expected {scene.num_frames} (file changed since discovery?)",
                self.where(rel),
            )
        return cam

    def _frame_files(self, scene: SceneRef, cam: CameraFile, frames: list[int]) -> list[str]:
        """Relative paths of the frames' images in the sequence's frame folder."""
        folder = scene.scene
        present = set(self.store.listdir(folder))
        out, missing = [], []
        for i in frames:
            ts = int(cam.timestamps[i])
            name = next((f"{ts}{ext}" for ext in IMAGE_EXTS if f"{ts}{ext}" in present), None)
            if name is None:
                missing.append(f"{ts}.png")
            out.append(posixpath.join(folder, name or f"{ts}.png"))
        if missing:
            listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ClipError(
                f"{len(missing)} of {len(frames)} frames of this clip are missing (no .png/.jpg/.jpeg "
                f"named by the timestamp): {listed}",
                self.where(posixpath.join(folder, missing[0])),
            )
        return out

    def frames_source(self, scene: SceneRef, cam: CameraFile) -> tuple[str, str | None]:
        """("images" | "clip_video" | "video", relative path or None) for a camera-file scene."""
        want = self.opts.frames
        if want in ("auto", "images") and self.store.isdir(scene.scene):
            return "images", scene.scene
        if want in ("auto", "clip_video") and self.store.exists(scene.scene + ".mp4"):
            return "clip_video", scene.scene + ".mp4"
        tried = []
        if want in ("auto", "video"):
            vid = youtube_id(cam.url)
            if vid is None:
                raise ClipError(
                    f"line 1: no YouTube video id in the URL {cam.url[:80]!r}, so its video cannot be found",
                    self.where(scene.scene + ".txt"),
                )
            split, seq = posixpath.split(scene.scene)
            rel, tried = self._videos().locate(vid, split, seq)
            if rel is not None:
                return "video", rel
        looked = {
            "images": f"the folder {posixpath.basename(scene.scene)}/ of images named <timestamp_us>.png|jpg",
            "clip_video": f"a clip video {posixpath.basename(scene.scene)}.mp4",
            "video": "the downloaded video (" + ", ".join(tried[:4]) + ")",
        }
        kinds = [k for k in looked if want in ("auto", k)]
        raise ClipError("no frames: found none of " + "; ".join(looked[k] for k in kinds), self.where(scene.scene))

    def _videos(self) -> VideoLocator:
        if not hasattr(self, "_locator"):
            self._locator = VideoLocator(self.store, self.opts.video_root, self.opts.video_map, self.opts.video_pattern)
        return self._locator

    def _video_frames(self, rel: str, cam: CameraFile, frames: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Frames at the camera lines' timestamps from the downloaded video (seeking)."""
        from stages.ingest.video_decoders import open_decoder, stored_video
        from stages.ingest.video_times import check_covers, frames_at_times

        store = self._videos().store
        where = store.display(rel)
        with (
            stored_video(store, rel) as source,
            open_decoder(source, where, backend=self.opts.decoder, device=self.opts.device) as dec,
        ):
            check_covers(dec.info, cam.timestamps[-1], where, "its camera file", self.opts.timestamp_tolerance_us)
            got = frames_at_times(
                dec, cam.timestamps[frames], tolerance_us=self.opts.timestamp_tolerance_us, what="the camera file"
            )
        return np.stack(got.frames), got.frame_times_us

    # -- chunks ----------------------------------------------------------------------------------
    def _chunk_example(self, scene: SceneRef, frames: list[int]) -> tuple[CameraFile, np.ndarray]:
        _, rel, index = scene.extra
        where = self.where(rel)
        n, ex = load_example(self.store, rel, index, frames)
        if ex is None:
            raise ClipError(f"chunk has {n} examples, expected example {index} (changed since discovery?)", where)
        problem = example_problem(ex, index)
        if problem:
            raise ClipError(problem, where)
        key = ex["key"]
        if f"{posixpath.dirname(rel)}/{key}" != scene.scene:
            raise ClipError(
                f"example {index} is {key!r}, expected {posixpath.basename(scene.scene)!r} (chunk changed "
                "since discovery?)",
                where,
            )
        ts = ex["timestamps"].numpy().astype(np.int64)
        if len(ts) != scene.num_frames:
            raise ClipError(f"example {key!r} has {len(ts)} timestamps, expected {scene.num_frames}", where)
        cam = cameras_from_rows(ex["url"], ts, ex["cameras"].double().numpy(), label=lambda i: f"{key} camera {i}")
        if cam.problems:
            more = f" (+{len(cam.problems) - 1} more problems)" if len(cam.problems) > 1 else ""
            raise ClipError(cam.problems[0][1] + more, where)
        rgb = []
        for i in frames:
            img = decode_image(ex["images"][i], where, f"example {key!r} image {i} (timestamp {ts[i]} us)")
            if rgb and img.shape != rgb[0].shape:
                raise ClipError(
                    f"example {key!r} image {i} is {img.shape[1]}x{img.shape[0]}, earlier images "
                    f"{rgb[0].shape[1]}x{rgb[0].shape[0]}",
                    where,
                )
            rgb.append(img)
        return cam, np.stack(rgb)

    # -- clip ---------------------------------------------------------------------------------------
    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        """Any list of the scene's frames (a clip, or the whole scene in one call); each needed
        frame is read or decoded once."""
        kind = scene.extra[:1]
        if kind == ("bad",):
            raise ClipError(scene.extra[2], self.where(scene.extra[1]))
        if kind == ("dup",):
            raise ClipError(
                f"sequence {posixpath.basename(scene.scene)} appears more than once: "
                f"{', '.join(scene.extra[1:])}; keep one, or choose with options.form",
                self.where(scene.scene),
            )
        self.frame_window(scene, frames)
        extra = {}
        if kind == ("chunk",):
            cam, rgb = self._chunk_example(scene, frames)
            extra["frames_from"] = "chunk"
        else:
            cam = self.read_cameras(scene)
            source, rel = self.frames_source(scene, cam)
            extra["frames_from"] = source
            if source == "images":
                rgb = []
                for f in self._frame_files(scene, cam, frames):
                    rgb.append(self.read_image(f, expect_hw=rgb[0].shape[:2] if rgb else None))
                rgb = np.stack(rgb)
            elif source == "clip_video":
                from stages.ingest.video import read_video

                rgb = read_video(
                    self.read(rel),
                    self.where(rel),
                    frames=frames,
                    expect_frames=cam.num_frames,
                    decoder=self.opts.decoder,
                    device=self.opts.device,
                )
            else:
                rgb, times = self._video_frames(rel, cam, frames)
                extra["frame_times_us"] = [int(round(t)) for t in times]
        h, w = rgb.shape[1:3]
        k = intrinsics_to_pixels(cam.intrinsics_norm[frames], w, h)
        c2w = cam.c2w()[frames]
        meta.extra.setdefault("timestamps_us", [int(cam.timestamps[i]) for i in frames])
        meta.extra.setdefault("source_url", cam.url)
        meta.extra.setdefault("pose_scale", "unknown (SLAM up to scale)")
        for key, value in extra.items():
            meta.extra.setdefault(key, value)
        return Clip(meta=meta, rgb=rgb, intrinsics=k, c2w=c2w).validate()
