"""RealEstate10K: ``{train,test}/<sequence_id>.txt`` camera files plus user-extracted frames.

Facts (``../shared/datasets/FORMATS.md`` §8; sources in docs/datasets/realestate10k.md): each
camera file has the YouTube URL on line 1, then one line per frame of 19 numbers::

    timestamp_us fx fy cx cy k1 k2 r11 r12 r13 t1 r21 r22 r23 t2 r31 r32 r33 t3

with fx, cx divided by the image width and fy, cy by the image height, k1 = k2 = 0, and the last
12 numbers a row-major 3x4 world-to-camera matrix with OpenCV camera axes. Poses come from
SLAM + bundle adjustment and are known only up to one unknown scale per sequence, so d4s keeps
them in the dataset's units (``capabilities.metric_poses = False``): c2w = inverse([R|t; 0 0 0 1]).
Pixel intrinsics for the stored frames (W x H) are fx*W, fy*H, cx*W, cy*H.

Frames are not distributed. d4s expects them extracted beside the camera file, one image per
camera line named by its timestamp: ``<split>/<sequence_id>/<timestamp_us>.png`` (or ``.jpg``).
A clip with missing frames fails with a ClipError naming the first missing file and listing how
many are missing. Alternatively a clip video ``<split>/<sequence_id>.mp4`` holding exactly one
frame per camera line, in order, is used when no frame folder exists.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import numpy as np

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from stages.ingest.base import AdapterDefaults, Capabilities, DatasetAdapter, SceneRef

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
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
    w2c = np.tile(np.eye(4), (len(rows), 1, 1))
    w2c[:, :3, :] = arr[:, 7:].reshape(-1, 3, 4)
    cam = CameraFile(url=url, timestamps=ts, line_numbers=line_numbers, intrinsics_norm=arr[:, 1:5].copy(),
                     distortion=arr[:, 5:7].copy(), w2c=w2c, problems=problems)
    if not rows:
        problems.append((max(len(lines), 1), "no valid camera lines after the URL"))
    for i in range(len(rows)):
        lineno = line_numbers[i]
        if i > 0 and ts[i] <= ts[i - 1]:
            what = "repeats" if ts[i] == ts[i - 1] else "goes back from"
            problems.append((lineno, f"line {lineno}: timestamp {ts[i]} {what} the previous {ts[i - 1]}"))
        if np.any(cam.intrinsics_norm[i, :2] <= 0):
            problems.append((lineno, f"line {lineno}: non-positive focal length {cam.intrinsics_norm[i, :2].tolist()}"))
        if np.any(cam.distortion[i] != 0):
            problems.append((lineno, f"line {lineno}: distortion k1 k2 = {cam.distortion[i].tolist()} (the format "
                                     "defines them as 0; undistortion is not supported)"))
        err = float(geo.rotation_error(w2c[i, :3, :3]))
        if err > ROTATION_TOL:
            problems.append((lineno, f"line {lineno}: rotation is not orthonormal (error {err:.2e})"))
    return cam


def intrinsics_to_pixels(k_norm: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised (fx/W, fy/H, cx/W, cy/H) to pixels for a W x H image."""
    return np.asarray(k_norm, dtype=np.float64) * np.array([width, height, width, height], dtype=np.float64)


class RealEstate10KAdapter(DatasetAdapter):
    name = "realestate10k"
    version = "1"
    capabilities = Capabilities(dynamic=False, has_depth=False, has_tracks=False, real=True, metric_poses=False)
    # Real, static, camera-only: depth comes from MegaSaM (anchored by a metric prior) and
    # tracks from CoTracker. Camera files are at the video frame rate (~30 fps) with slow
    # walkthrough motion, hence a stride of 2; 49-frame clips (1 + 4k, what the trainer consumes)
    # span 97 camera lines; consecutive clips share half of them (stride 48): the scene passes
    # run each frame once however many clips use it. Pseudo-depth gets a lower weight than GT.
    defaults = AdapterDefaults(clip_length=49, frame_stride=2, clip_stride=48, repeat_weight=1.0,
                               loss_weights={"depth": 0.5, "motion": 0.5, "photo": 1.0},
                               depth_source="megasam", track_source="cotracker",
                               min_depth_m=0.05, max_depth_m=100.0)

    def discover(self) -> list[SceneRef]:
        scenes = []
        for p in self.store.fs.glob(self.store.path("*/*.txt")):
            rel = posixpath.relpath(p, self.store.root)
            try:
                text = self.store.read_text(rel)
            except (OSError, UnicodeDecodeError):
                continue
            lines = text.splitlines()
            if not lines or not lines[0].strip().lower().startswith("http"):
                continue  # not a camera file (README etc.)
            n = sum(1 for line in lines[1:] if line.strip())
            scenes.append(SceneRef(self.name, rel[: -len(".txt")], n))
        return sorted(set(scenes), key=lambda s: s.scene)

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
            raise ClipError(f"{cam.num_frames} camera lines, expected {scene.num_frames} (file changed since "
                            "discovery?)", self.where(rel))
        return cam

    def _frame_files(self, scene: SceneRef, cam: CameraFile, frames: list[int]) -> list[str] | None:
        """Relative paths of the frames' images, or None when there is no frame folder."""
        folder = scene.scene
        if not self.store.isdir(folder):
            return None
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
            raise ClipError(f"{len(missing)} of {len(frames)} frames of this clip are missing (no .png/.jpg/.jpeg "
                            f"named by the timestamp): {listed}",
                            self.where(posixpath.join(folder, missing[0])))
        return out

    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        self.frame_window(scene, frames)
        cam = self.read_cameras(scene)
        files = self._frame_files(scene, cam, frames)
        if files is not None:
            rgb = []
            for rel in files:
                rgb.append(self.read_image(rel, expect_hw=rgb[0].shape[:2] if rgb else None))
            rgb = np.stack(rgb)
        else:
            video_rel = scene.scene + ".mp4"
            if not self.store.exists(video_rel):
                raise ClipError(f"no frames: neither the folder {posixpath.basename(scene.scene)}/ of images named "
                                "<timestamp_us>.png|jpg nor a clip video exists beside the camera file",
                                self.where(scene.scene))
            from stages.ingest.video import read_video

            rgb = read_video(self.read(video_rel), self.where(video_rel), frames=frames,
                             expect_frames=cam.num_frames)
        h, w = rgb.shape[1:3]
        k = intrinsics_to_pixels(cam.intrinsics_norm[frames], w, h)
        c2w = cam.c2w()[frames]
        meta.extra.setdefault("timestamps_us", [int(cam.timestamps[i]) for i in frames])
        meta.extra.setdefault("source_url", cam.url)
        meta.extra.setdefault("pose_scale", "unknown (SLAM up to scale)")
        return Clip(meta=meta, rgb=rgb, intrinsics=k, c2w=c2w).validate()
