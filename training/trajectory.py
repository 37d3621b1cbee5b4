"""Camera paths for ``d4s generate``: files, a build's clip, or named presets; checked and made relative.

A trajectory is T cameras (pixel intrinsics fx fy cx cy for a given image size, OpenCV camera-to-world
4x4) expressed in its first camera's frame, which is the frame the model works in (the training loader
does the same). Sources:

* a RealEstate10K camera file (``.txt``: URL line, then ``timestamp fx fy cx cy k1 k2`` and a row-major
  3x4 world-to-camera per line, intrinsics normalised by the image size; parsed by
  :func:`stages.ingest.realestate10k.parse_camera_text`). Its poses have an unknown scale, so the
  generated scene's metres are the file's units;
* ``.json``: ``{"c2w": [T x 4x4], "intrinsics": [T x [fx,fy,cx,cy]] (optional), "width", "height"
  (the image size the pixel intrinsics are for; without them they are taken as normalised)}``;
* ``.npz``: arrays ``c2w`` (T,4,4) and optionally ``intrinsics`` (T,4), read without unpickling;
* a clip of a build (``--trajectory OUT --clip KEY``): its cameras and intrinsics, metric;
* a preset ``orbit[:R]``, ``dolly[:D]``, ``pan[:D]`` (metres): ``dolly`` moves D forward, ``pan`` D to
  the right (camera x), both looking ahead; ``orbit`` swings the camera 30 degrees about a point R ahead of
  it, looking at that point. Presets use ``--fov`` (60 degrees) for the intrinsics.

A path with more cameras than the frames to generate is subsampled evenly (first and last kept); fewer
is an error. Rows with non-finite numbers, non-positive focal lengths or rotations that are not
rotations are errors naming the row (the line, for a RealEstate10K file).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from pipeline import geometry as geo

PRESET = re.compile(r"^(orbit|dolly|pan)(?::([0-9]*\.?[0-9]+))?$")
PRESET_DEFAULT_M = {"orbit": 1.0, "dolly": 0.5, "pan": 0.5}
ORBIT_SWEEP_DEG = 30.0
ROTATION_TOL = 1e-3


class TrajectoryError(ValueError):
    """A camera path that cannot be used; the message names the file and row."""


@dataclass
class Trajectory:
    intrinsics: np.ndarray  # (T,4) pixels for an image of ``size``
    c2w: np.ndarray  # (T,4,4) in the first camera's frame
    size: tuple[int, int]  # (width, height) the intrinsics are for
    source: str


def preset(name: str, frames: int, size: int, fov_deg: float = 60.0) -> Trajectory:
    """``orbit[:R]`` / ``dolly[:D]`` / ``pan[:D]`` with ``frames`` cameras for a ``size`` x ``size`` image."""
    m = PRESET.match(name)
    if not m:
        raise TrajectoryError(f"unknown trajectory preset {name!r}: orbit[:R], dolly[:D] or pan[:D] (metres)")
    kind, scale = m.group(1), float(m.group(2) or PRESET_DEFAULT_M[m.group(1)])
    if scale <= 0:
        raise TrajectoryError(f"{name}: the scale must be positive metres")
    s = np.linspace(0.0, 1.0, frames)
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    if kind == "dolly":
        c2w[:, 2, 3] = s * scale
    elif kind == "pan":
        c2w[:, 0, 3] = s * scale
    else:
        centre = np.array([0.0, 0.0, scale])
        for i, a in enumerate(np.deg2rad(ORBIT_SWEEP_DEG) * s):
            eye = centre + scale * np.array([-math.sin(a), 0.0, -math.cos(a)])
            c2w[i] = geo.look_at_c2w(eye, centre, up=(0.0, -1.0, 0.0))
    f = geo.fov_to_focal(math.radians(fov_deg), size)
    intr = np.tile([f, f, size / 2.0, size / 2.0], (frames, 1)).astype(np.float64)
    return Trajectory(intr, c2w, (size, size), f"preset {kind} {scale:g} m, fov {fov_deg:g} deg")


def _check_rows(c2w: np.ndarray, intr: np.ndarray | None, where: str) -> None:
    for i in range(len(c2w)):
        if not np.all(np.isfinite(c2w[i])):
            raise TrajectoryError(f"{where}: camera {i}: non-finite pose")
        if float(geo.rotation_error(c2w[i, :3, :3])) > ROTATION_TOL:
            raise TrajectoryError(f"{where}: camera {i}: the rotation is not a rotation (orthonormal, det 1)")
        if not np.allclose(c2w[i, 3], [0, 0, 0, 1]):
            raise TrajectoryError(f"{where}: camera {i}: the last row of a 4x4 pose must be 0 0 0 1")
        if intr is not None and (not np.all(np.isfinite(intr[i])) or np.any(intr[i, :2] <= 0)):
            raise TrajectoryError(
                f"{where}: camera {i}: intrinsics {intr[i].tolist()} are not finite with positive focal lengths"
            )


def from_arrays(
    c2w, intr, size: tuple[int, int] | None, image_size: tuple[int, int], where: str, fov_deg: float
) -> Trajectory:
    """Arrays (pixel intrinsics for ``size``, normalised when ``size`` is None) -> a Trajectory for the image."""
    try:
        c2w = np.asarray(c2w, dtype=np.float64)
        intr = None if intr is None else np.asarray(intr, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TrajectoryError(f"{where}: c2w and intrinsics must be arrays of numbers ({exc})") from None
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or len(c2w) == 0:
        raise TrajectoryError(f"{where}: c2w must be T x 4 x 4, got shape {c2w.shape}")
    if intr is not None and intr.shape != (len(c2w), 4):
        raise TrajectoryError(f"{where}: intrinsics must be {len(c2w)} x 4 (fx fy cx cy), got shape {intr.shape}")
    _check_rows(c2w, intr, where)
    w, h = image_size
    if intr is None:
        f = geo.fov_to_focal(math.radians(fov_deg), w)
        intr = np.tile([f, f, w / 2.0, h / 2.0], (len(c2w), 1))
    elif size is None:
        intr = intr * np.array([w, h, w, h], dtype=np.float64)
    else:
        intr = intr * np.array([w / size[0], h / size[1], w / size[0], h / size[1]], dtype=np.float64)
    return Trajectory(intr, c2w, (w, h), where)


def load(
    spec: str, frames: int, image_size: tuple[int, int], out_size: int, fov_deg: float = 60.0, clip: str | None = None
) -> Trajectory:
    """Any source (module docs) -> a Trajectory of ``frames`` cameras relative to the first.

    ``image_size``: the (width, height) of the input image, which file intrinsics refer to; presets are
    made for the ``out_size`` square directly.
    """
    if clip is not None:
        traj = _from_build(spec, clip, image_size)
    elif PRESET.match(spec) or (not os.path.exists(spec) and spec.split(":")[0] in PRESET_DEFAULT_M):
        return relative(preset(spec, frames, out_size, fov_deg), frames)
    elif os.path.isdir(spec):
        raise TrajectoryError(
            f"{spec}: a folder; to follow the cameras of a clip of a build output give --clip KEY "
            "(else give a camera file or a preset: orbit[:R], dolly[:D], pan[:D])"
        )
    elif not os.path.isfile(spec):
        raise TrajectoryError(f"{spec}: no such trajectory file, and not a preset (orbit[:R], dolly[:D], pan[:D])")
    elif spec.endswith(".txt"):
        traj = _from_re10k(spec, image_size)
    elif spec.endswith(".json"):
        try:
            with open(spec) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TrajectoryError(f"{spec}: not JSON ({exc})") from None
        if not isinstance(d, dict) or "c2w" not in d:
            raise TrajectoryError(
                f"{spec}: expected an object with 'c2w' (and optionally 'intrinsics', 'width', 'height')"
            )
        traj = from_arrays(d["c2w"], d.get("intrinsics"), _json_size(d, spec), image_size, spec, fov_deg)
    elif spec.endswith(".npz"):
        try:
            with np.load(spec, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as exc:
            raise TrajectoryError(f"{spec}: not a readable npz of plain arrays ({exc})") from None
        if "c2w" not in arrays:
            raise TrajectoryError(f"{spec}: no 'c2w' array (has {sorted(arrays)})")
        traj = from_arrays(
            arrays["c2w"],
            arrays.get("intrinsics"),
            image_size if "intrinsics" in arrays else None,
            image_size,
            spec,
            fov_deg,
        )
    else:
        raise TrajectoryError(f"{spec}: unknown trajectory file type (.txt RealEstate10K, .json, .npz)")
    return relative(traj, frames)


def _json_size(d: dict, spec: str) -> tuple[int, int] | None:
    """A JSON trajectory's (width, height), both positive whole numbers; None without either."""
    if "width" not in d and "height" not in d:
        return None
    for k in ("width", "height"):
        if k not in d:
            raise TrajectoryError(f"{spec}: 'width' and 'height' go together (the image size of the intrinsics)")
        v = d[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 1:
            raise TrajectoryError(f"{spec}: '{k}' must be a whole number of pixels >= 1, got {v!r}")
    return int(d["width"]), int(d["height"])


def _from_re10k(path: str, image_size: tuple[int, int]) -> Trajectory:
    from stages.ingest.realestate10k import parse_camera_text

    with open(path, encoding="utf-8", errors="replace") as f:
        cam = parse_camera_text(f.read())
    if cam.problems:
        shown = "; ".join(reason for _, reason in cam.problems[:3])
        more = f" (and {len(cam.problems) - 3} more)" if len(cam.problems) > 3 else ""
        raise TrajectoryError(f"{path}: bad RealEstate10K camera file: {shown}{more}")
    w, h = image_size
    intr = cam.intrinsics_norm * np.array([w, h, w, h], dtype=np.float64)
    return Trajectory(intr, cam.c2w(), (w, h), f"{path} (RealEstate10K, unknown scale)")


def _from_build(output: str, key: str, image_size: tuple[int, int]) -> Trajectory:
    from pipeline.sample_format import decode_sample
    from pipeline.show import ShowError, load_clip_sample

    try:
        sample, _ = load_clip_sample(output, key)
    except (ShowError, FileNotFoundError) as exc:
        raise TrajectoryError(str(exc)) from None
    c = decode_sample(sample)
    h, w = c.rgb.shape[1:3]
    return from_arrays(c.c2w, c.intrinsics, (w, h), image_size, f"{output} clip {key}", 60.0)


def relative(traj: Trajectory, frames: int) -> Trajectory:
    """``frames`` cameras evenly taken from the path (first and last kept), in the first camera's frame."""
    n = len(traj.c2w)
    if n < frames:
        raise TrajectoryError(
            f"{traj.source}: {n} cameras, fewer than the {frames} frames to generate (give --frames of at most {n})"
        )
    idx = np.round(np.linspace(0, n - 1, frames)).astype(int)
    c2w = np.linalg.inv(traj.c2w[idx[0]])[None] @ traj.c2w[idx]
    return Trajectory(traj.intrinsics[idx], c2w, traj.size, traj.source)


def crop_resize_intrinsics(intr: np.ndarray, size: tuple[int, int], out: int) -> np.ndarray:
    """Intrinsics for the centre square crop of a ``size`` image resized to ``out`` (the loader's crop)."""
    w, h = size
    side = min(w, h)
    k = intr.astype(np.float64).copy()
    k[:, 2] -= (w - side) // 2
    k[:, 3] -= (h - side) // 2
    return k * (out / side)
