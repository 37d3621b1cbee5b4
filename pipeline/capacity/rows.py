"""Counts of one dataset -> its row of the capacity report, and the report around the rows.

Both ``d4s plan`` modes (a config's data, a table of counts) end here, so they model costs the
same way.
"""

from __future__ import annotations

from pipeline.capacity.costs import Costs
from pipeline.capacity.models import clip_bytes, cotracker_seconds_per_clip, vda_pixel_exponent, vda_seconds_per_clip
from pipeline.config import BuildConfig

GPU_STAGES = ("depth", "tracks", "megasam")
CPU_STAGES = ("ingest", "encode", "write", "align")


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


def _ingests_per_scene(cfg: BuildConfig, name: str) -> bool:
    from pipeline.stage_routes import step

    return step(cfg, name, "ingest").granularity == "scene"


def _segment_lengths(n: int, cfg: BuildConfig) -> list[int]:
    from stages.scene.segments import plan_segments

    sc = cfg.stages.scene
    return [b - a for a, b in plan_segments(n, sc.max_frames, sc.overlap_frames)]


def dataset_row(
    name: str,
    cfg: BuildConfig,
    costs: Costs,
    *,
    scenes: int,
    clips: int,
    shards: int,
    image_hw: tuple[int, int],
    gt_tracks: int,
    hw_source: str,
    label: str | None = None,
    passes: list[int] | None = None,
) -> dict:
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
        gpu["megasam"] = sum(segments) * costs.figure("megasam.gpu_s_per_frame") / 3600.0
        a = cfg.stages.align
        cache_bytes = sum(cache_entry_bytes(n, image_hw[0], image_hw[1], a.megasam_cache_max_side) for n in segments)
    if ds.track_source == "cotracker":
        sec, tracks = cotracker_seconds_per_clip(t, cfg.stages.tracks, costs)
        gpu["tracks"] = clips * sec / 3600.0
    elif ds.track_source == "depth_static":
        tracks = cfg.stages.tracks.grid_size**2
    elif ds.track_source == "gt":
        tracks = gt_tracks
    else:
        tracks = 0
    ref_h, ref_w = costs.file.cpu.reference_hw
    pix_scale = image_hw[0] * image_hw[1] / (ref_h * ref_w)
    # ingest reads each frame a scene's clips share once where it reads them together (the route)
    read = sum(passes) if _ingests_per_scene(cfg, name) else frames
    cpu = {
        k: (read if k == "ingest" else frames) * costs.figure(f"cpu.ms_per_frame.{k}") * pix_scale / 1000.0 / 3600.0
        for k in ("ingest", "encode", "write")
    }
    cpu["align"] = frames * costs.figure("cpu.align_ms_per_frame") / 1000.0 / 3600.0 if "depth" in stages else 0.0
    out_bytes = clips * clip_bytes(t, image_hw, tracks, costs) + shards * costs.figure("output.tar_bytes_per_shard")
    return {
        "dataset": name,
        "label": label or name,
        "scenes": int(scenes),
        "clips": int(clips),
        "frames": int(frames),
        "shards": int(shards),
        "clip_length": t,
        "image_hw": [int(image_hw[0]), int(image_hw[1])],
        "image_hw_source": hw_source,
        "depth_source": ds.depth_source,
        "track_source": ds.track_source,
        "model_stages": stages,
        "model_passes": len(passes) if "depth" in stages else 0,
        "model_frames": sum(segments) if "depth" in stages else 0,
        "tracks_per_clip": int(tracks),
        "output_bytes": int(round(out_bytes)),
        "megasam_cache_bytes": int(cache_bytes),
        "gpu_hours": {**gpu, "total": sum(gpu.values())},
        "cpu_core_hours": {**cpu, "total": sum(cpu.values())},
    }


def _totals(rows: list[dict]) -> dict:
    tot = {
        k: sum(r[k] for r in rows)
        for k in ("scenes", "clips", "frames", "shards", "output_bytes", "model_frames", "megasam_cache_bytes")
    }
    tot["gpu_hours"] = {k: sum(r["gpu_hours"][k] for r in rows) for k in (*GPU_STAGES, "total")}
    tot["cpu_core_hours"] = {k: sum(r["cpu_core_hours"][k] for r in rows) for k in (*CPU_STAGES, "total")}
    return tot


def _general_assumptions(cfg: BuildConfig, costs: Costs, rows: list[dict]) -> list[str]:
    gpu = costs.file.gpu or "the GPU of the costs file"
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
        "stored pixels (ingest per frame read: once per scene for the frames its clips share where they are "
        "read together, RealEstate10K); align per frame as measured (it included a MegaSaM stand-in start-up "
        "per clip).",
        "Output bytes: JPEG and depth-PNG bytes per pixel measured on rendered scenes at several sizes "
        "(real footage with sensor noise and fine texture compresses worse); tracks 13 bytes per point-frame; "
        "every clip stores dense depth.",
    ]
    measured_q = costs.file.output.jpeg_quality
    if int(cfg.jpeg_quality) != measured_q:
        out.append(
            f"jpeg_quality is {cfg.jpeg_quality} but the byte figures were measured at "
            f"{measured_q}: output bytes are not adjusted for it."
        )
    if int(cfg.depth_png_level) != costs.file.output.depth_png_level:
        out.append(
            f"depth_png_level is {cfg.depth_png_level} but the depth byte figures (and the encode CPU figure) were "
            f"measured at {costs.file.output.depth_png_level}: neither is adjusted for it."
        )
    if any(r["track_source"] == "depth_static" for r in rows):
        out.append(
            "Static-scene tracks from depth (track_source depth_static) run on the CPU and are not measured: "
            "not counted."
        )
    if any("megasam" in r["model_stages"] for r in rows):
        out.append(
            "MegaSaM GPU time has no measurement in this project: megasam.gpu_s_per_frame in the costs file "
            "is a placeholder to replace with your own figure."
        )
    if any(r["image_hw_source"].startswith("nominal") for r in rows):
        out.append(
            "Some image sizes are the dataset's nominal release size, not read from the data (see image_hw_source)."
        )
    return out


def assemble_report(cfg: BuildConfig, costs: Costs, rows: list[dict], notes: list[str], mode: str) -> dict:
    """The report (plain JSON-serialisable data): rows, totals and every assumption used."""
    return {
        "mode": mode,
        "output": cfg.output,
        "costs_file": costs.source,
        "gpu": costs.file.gpu,
        "datasets": rows,
        "totals": _totals(rows),
        "assumptions": _general_assumptions(cfg, costs, rows) + costs.used_notes + notes,
    }
