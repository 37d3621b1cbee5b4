"""``d4s inspect realestate10k FILE.txt|CHUNK.torch``: check RealEstate10K files on their own.

A camera file: reads it (and, when they exist beside it, the extracted frames' headers, the clip
video, or the downloaded video of its URL under the default ``videos/`` places) and reports the
cameras in the d4s convention plus every problem found, without raising for content problems.
Poses stay in the dataset's (unknown) scale. Intrinsics are in pixels when the image size is
known, otherwise normalised (fx/W, fy/H, cx/W, cy/H) with ``intrinsics_normalized: true``.

A pixelSplat chunk: one report of the same shape per example (``scene`` = the example's key,
``image_size`` from its JPEGs, every image decoded to find corrupt ones), as a list.
"""

from __future__ import annotations

import posixpath

import numpy as np
from PIL import Image

from pipeline.clip import ClipError
from pipeline.storage import Store
from stages.ingest.realestate10k import IMAGE_EXTS, cameras_from_rows, intrinsics_to_pixels, parse_camera_text
from stages.ingest.realestate10k_chunks import decode_image, example_problem, load_chunk, read_index
from stages.ingest.realestate10k_videos import DEFAULT_PATTERNS, VideoLocator, youtube_id

JUMP_FACTOR = 20.0  # a step this many times the median step is reported as a pose jump


def _frames_beside(store: Store, stem: str, timestamps: np.ndarray, problems: list[str]):
    """Image size (W, H) from the frame folder or clip video beside the file, else None."""
    if store.isdir(stem):
        present = set(store.listdir(stem))
        sizes, missing = {}, []
        for ts in timestamps:
            name = next((f"{ts}{ext}" for ext in IMAGE_EXTS if f"{ts}{ext}" in present), None)
            if name is None:
                missing.append(f"{ts}.png")
                continue
            try:
                with store.open(posixpath.join(stem, name)) as f, Image.open(f) as im:
                    sizes.setdefault(im.size, []).append(name)
            except Exception as exc:
                problems.append(f"frame {posixpath.join(stem, name)} is unreadable ({type(exc).__name__}: {exc})")
        if missing:
            problems.append(f"{len(missing)} of {len(timestamps)} frames missing in {stem}/ (first: {missing[0]})")
        if len(sizes) > 1:
            desc = ", ".join(f"{w}x{h} ({len(v)} frames, e.g. {v[0]})" for (w, h), v in sizes.items())
            problems.append(f"frames have different sizes: {desc}")
        if sizes:
            return list(max(sizes, key=lambda s: len(sizes[s])))
        return None
    if store.exists(stem + ".mp4"):
        from stages.ingest.video import probe_video

        try:
            info = probe_video(store.read_bytes(stem + ".mp4"), store.display(stem + ".mp4"))
        except ClipError as exc:
            problems.append(str(exc))
            return None
        if info.num_frames != len(timestamps):
            problems.append(f"clip video {stem}.mp4 has {info.num_frames} frames for {len(timestamps)} camera lines")
        return [info.width, info.height]
    return None


def _downloaded_video(store: Store, split: str, seq: str, url: str, timestamps: np.ndarray, problems: list[str]):
    """Image size (W, H) of the sequence's YouTube video in the default places under the dataset
    root (the split folder's parent), after checking that it covers the camera file; else None."""
    vid = youtube_id(url)
    if vid is None or split not in ("train", "test"):
        return None
    root = Store(posixpath.dirname(store.root.rstrip("/")) or "/")
    rel, _ = VideoLocator(root, None, None, DEFAULT_PATTERNS).locate(vid, split, seq)
    if rel is None:
        return None
    from stages.ingest.video_decoders import open_decoder
    from stages.ingest.video_times import check_covers

    try:
        with open_decoder(root.path(rel), root.display(rel), backend="pyav", device="cpu") as dec:
            check_covers(dec.info, float(timestamps[-1]), root.display(rel), "its camera file")
            return [dec.info.width, dec.info.height]
    except ClipError as exc:
        problems.append(str(exc))
    return None


def inspect_camera_file(path: str) -> dict:
    """Read one RealEstate10K ``<sequence_id>.txt`` and report cameras and problems."""
    path = str(path)
    parent, name = posixpath.split(path.replace("\\", "/"))
    store = Store(parent or ".")
    try:
        text = store.read_bytes(name).decode("utf-8")
    except FileNotFoundError:
        raise ClipError("file is missing", store.display(name)) from None
    except UnicodeDecodeError:
        raise ClipError("camera file is not UTF-8 text", store.display(name)) from None
    cam = parse_camera_text(text)
    problems = [reason for _, reason in cam.problems]
    stem = name[:-4] if name.endswith(".txt") else name
    split = posixpath.basename(store.root.rstrip("/"))
    scene = f"{split}/{stem}" if split in ("train", "test") else stem
    image_size = None
    if cam.num_frames:
        image_size = _frames_beside(store, stem, cam.timestamps, problems) or _downloaded_video(
            store, split, stem, cam.url, cam.timestamps, problems
        )
    return camera_report(cam, scene, image_size, problems, store.display(name))


def camera_report(cam, scene: str, image_size, problems: list[str], scene_path: str) -> dict:
    """The inspect report of one sequence's cameras (a camera file or a chunk example)."""
    c2w = cam.c2w()
    if image_size is not None:
        intr = intrinsics_to_pixels(cam.intrinsics_norm, image_size[0], image_size[1])
        aspect = image_size[0] / image_size[1]
        # Square pixels: fx/W * W == fy/H * H.
        ratio = intr[:, 0] / intr[:, 1]
        if cam.num_frames and np.any(np.abs(ratio - 1.0) > 0.02):
            problems.append(
                f"fx/fy = {float(np.median(ratio)):.3f} for {image_size[0]}x{image_size[1]} frames: "
                "frames do not have the aspect the camera file implies"
            )
    else:
        intr = cam.intrinsics_norm
        aspect = None
    steps = np.linalg.norm(np.diff(c2w[:, :3, 3], axis=0), axis=1) if cam.num_frames > 1 else np.zeros(0)
    if len(steps) >= 3:
        med = float(np.median(steps))
        for j in np.flatnonzero(steps > JUMP_FACTOR * max(med, 1e-9)):
            problems.append(
                f"line {cam.line_numbers[j + 1]}: camera jumps {steps[j]:.3g} units "
                f"({steps[j] / max(med, 1e-12):.0f}x the median step)"
            )
    implied = (cam.intrinsics_norm[:, 1] / cam.intrinsics_norm[:, 0]) if cam.num_frames else np.zeros(0)
    return {
        "dataset": "realestate10k",
        "scene": scene,
        "num_frames": cam.num_frames,
        "url": cam.url,
        "timestamps_us": [int(t) for t in cam.timestamps],
        "c2w": c2w.tolist(),
        "intrinsics": np.asarray(intr, dtype=np.float64).tolist(),
        "intrinsics_normalized": image_size is None,
        "image_size": image_size,
        "image_aspect": aspect,
        # W/H that square pixels imply: (fy/H) / (fx/W).
        "implied_aspect": float(np.median(implied)) if len(implied) else None,
        "path_length": float(steps.sum()),
        "pose_units": "dataset (SLAM, up to scale)",
        "has_depth": False,
        "has_tracks": False,
        "problems": problems,
        "scene_path": scene_path,
    }


def inspect_chunk(path: str) -> list[dict]:
    """One report per example of a pixelSplat chunk (``<split>/<NNNNNN>.torch``)."""
    parent, name = posixpath.split(str(path).replace("\\", "/"))
    store = Store(parent or ".")
    where = store.display(name)
    chunk = load_chunk(store, name)  # raises ClipError for a missing, unreadable or refused file
    split = posixpath.basename(store.root.rstrip("/"))
    index = read_index(store, "")
    reports = []
    for i, ex in enumerate(chunk):
        problem = example_problem(ex, i)
        if problem:
            key = ex.get("key") if isinstance(ex, dict) and isinstance(ex.get("key"), str) else f"example{i:04d}"
            reports.append(
                {
                    "dataset": "realestate10k",
                    "scene": key,
                    "num_frames": 0,
                    "problems": [problem],
                    "scene_path": f"{where}[{i}]",
                    "image_size": None,
                }
            )
            continue
        key = ex["key"]
        cam = cameras_from_rows(
            ex["url"],
            ex["timestamps"].numpy(),
            ex["cameras"].double().numpy(),
            label=lambda j, key=key: f"{key} camera {j}",
        )
        problems = [reason for _, reason in cam.problems]
        sizes: dict[tuple, list[int]] = {}
        for j, data in enumerate(ex["images"]):
            try:
                img = decode_image(data, where, f"image {j} (timestamp {int(cam.timestamps[j])} us)")
                sizes.setdefault((img.shape[1], img.shape[0]), []).append(j)
            except ClipError as exc:
                problems.append(exc.reason)
        if len(sizes) > 1:
            problems.append(
                "images have different sizes: "
                + ", ".join(f"{w}x{h} ({len(v)} images, e.g. {v[0]})" for (w, h), v in sizes.items())
            )
        if index is not None and index.get(key) != name:
            problems.append(f"index.json maps {key} to {index.get(key)!r}, not {name}")
        size = list(max(sizes, key=lambda s: len(sizes[s]))) if sizes else None
        scene = f"{split}/{key}" if split in ("train", "test") else key
        rep = camera_report(cam, scene, size, problems, f"{where}[{i}]")
        rep["scene"] = key
        reports.append(rep)
    return reports
