"""Capacity model behind ``d4s plan``: scenes, clips, output bytes and GPU-hours before a build.

``capacity_report(cfg)`` plans the config with the real planner (:func:`pipeline.plan.make_plan`,
so the scene and clip counts are exactly what ``d4s build`` would plan), reads the first planned
clip of every dataset to learn its image size (and its ground-truth track count), and turns the
counts into projected costs with the measured per-frame figures of ``capacity_costs.yaml``
(every figure there names the benchmark, machine and RESULTS section it comes from; the few
that are assumptions say so and are listed in the report).

How each cost is modelled (docs/CLUSTER.md, "Capacity planning", has the derivation):

* **depth** (Video Depth Anything, datasets whose ``depth_source`` is not ``gt``): the measured
  whole-video frames/s at 518x518 is split into a per-distinct-frame part (encoder) and a
  per-window-frame part (temporal head) in the proportion of the measured profile; a pass of T
  frames costs ``a*T + b*32*windows(T)`` (short passes still fill a 32-frame window) and both parts
  scale with the network input pixels (:func:`stages.depth.vda.infer.network_size` of the
  image size and ``input_size``) to the power fitted through the two measured resolutions.
* **tracks** (CoTracker3, ``track_source: cotracker``): cost proportional to point-frames
  (``len(query_frames) * grid_size**2`` points x T frames, twice for the offline model's backward
  pass) at the measured point-frames/s. The model always resizes to 384x512, so the image size
  does not enter.
  A pass is a scene's frame sequence with scene passes (``pipeline/stage_routes.py``; each
  segment of a long scene), else a clip.
* **megasam** (``depth_source: megasam``): GPU-seconds per frame of its passes; *not measured* in
  this project. Its cache in the output store is counted at its bound
  (:func:`stages.align.megasam.cache_entry_bytes`: 2 bytes per cached depth pixel, 136 per frame).
* **CPU** (ingest, encode, write per frame, scaled linearly with the stored pixels; align per
  frame for depth-model datasets).
* **output bytes**: JPEG and depth-PNG bytes per pixel measured at several sizes (interpolated
  log-log, constant beyond the largest measured size), plus tracks (13 bytes per point-frame),
  cameras, meta and tar headers.

``projection_from_counts`` applies the same model to a table of scene and frame counts instead
of data on disk (the full-build figures in docs/CLUSTER.md come from :data:`FULL_BUILD_COUNTS`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import BuildConfig, ConfigError

COSTS_PATH = Path(__file__).with_name("capacity_costs.yaml")
GPU_STAGES = ("depth", "tracks", "megasam")
CPU_STAGES = ("ingest", "encode", "write", "align")


class CostsError(ConfigError):
    """A costs file that is missing a field or holds a bad value (printed as one line by the CLI)."""


# ------------------------------------------------------------------------------------------
# The costs file


class Costs:
    """A validated costs file; ``assumed`` collects the notes of unmeasured figures that were used."""

    def __init__(self, raw: Any, source: str):
        self.source = source
        if not isinstance(raw, dict):
            raise CostsError(f"costs file {source}: expected a YAML mapping at the top level")
        self.raw = raw
        self.used_notes: list[str] = []
        self._validating = True
        # Fields every report needs, checked up front so a bad file fails before any planning.
        self.hw("depth.reference_hw")
        self.pos("depth.reference_video_frames")
        self.table("depth.frames_per_s")
        for k in ("encoder_s", "encoder_frames", "temporal_s", "temporal_window_frames"):
            self.pos(f"depth.window_split.{k}")
        pts = self.get("depth.resolution_points")
        if not isinstance(pts, list) or len(pts) < 2:
            self._bad("depth.resolution_points", "must be a list of at least two {hw, frames_per_s} points")
        for i in range(len(pts)):
            self.hw(f"depth.resolution_points.{i}.hw")
            self.pos(f"depth.resolution_points.{i}.frames_per_s")
        self.table("tracks.point_frames_per_s")
        self.pos("megasam.gpu_s_per_frame")
        self.hw("cpu.reference_hw")
        for k in ("ingest", "encode", "write"):
            self.pos(f"cpu.ms_per_frame.{k}", zero_ok=True)
        self.pos("cpu.align_ms_per_frame", zero_ok=True)
        for k in ("rgb_bytes_per_pixel", "depth_bytes_per_pixel"):
            self.curve(f"output.{k}")
        for k in ("track_bytes_per_point_frame", "meta_bytes_per_clip", "tar_bytes_per_entry", "tar_bytes_per_shard"):
            self.pos(f"output.{k}", zero_ok=True)
        self.pos("output.jpeg_quality")
        if not isinstance(self.get("datasets"), dict):
            self._bad("datasets", "must map dataset names to {hw, gt_tracks}")
        self._validating = False

    # -- access with clear errors -----------------------------------------------------------
    def _bad(self, path: str, what: str):
        raise CostsError(f"costs file {self.source}: field '{path}' {what}")

    def get(self, path: str, required: bool = True) -> Any:
        node: Any = self.raw
        for part in path.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                if required:
                    self._bad(path, "is missing")
                return None
        return node

    def pos(self, path: str, zero_ok: bool = False, required: bool = True) -> float | None:
        """A positive number; a leaf may also be ``{value: x, assumed: "why"}`` (an unmeasured figure)."""
        v = self.get(path, required)
        if v is None and not required:
            return None
        note = None
        if isinstance(v, dict):
            if "value" not in v:
                self._bad(path, "is a mapping without 'value'")
            note = v.get("assumed")
            v = v["value"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
            self._bad(path, f"must be a {'non-negative' if zero_ok else 'positive'} number, got {v!r}")
        if note and not self._validating:
            msg = f"{path} = {v:g} is an assumption, not a measurement: {note}"
            if msg not in self.used_notes:
                self.used_notes.append(msg)
        return float(v)

    def hw(self, path: str) -> tuple[int, int]:
        v = self.get(path)
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
            self._bad(path, f"must be [height, width] in pixels, got {v!r}")
        return int(v[0]), int(v[1])

    def table(self, path: str) -> dict:
        v = self.get(path)
        if not isinstance(v, dict) or not v:
            self._bad(path, "must be a non-empty mapping")
        return v

    def curve(self, path: str) -> list[tuple[float, float]]:
        v = self.get(path)
        if not isinstance(v, list) or not v:
            self._bad(path, "must be a list of [pixels, bytes_per_pixel] points")
        out = []
        for i, p in enumerate(v):
            if not (isinstance(p, list) and len(p) == 2):
                self._bad(f"{path}.{i}", f"must be [pixels, bytes_per_pixel], got {p!r}")
            out.append((self.pos(f"{path}.{i}.0"), self.pos(f"{path}.{i}.1")))
        return sorted(out)


def load_costs(costs: str | Path | dict | None = None) -> Costs:
    """The costs file (default: ``pipeline/capacity_costs.yaml``), a path to another, or a dict."""
    if isinstance(costs, dict):
        return Costs(costs, "<dict>")
    path = Path(costs) if costs is not None else COSTS_PATH
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CostsError(f"costs file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise CostsError(f"costs file {path} is not valid YAML: {exc}") from None
    return Costs(raw, str(path))


# ------------------------------------------------------------------------------------------
# Per-clip cost models


def vda_seconds_per_clip(num_frames: int, image_hw: tuple[int, int], depth_cfg, costs: Costs) -> float:
    """GPU seconds of Video Depth Anything for one clip (one H100, see the module docstring)."""
    from stages.depth.vda.infer import INFER_LEN, network_size, num_windows

    enc, dt = depth_cfg.encoder, depth_cfg.dtype
    fps = None
    if depth_cfg.compile:
        fps = costs.pos(f"depth.frames_per_s_compiled.{enc}.{dt}", required=False)
        if fps is None:
            note = (f"no torch.compile figure for {enc}/{dt} in the costs file: the uncompiled figure is used "
                    f"(conservative)")
            if note not in costs.used_notes:
                costs.used_notes.append(note)
    if fps is None:
        fps = costs.pos(f"depth.frames_per_s.{enc}.{dt}")
    ws = "depth.window_split."
    per_enc = costs.pos(ws + "encoder_s") / costs.pos(ws + "encoder_frames")
    per_tmp = costs.pos(ws + "temporal_s") / costs.pos(ws + "temporal_window_frames")
    ratio = per_enc / per_tmp
    ref_frames = int(costs.pos("depth.reference_video_frames"))
    ref_window_frames = INFER_LEN * num_windows(ref_frames)
    b = (ref_frames / fps) / (ratio * ref_frames + ref_window_frames)  # s per window frame at the reference size
    a = ratio * b  # s per distinct frame
    rh, rw = costs.hw("depth.reference_hw")
    h, w = network_size(int(image_hw[0]), int(image_hw[1]), depth_cfg.input_size)
    scale = (h * w / (rh * rw)) ** vda_pixel_exponent(costs)
    return scale * (a * num_frames + b * INFER_LEN * num_windows(num_frames))


def vda_pixel_exponent(costs: Costs) -> float:
    """Exponent of VDA time vs network pixels, fitted through the two most distant measured sizes."""
    pts = sorted((costs.hw(f"depth.resolution_points.{i}.hw"), costs.pos(f"depth.resolution_points.{i}.frames_per_s"))
                 for i in range(len(costs.get("depth.resolution_points"))))
    (h0, w0), f0 = pts[0]
    (h1, w1), f1 = pts[-1]
    if h0 * w0 == h1 * w1:
        raise CostsError(f"costs file {costs.source}: field 'depth.resolution_points' needs two different sizes")
    return math.log(f0 / f1) / math.log((h1 * w1) / (h0 * w0))


def cotracker_seconds_per_clip(num_frames: int, track_cfg, costs: Costs) -> tuple[float, int]:
    """(GPU seconds, tracks per clip) of CoTracker3 for one clip: proportional to point-frames."""
    from stages.tracks.cotracker.runner import resolve_query_frames

    qf = resolve_query_frames(track_cfg.query_frames, num_frames)
    points = len(qf) * track_cfg.grid_size ** 2
    passes = 2 if (track_cfg.variant == "offline" and max(qf) > 0) else 1  # offline: backward pass for later query frames
    rate = costs.pos(f"tracks.point_frames_per_s.{track_cfg.variant}.{track_cfg.dtype}")
    return passes * points * num_frames / rate, points


def bytes_per_pixel(curve: list[tuple[float, float]], pixels: float) -> float:
    """Log-log interpolation between measured sizes; the end values outside them."""
    if pixels <= curve[0][0]:
        return curve[0][1]
    if pixels >= curve[-1][0]:
        return curve[-1][1]
    for (p0, b0), (p1, b1) in zip(curve, curve[1:]):
        if p0 <= pixels <= p1:
            t = math.log(pixels / p0) / math.log(p1 / p0) if p1 > p0 else 0.0
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return curve[-1][1]  # pragma: no cover


def clip_bytes(num_frames: int, image_hw: tuple[int, int], num_tracks: int, costs: Costs, with_depth: bool = True) -> float:
    """Projected bytes of one shard sample (docs/FORMAT.md entries, tar headers included)."""
    px = float(image_hw[0] * image_hw[1])
    o = "output."
    per_frame = bytes_per_pixel(costs.curve(o + "rgb_bytes_per_pixel"), px) * px
    entries = num_frames + 3  # rgb.NNN.jpg, intrinsics.npy, c2w.npy, meta.json
    if with_depth:
        per_frame += bytes_per_pixel(costs.curve(o + "depth_bytes_per_pixel"), px) * px
        entries += num_frames
    npy_header = 128
    fixed = (npy_header + 32 * num_frames) + (npy_header + 128 * num_frames) + costs.pos(o + "meta_bytes_per_clip", zero_ok=True)
    tracks = 0.0
    if num_tracks:
        tracks = num_tracks * num_frames * costs.pos(o + "track_bytes_per_point_frame", zero_ok=True) + 2 * npy_header
        entries += 2
    return num_frames * per_frame + fixed + tracks + entries * costs.pos(o + "tar_bytes_per_entry", zero_ok=True)


# ------------------------------------------------------------------------------------------
# Rows


def model_stages(cfg: BuildConfig, name: str) -> list[str]:
    """Model stages of a (resolved) dataset: read from the stage declarations (pipeline/stage_routes.py)."""
    from pipeline.stage_routes import model_stages as declared

    return declared(cfg, name)


def pass_frames(cfg: BuildConfig, name: str, scene_clip_frames: list[list[list[int]]]) -> list[int]:
    """Frames of each model pass (the depth model's, MegaSaM's) over a dataset's scenes, given each
    scene's clips' frame lists: the union per scene with scene passes, else every clip's own."""
    from pipeline.stage_routes import step

    depth = step(cfg, name, "depth")
    if depth is not None and depth.granularity == "scene":
        return [len(set().union(*map(set, clips))) for clips in scene_clip_frames if clips]
    return [len(f) for clips in scene_clip_frames for f in clips]


def _segment_lengths(n: int, cfg: BuildConfig) -> list[int]:
    from stages.scene.segments import plan_segments

    sc = cfg.stages.scene
    return [b - a for a, b in plan_segments(n, sc.max_frames, sc.overlap_frames)]


def _nominal(costs: Costs, name: str) -> tuple[tuple[int, int], int, str]:
    entry = costs.get(f"datasets.{name}", required=False)
    if not isinstance(entry, dict):
        raise CostsError(f"costs file {costs.source}: field 'datasets.{name}' is missing (needed when the data "
                         f"cannot be read or for a projection from counts)")
    if entry.get("assumed"):
        msg = f"datasets.{name}: {entry['assumed']} (an assumption, not read from data)"
        if msg not in costs.used_notes:
            costs.used_notes.append(msg)
    return costs.hw(f"datasets.{name}.hw"), int(costs.pos(f"datasets.{name}.gt_tracks", zero_ok=True)), str(entry.get("source", ""))


def dataset_row(name: str, cfg: BuildConfig, costs: Costs, *, scenes: int, clips: int, shards: int,
                image_hw: tuple[int, int], gt_tracks: int, hw_source: str, label: str | None = None,
                passes: list[int] | None = None) -> dict:
    """Projected costs of ``clips`` clips of dataset ``name`` (cfg must be resolved). ``passes``: the
    frames of each depth/MegaSaM pass (:func:`pass_frames`; default one pass per clip)."""
    from stages.align.megasam import cache_entry_bytes

    ds = cfg.datasets[name]
    t = int(ds.clip_length)
    frames = clips * t
    stages = model_stages(cfg, name)
    passes = passes if passes is not None else [t] * clips
    segments = [n for p in passes for n in _segment_lengths(p, cfg)]
    gpu = {k: 0.0 for k in GPU_STAGES}
    cache_bytes = 0
    if "depth" in stages:
        per = {n: vda_seconds_per_clip(n, image_hw, cfg.stages.depth, costs) for n in set(segments)}
        gpu["depth"] = sum(per[n] for n in segments) / 3600.0
    if "megasam" in stages:
        gpu["megasam"] = sum(segments) * costs.pos("megasam.gpu_s_per_frame") / 3600.0
        a = cfg.stages.align
        cache_bytes = sum(cache_entry_bytes(n, image_hw[0], image_hw[1], a.megasam_cache_max_side) for n in segments)
    if ds.track_source == "cotracker":
        sec, tracks = cotracker_seconds_per_clip(t, cfg.stages.tracks, costs)
        gpu["tracks"] = clips * sec / 3600.0
    elif ds.track_source == "depth_static":
        tracks = cfg.stages.tracks.grid_size ** 2
    elif ds.track_source == "gt":
        tracks = gt_tracks
    else:
        tracks = 0
    ref_h, ref_w = costs.hw("cpu.reference_hw")
    pix_scale = image_hw[0] * image_hw[1] / (ref_h * ref_w)
    cpu = {k: frames * costs.pos(f"cpu.ms_per_frame.{k}", zero_ok=True) * pix_scale / 1000.0 / 3600.0
           for k in ("ingest", "encode", "write")}
    cpu["align"] = frames * costs.pos("cpu.align_ms_per_frame", zero_ok=True) / 1000.0 / 3600.0 if "depth" in stages else 0.0
    out_bytes = clips * clip_bytes(t, image_hw, tracks, costs) + shards * costs.pos("output.tar_bytes_per_shard", zero_ok=True)
    return {
        "dataset": name, "label": label or name, "scenes": int(scenes), "clips": int(clips), "frames": int(frames),
        "shards": int(shards), "clip_length": t, "image_hw": [int(image_hw[0]), int(image_hw[1])], "image_hw_source": hw_source,
        "depth_source": ds.depth_source, "track_source": ds.track_source, "model_stages": stages,
        "model_passes": len(passes) if "depth" in stages else 0,
        "model_frames": sum(segments) if "depth" in stages else 0,
        "tracks_per_clip": int(tracks), "output_bytes": int(round(out_bytes)),
        "megasam_cache_bytes": int(cache_bytes),
        "gpu_hours": {**gpu, "total": sum(gpu.values())},
        "cpu_core_hours": {**cpu, "total": sum(cpu.values())},
    }


def _probe(cfg: BuildConfig, plan, name: str, first: dict | None) -> tuple[tuple[int, int], int | None, str]:
    """Image size and ground-truth track count of the dataset's first planned clip (``first``)."""
    from pipeline.clip import ClipFailure
    from stages.ingest.stage import ingest_clip

    if first is None:
        return None, None, "no clip planned"
    spec = {**first, "ordinal": -1}  # -1: never matches a fault-injection ordinal
    try:
        clip = ingest_clip(spec, plan.scene_refs[(name, first["scene"])], cfg)
    except Exception as exc:  # a probe must never stop a capacity report
        return None, None, f"{type(exc).__name__}: {exc}"
    if isinstance(clip, ClipFailure):
        return None, None, f"{clip.reason}" + (f" ({clip.path})" if getattr(clip, "path", None) else "")
    n = int(clip.tracks.shape[1]) if clip.tracks is not None else 0
    return (int(clip.rgb.shape[1]), int(clip.rgb.shape[2])), n, f"read from {first['clip_id']}"


def _totals(rows: list[dict]) -> dict:
    tot = {k: sum(r[k] for r in rows) for k in ("scenes", "clips", "frames", "shards", "output_bytes",
                                                 "model_frames", "megasam_cache_bytes")}
    tot["gpu_hours"] = {k: sum(r["gpu_hours"][k] for r in rows) for k in (*GPU_STAGES, "total")}
    tot["cpu_core_hours"] = {k: sum(r["cpu_core_hours"][k] for r in rows) for k in (*CPU_STAGES, "total")}
    return tot


def _general_assumptions(cfg: BuildConfig, costs: Costs, rows: list[dict]) -> list[str]:
    gpu = costs.get("gpu", required=False) or "the GPU of the costs file"
    out = [
        f"GPU-hours are for {gpu}, one model per GPU, from isolated benchmarks of the model stages "
        f"(costs file {costs.source}); a CPU-only build is far slower.",
        "Depth (Video Depth Anything): cost per pass of T frames (a scene's frames with scene passes, "
        "else a clip) = a*T + b*32*windows(T) at 518x518, split between "
        "encoder and temporal head as profiled, scaled by (network pixels / 518^2)^%.2f; the network size "
        "follows the image size and stages.depth.input_size." % vda_pixel_exponent(costs),
        "Tracks (CoTracker3): cost proportional to point-frames (query frames x grid_size^2 points x T, x2 "
        "for the offline backward pass); the model input is always 384x512, so image size does not enter.",
        "CPU core-hours: ingest/encode/write per frame measured at 288x512 and scaled linearly with the "
        "stored pixels; align per frame as measured (it included a MegaSaM stand-in start-up per clip).",
        "Output bytes: JPEG and depth-PNG bytes per pixel measured on rendered scenes at several sizes "
        "(real footage with sensor noise and fine texture compresses worse); tracks 13 bytes per point-frame; "
        "every clip stores dense depth.",
    ]
    if int(cfg.jpeg_quality) != int(costs.pos("output.jpeg_quality")):
        out.append(f"jpeg_quality is {cfg.jpeg_quality} but the byte figures were measured at "
                   f"{int(costs.pos('output.jpeg_quality'))}: output bytes are not adjusted for it.")
    if any(r["track_source"] == "depth_static" for r in rows):
        out.append("Static-scene tracks from depth (track_source depth_static) run on the CPU and are not measured: "
                   "not counted.")
    if any("megasam" in r["model_stages"] for r in rows):
        out.append("MegaSaM GPU time has no measurement in this project: megasam.gpu_s_per_frame in the costs file "
                   "is a placeholder to replace with your own figure.")
    if any(r["image_hw_source"].startswith("nominal") for r in rows):
        out.append("Some image sizes are the dataset's nominal release size, not read from the data (see image_hw_source).")
    return out


def capacity_report(cfg: BuildConfig, costs: str | Path | dict | None = None, probe: bool = True) -> dict:
    """Scenes, clips, frames, projected output bytes, GPU-hours per model stage and CPU core-hours.

    Counts come from :func:`pipeline.plan.make_plan` (the same plan ``d4s build`` records). With
    ``probe`` the first planned clip of each dataset is read to learn its image size and its
    ground-truth track count; otherwise (or when that read fails) the nominal figures of the costs
    file are used and the report says so. The result is plain JSON-serialisable data.
    """
    from pipeline.plan import make_plan

    c = load_costs(costs)
    rcfg = cfg.resolved()
    plan = make_plan(rcfg)
    rows, notes = [], []
    # one pass over the plan (it has a row per clip: ~10^6 at full scale), not one per dataset
    n_scenes = Counter(s["dataset"] for s in plan.scenes)
    n_clips = Counter(x["dataset"] for x in plan.clips)
    n_shards = Counter(s["dataset"] for s in plan.shards)
    first_clip: dict[str, dict] = {}
    scene_clips: dict[str, dict[str, list]] = {}
    for x in plan.clips:
        first_clip.setdefault(x["dataset"], x)
        scene_clips.setdefault(x["dataset"], {}).setdefault(x["scene"], []).append(x["frames"])
    for name in sorted(d for d, ds in rcfg.datasets.items() if ds.enabled):
        scenes, clips, shards = n_scenes[name], n_clips[name], n_shards[name]
        hw = n_gt = None
        why = "probe disabled"
        if probe:
            hw, n_gt, why = _probe(rcfg, plan, name, first_clip.get(name))
        if hw is None:
            nhw, nn, src = _nominal(c, name)
            hw, n_gt, source = nhw, nn, f"nominal ({why})"
            notes.append(f"{name}: image size {nhw[1]}x{nhw[0]} and {nn} ground-truth tracks per clip taken from the "
                         f"costs file ({src or 'nominal release figures'}) because the data was not read: {why}")
        else:
            source = why
        rows.append(dataset_row(name, rcfg, c, scenes=scenes, clips=clips, shards=shards, image_hw=hw,
                                gt_tracks=n_gt or 0, hw_source=source,
                                passes=pass_frames(rcfg, name, list(scene_clips.get(name, {}).values()))))
    return _report(rcfg, c, rows, notes, mode="plan")


def _report(cfg: BuildConfig, c: Costs, rows: list[dict], notes: list[str], mode: str) -> dict:
    return {
        "mode": mode,
        "output": cfg.output,
        "costs_file": c.source,
        "gpu": c.get("gpu", required=False),
        "datasets": rows,
        "totals": _totals(rows),
        "assumptions": _general_assumptions(cfg, c, rows) + c.used_notes + notes,
    }


# ------------------------------------------------------------------------------------------
# Projection from a table of counts (no data needed)

#: Estimated composition of a ~130k-scene build (the size of the Diff4Splat training set): the
#: full releases as documented in docs/datasets/*.md and shared/datasets/FORMATS.md, with
#: Stereo4D taking the remainder up to 130,000 scenes (the paper's own split is not known here).
#: ``frames_per_scene`` is a release's frame count divided by its scene count (a mean: scenes of
#: unequal length give a few more or fewer clips). These are ESTIMATES, not counts of real data.
FULL_BUILD_COUNTS: list[dict] = [
    {"dataset": "tartanair", "scenes": 370, "frames_per_scene": 2700,
     "source": "~370 trajectories, ~1M frames per camera (docs/datasets/tartanair.md)"},
    {"dataset": "matrixcity", "label": "matrixcity (aerial)", "scenes": 32, "frames_per_scene": 2100, "hw": [1080, 1920],
     "source": "~67k aerial images; ~32 block folders (small city 10+10 test, big city 6+6 test) (docs/datasets/matrixcity.md)"},
    {"dataset": "matrixcity", "label": "matrixcity (street)", "scenes": 20, "frames_per_scene": 22600, "hw": [1000, 1000],
     "source": "~452k street images; ~20 road/area folders over the splits (docs/datasets/matrixcity.md)"},
    {"dataset": "pointodyssey", "scenes": 105, "frames_per_scene": 1550,
     "source": "105 videos, ~163k frames (docs/datasets/pointodyssey.md)"},
    {"dataset": "dynamic_replica", "scenes": 524, "frames_per_scene": 277,
     "source": "524 videos, 145,200 stereo frames; left view only (docs/datasets/dynamic_replica.md)"},
    {"dataset": "spring", "scenes": 37, "frames_per_scene": 135,
     "source": "37 train sequences, 5,000 frames per camera (docs/datasets/spring.md)"},
    {"dataset": "vkitti2", "scenes": 50, "frames_per_scene": 425,
     "source": "5 scenes x 10 variations, Camera_0, 21,260 frames (docs/datasets/vkitti2.md)"},
    {"dataset": "kubric_movi_f", "scenes": 6000, "frames_per_scene": 24,
     "source": "about 6k videos of 24 frames at 512x512 (docs/datasets/kubric_movi_f.md)"},
    {"dataset": "realestate10k", "scenes": 67000, "frames_per_scene": 135,
     "source": "~67k train sequences, ~10M frames over ~74k sequences (docs/datasets/realestate10k.md)"},
    {"dataset": "stereo4d", "scenes": 55862, "frames_per_scene": 128,
     "source": "remainder to 130,000 of ~100k released clips; 128 frames per clip assumed (not documented here)"},
]


def _default_cfg(names: list[str]) -> BuildConfig:
    return BuildConfig.model_validate({"output": "<projection>", "datasets": {n: {"root": "<not read>"} for n in names}})


def projection_from_counts(counts: list[dict], cfg: BuildConfig | None = None, costs: str | Path | dict | None = None) -> dict:
    """The capacity report for a table of counts instead of data on disk.

    Each row: ``dataset``, ``scenes``, ``frames_per_scene``, optional ``label``, ``hw`` ([H, W];
    default: the nominal size in the costs file), ``gt_tracks`` and ``source``. Clips per scene
    follow the planner's rule (:func:`pipeline.plan.clip_starts`, ``max_clips_per_scene``) with the
    config's (default: the adapters') clip settings, and the default stage settings unless ``cfg``
    is given (its datasets must include every row's dataset; its roots are not read).
    """
    from pipeline.plan import clip_starts
    from pipeline.stage_routes import whole_scene_shards

    c = load_costs(costs)
    names = sorted({r["dataset"] for r in counts})
    cfg = (cfg or _default_cfg(names)).resolved()
    missing = [n for n in names if n not in cfg.datasets]
    if missing:
        raise ConfigError(f"projection: datasets {missing} are not in the config")
    rows = []
    for r in counts:
        name = r["dataset"]
        ds = cfg.datasets[name]
        nhw, nn = None, 0
        if not r.get("hw") or ("gt_tracks" not in r and ds.track_source == "gt"):
            nhw, nn, _ = _nominal(c, name)
        hw = tuple(r.get("hw") or nhw)
        n_scenes = int(r["scenes"])
        if ds.max_scenes:
            n_scenes = min(n_scenes, ds.max_scenes)
        starts = clip_starts(int(r["frames_per_scene"]), ds.clip_length, ds.frame_stride, ds.clip_stride)
        if ds.max_clips_per_scene:
            starts = starts[: ds.max_clips_per_scene]
        per_scene = len(starts)
        clips = n_scenes * per_scene
        one_scene = [[s + i * ds.frame_stride for i in range(ds.clip_length)] for s in starts]
        shards = -(-clips // cfg.shard_size)
        if whole_scene_shards(cfg, name) and per_scene:  # whole scenes per shard (pipeline/plan.py)
            shards = -(-n_scenes // max(1, cfg.shard_size // per_scene))
        rows.append(dataset_row(name, cfg, c, scenes=n_scenes, clips=clips, shards=shards,
                                image_hw=hw, gt_tracks=int(r.get("gt_tracks", nn)),
                                hw_source="counts table" if r.get("hw") else "nominal (counts table)",
                                label=r.get("label"), passes=pass_frames(cfg, name, [one_scene] * n_scenes)))
    notes = [f"Counts are a table of estimates, not read from data: " +
             "; ".join(f"{r.get('label', r['dataset'])}: {r['scenes']:,} scenes x {r['frames_per_scene']:,} frames"
                       + (f" ({r['source']})" if r.get("source") else "") for r in counts)]
    return _report(cfg, c, rows, notes, mode="projection")


# ------------------------------------------------------------------------------------------
# Text output


def human_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{int(n)} B"


def human_hours(h: float) -> str:
    if h == 0:
        return "0"
    s = h * 3600.0
    if s < 60:
        return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{h:,.1f} h" if h < 100 else f"{h:,.0f} h"


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[:-1]] + \
        ["  ".join("-" * w for w in widths), line(rows[-1])]


def format_capacity(rep: dict) -> str:
    """The report as plain-text tables (human units) followed by its assumptions."""
    rows, tot = rep["datasets"], rep["totals"]
    head = "d4s plan: " + ("projection from a counts table" if rep.get("mode") == "projection" else f"capacity of {rep['output']}")
    t1 = [[r["label"], f"{r['scenes']:,}", f"{r['clips']:,}", f"{r['frames']:,}", f"{r['image_hw'][1]}x{r['image_hw'][0]}",
           human_bytes(r["output_bytes"])] for r in rows]
    t1.append(["total", f"{tot['scenes']:,}", f"{tot['clips']:,}", f"{tot['frames']:,}", "", human_bytes(tot["output_bytes"])])

    def gpu_cell(r, k):
        return human_hours(r["gpu_hours"][k]) if k in r["model_stages"] else "-"

    t2 = [[r["label"], gpu_cell(r, "depth"), gpu_cell(r, "tracks"), gpu_cell(r, "megasam"),
           human_hours(r["cpu_core_hours"]["total"])] for r in rows]
    g = tot["gpu_hours"]
    t2.append(["total", human_hours(g["depth"]), human_hours(g["tracks"]), human_hours(g["megasam"]),
               human_hours(tot["cpu_core_hours"]["total"])])
    out = [head, ""]
    out += _table(["dataset", "scenes", "clips", "frames", "image", "output"], t1)
    out += ["", f"GPU time per model stage ({rep.get('gpu') or 'one GPU'}) and CPU core time:", ""]
    out += _table(["dataset", "depth (GPU)", "tracks (GPU)", "MegaSaM (GPU)", "CPU (cores)"], t2)
    summary = (f"total: {human_hours(g['total'])} of GPU time"
               + (f" ({human_hours(g['megasam'])} of it MegaSaM, an assumption)" if g["megasam"] else "")
               + f", {human_hours(tot['cpu_core_hours']['total'])} of CPU core time, {human_bytes(tot['output_bytes'])} "
               f"in {tot['shards']:,} shards"
               + (f", at most {human_bytes(tot['megasam_cache_bytes'])} of MegaSaM cache (OUT/cache/megasam)"
                  if tot.get("megasam_cache_bytes") else "") + ".")
    out += [""] + textwrap.wrap(summary, width=78) + ["", "assumptions:"]
    for a in rep["assumptions"]:
        out += textwrap.wrap(a.replace("[", "(").replace("]", ")"), width=78, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(out)


def full_build_markdown(costs: str | Path | dict | None = None) -> str:
    """The docs/CLUSTER.md table of the ~130k-scene projection (``python -m pipeline.capacity full-build``)."""
    rep = projection_from_counts(FULL_BUILD_COUNTS, costs=costs)
    lines = ["| dataset | scenes | frames/scene | image | clips | frames | output | depth GPU-h | tracks GPU-h "
             "| MegaSaM GPU-h | MegaSaM cache | CPU core-h |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fps = {r.get("label", r["dataset"]): r["frames_per_scene"] for r in FULL_BUILD_COUNTS}

    def num(x):
        return f"{x:,.1f}" if x >= 1 or x == 0 else f"{x:.2f}"

    def h(r, k):
        return num(r["gpu_hours"][k]) if k in r["model_stages"] else "-"

    for r in rep["datasets"]:
        lines.append(f"| {r['label']} | {r['scenes']:,} | {fps[r['label']]:,} | {r['image_hw'][1]}x{r['image_hw'][0]} "
                     f"| {r['clips']:,} | {r['frames']:,} | {human_bytes(r['output_bytes'])} | {h(r, 'depth')} "
                     f"| {h(r, 'tracks')} | {h(r, 'megasam')} "
                     f"| {human_bytes(r['megasam_cache_bytes']) if r['megasam_cache_bytes'] else '-'} "
                     f"| {num(r['cpu_core_hours']['total'])} |")
    t = rep["totals"]
    g = t["gpu_hours"]
    lines.append(f"| **total** | **{t['scenes']:,}** | | | **{t['clips']:,}** | **{t['frames']:,}** "
                 f"| **{human_bytes(t['output_bytes'])}** | **{num(g['depth'])}** | **{num(g['tracks'])}** "
                 f"| **{num(g['megasam'])}** | **{human_bytes(t['megasam_cache_bytes'])}** "
                 f"| **{num(t['cpu_core_hours']['total'])}** |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Measuring the byte figures (reproduces output.*_bytes_per_pixel of the costs file)


def measure_bytes_per_pixel(sizes=((48, 64), (240, 320), (480, 640), (720, 1280)), frames: int = 4,
                            seeds=(3, 4), jpeg_quality: int = 95) -> list[dict]:
    """Encode rendered demo scenes (pipeline/demo/render.py) at each size with the shard encoder."""
    import numpy as np

    from pipeline.demo.render import random_scene, render
    from pipeline.sample_format import _jpeg, _png16, encode_depth

    out = []
    for h, w in sizes:
        rgb_b, dep_b, n = 0, 0, 0
        for seed in seeds:
            r = render(random_scene("bytes", seed=seed, dynamic=bool(seed % 2), num_frames=frames, height=h, width=w))
            for i in range(frames):
                rgb_b += len(_jpeg(r.rgb[i], jpeg_quality))
                dep_b += len(_png16(encode_depth(r.depth[i], np.isfinite(r.depth[i]))))
                n += 1
        out.append({"hw": [h, w], "pixels": h * w, "rgb_bytes_per_pixel": rgb_b / n / (h * w),
                    "depth_bytes_per_pixel": dep_b / n / (h * w)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.capacity", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fb = sub.add_parser("full-build", help="projection of the ~130k-scene build (docs/CLUSTER.md)")
    fb.add_argument("--counts", help="YAML list of {dataset, scenes, frames_per_scene[, hw, label, gt_tracks]} rows")
    fb.add_argument("--config", help="build config whose clip and stage settings to use (roots are not read)")
    fb.add_argument("--costs", help="costs file (default pipeline/capacity_costs.yaml)")
    fb.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    mb = sub.add_parser("measure-bytes", help="re-measure the bytes-per-pixel figures on rendered scenes")
    mb.add_argument("--quality", type=int, default=95)
    args = ap.parse_args(argv)
    if args.cmd == "measure-bytes":
        for r in measure_bytes_per_pixel(jpeg_quality=args.quality):
            print(json.dumps(r))
        return 0
    try:
        if args.format == "markdown":
            if args.counts or args.config:
                ap.error("--format markdown prints the docs table of the built-in counts only")
            print(full_build_markdown(args.costs))
            return 0
        counts = yaml.safe_load(Path(args.counts).read_text()) if args.counts else FULL_BUILD_COUNTS
        cfg = None
        if args.config:
            from pipeline.config import load_config

            cfg = load_config(args.config)
        rep = projection_from_counts(counts, cfg=cfg, costs=args.costs)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2) if args.format == "json" else format_capacity(rep))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
