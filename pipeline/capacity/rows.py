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


def model_stages(ds) -> list[str]:
    """GPU model stages a (resolved) dataset config needs: the same rules as the DAG (pipeline/dag.py)."""
    out = []
    if ds.depth_source != "gt":
        out.append("depth")
    if ds.track_source == "cotracker":
        out.append("tracks")
    if ds.depth_source == "megasam":
        out.append("megasam")
    return out


def dataset_row(name: str, cfg: BuildConfig, costs: Costs, *, scenes: int, clips: int, shards: int,
                image_hw: tuple[int, int], gt_tracks: int, hw_source: str, label: str | None = None) -> dict:
    """Projected costs of ``clips`` clips of dataset ``name`` (cfg must be resolved)."""
    ds = cfg.datasets[name]
    t = int(ds.clip_length)
    frames = clips * t
    stages = model_stages(ds)
    gpu = {k: 0.0 for k in GPU_STAGES}
    if "depth" in stages:
        gpu["depth"] = clips * vda_seconds_per_clip(t, image_hw, cfg.stages.depth, costs) / 3600.0
    if "megasam" in stages:
        gpu["megasam"] = frames * costs.figure("megasam.gpu_s_per_frame") / 3600.0
    if ds.track_source == "cotracker":
        sec, tracks = cotracker_seconds_per_clip(t, cfg.stages.tracks, costs)
        gpu["tracks"] = clips * sec / 3600.0
    elif ds.track_source == "depth_static":
        tracks = cfg.stages.tracks.grid_size ** 2
    elif ds.track_source == "gt":
        tracks = gt_tracks
    else:
        tracks = 0
    ref_h, ref_w = costs.file.cpu.reference_hw
    pix_scale = image_hw[0] * image_hw[1] / (ref_h * ref_w)
    cpu = {k: frames * costs.figure(f"cpu.ms_per_frame.{k}") * pix_scale / 1000.0 / 3600.0
           for k in ("ingest", "encode", "write")}
    cpu["align"] = frames * costs.figure("cpu.align_ms_per_frame") / 1000.0 / 3600.0 if "depth" in stages else 0.0
    out_bytes = clips * clip_bytes(t, image_hw, tracks, costs) + shards * costs.figure("output.tar_bytes_per_shard")
    return {
        "dataset": name, "label": label or name, "scenes": int(scenes), "clips": int(clips), "frames": int(frames),
        "shards": int(shards), "clip_length": t, "image_hw": [int(image_hw[0]), int(image_hw[1])], "image_hw_source": hw_source,
        "depth_source": ds.depth_source, "track_source": ds.track_source, "model_stages": stages,
        "tracks_per_clip": int(tracks), "output_bytes": int(round(out_bytes)),
        "gpu_hours": {**gpu, "total": sum(gpu.values())},
        "cpu_core_hours": {**cpu, "total": sum(cpu.values())},
    }


def _totals(rows: list[dict]) -> dict:
    tot = {k: sum(r[k] for r in rows) for k in ("scenes", "clips", "frames", "shards", "output_bytes")}
    tot["gpu_hours"] = {k: sum(r["gpu_hours"][k] for r in rows) for k in (*GPU_STAGES, "total")}
    tot["cpu_core_hours"] = {k: sum(r["cpu_core_hours"][k] for r in rows) for k in (*CPU_STAGES, "total")}
    return tot


def _general_assumptions(cfg: BuildConfig, costs: Costs, rows: list[dict]) -> list[str]:
    gpu = costs.file.gpu or "the GPU of the costs file"
    out = [
        f"GPU-hours are for {gpu}, one model per GPU, from isolated benchmarks of the model stages "
        f"(costs file {costs.source}); a CPU-only build is far slower.",
        "Depth (Video Depth Anything): cost per clip = a*T + b*32*windows(T) at 518x518, split between "
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
    measured_q = costs.file.output.jpeg_quality
    if int(cfg.jpeg_quality) != measured_q:
        out.append(f"jpeg_quality is {cfg.jpeg_quality} but the byte figures were measured at "
                   f"{measured_q}: output bytes are not adjusted for it.")
    if any(r["track_source"] == "depth_static" for r in rows):
        out.append("Static-scene tracks from depth (track_source depth_static) run on the CPU and are not measured: "
                   "not counted.")
    if any("megasam" in r["model_stages"] for r in rows):
        out.append("MegaSaM GPU time has no measurement in this project: megasam.gpu_s_per_frame in the costs file "
                   "is a placeholder to replace with your own figure.")
    if any(r["image_hw_source"].startswith("nominal") for r in rows):
        out.append("Some image sizes are the dataset's nominal release size, not read from the data (see image_hw_source).")
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
