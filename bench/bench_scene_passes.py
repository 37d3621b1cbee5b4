"""Benchmark: scene passes against the per-clip path, side by side, on one GPU machine (issue #14).

Renders RealEstate10K-layout scenes of ``--min-frames`` to ``--max-frames`` frames (default
150-300) at 360x640 (parallel, not timed) and builds them with RealEstate10K's default clips
(49 frames at stride 2, clip stride 48), Video Depth Anything (random weights, metric head,
fp16) and the MegaSaM stand-in (``pipeline/demo/megasam_stand_in.py``: the rendered truth with
2 % depth noise and a 5 % metric-scale error per run, as real MegaSaM runs have). Parts
(``--parts``, all by default):

* ``clip``, ``scene``: the build with ``stages.scene.granularity: clip`` (the per-clip path)
  and ``scene``, tracks off so the GPU runs Video Depth Anything alone. Per build: wall time,
  clips/s, VDA frames/s inside the build (distinct source frames / the depth actor's busy
  seconds from the ledger; over the seconds it held the GPU, ``depth.model_held_s``, the actor's
  throughput when it is kept busy, since assembling and cutting scenes overlap the other call's hold;
  and over its model calls alone, ``depth.model_s``), VDA model input frames and VDA window slots (32 per window) per
  source frame, MegaSaM calls per scene, GPU utilisation (nvidia-smi every 0.5 s) between the
  first and the last sample above 5 % and over the steady state (:func:`hold_util`: from the end of
  the depth warm-up to the depth actor's last model call, read from its holds on the model, which
  ``fault.trace_dir`` records), and the spread of ``qc.align.scale`` and ``extra.pose_scale`` over
  the clips of each scene.
* ``standalone``: whole-video VDA (``VDARunner.predict``) on every scene's frame sequence (the
  frames the scene pass runs on), on the same GPU: frames/s; the ratio to the scene build's.
* ``full``: the scene-pass build with CoTracker3 too (RealEstate10K's whole chain): clips/s and
  GPU utilisation, also from the end of the depth warm-up to the last hold of either GPU actor.
* ``accuracy`` (CPU, no Ray, not in the default parts; the align and MegaSaM stages' own code,
  one process per scene; run it at a small size): with a relative
  prediction made from the truth (disparity ``2.5/d + 0.3`` with 1 % noise) instead of
  random-weight VDA, per-clip against per-scene: spread of the metric scale over the clips of a
  scene and AbsRel of the aligned depth against the rendered truth.
* ``scene2``: with two or more GPUs, the scene-pass build on 2 GPUs (two depth actors) and its
  scaling against ``scene``.

``--megasam-gpus`` (default 0) is ``stages.align.megasam_num_gpus`` of the GPU builds. The stand-in does
no GPU work, so by default it runs on the CPUs and the GPU figures show what the DAG feeds the model
actors; 0.1 schedules it as a GPU task like real MegaSaM (one run at a time beside two 0.45-GPU
actors), and then the GPU waits for a queue of CPU work (bench/RESULTS.md §7, session 8). ``--unique N``
renders N scenes and makes the others copies with other pixels, for longer builds.

Usage (repo root, kit sourced, PYTHONPATH=$PWD):
    python bench/bench_scene_passes.py --out DIR [--scenes 8] [--parts clip,scene,standalone,full,scene2]
    python bench/bench_scene_passes.py --out DIR --parts accuracy --scenes 6 --height 90 --width 160 --gpus 0
CPU smoke test: --gpus 0 --encoder vits --input-size 56 --height 36 --width 64 --scenes 2 --min-frames 100 --max-frames 110
Writes DIR/bench_scene_passes.json and DIR/bench_scene_passes.md after every part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_build import GpuSampler  # noqa: E402

CLIP_LENGTH, FRAME_STRIDE, CLIP_STRIDE = 49, 2, 48  # RealEstate10K's defaults
NOISE, SCALE_JITTER = 0.02, 0.05


def _spec(i: int, frames: int, height: int, width: int):
    from pipeline.demo.writers import realestate10k as w

    spec = w.demo_spec(i, seed=9100 + i)
    spec.num_frames, spec.height, spec.width = frames, height, width
    return spec


def _render_chunk(job):
    """Frames [a, b) of scene i: the scenes are static, so a slice of the camera path renders the
    same frames as the whole scene would (rendering in chunks uses every core)."""
    from pipeline.demo.render import default_camera_path, render

    i, frames, height, width, a, b = job
    spec = _spec(i, frames, height, width)
    path = default_camera_path(spec)
    spec.num_frames, spec.camera_path, spec.num_tracks = b - a, path[a:b], 1
    r = render(spec)
    return i, a, r.rgb, r.depth, r.intrinsics, r.c2w


def variant(scene, copy: int):
    """Copy ``copy`` (>= 1) of a rendered scene with its frames ``3 * copy`` % darker: the same depth
    and cameras, other pixels, so its MegaSaM cache key (the frames' content) differs and the copy
    costs a build what a new scene would, for a fraction of the rendering (``--unique``)."""
    from types import SimpleNamespace

    rgb = np.clip(np.round(scene.rgb * (1.0 - 0.03 * copy)), 0, 255).astype(np.uint8)
    return SimpleNamespace(rgb=rgb, depth=scene.depth, intrinsics=scene.intrinsics, c2w=scene.c2w)


def render_scenes(a, frames: list[int], unique: int = 0) -> None:
    """Render the scenes of ``frames`` (their frame counts) into ``a.data`` and their truth into
    ``a.truth``; with ``unique`` > 0 only the first ``unique`` are rendered and scene ``i`` is
    :func:`variant` ``i // unique`` of scene ``i % unique`` (``frames`` must repeat likewise)."""
    from types import SimpleNamespace

    from pipeline.demo.megasam_stand_in import save_truth
    from pipeline.demo.writers import realestate10k as w
    from pipeline.plan import key_safe

    unique = unique or len(frames)
    jobs = [
        (i, n, a.height, a.width, s, min(s + 20, n)) for i, n in enumerate(frames[:unique]) for s in range(0, n, 20)
    ]
    with ProcessPoolExecutor(max_workers=max(1, a.cpus)) as ex:
        parts = sorted(ex.map(_render_chunk, jobs), key=lambda p: (p[0], p[1]))
    rendered = []
    for i in range(unique):
        mine = [p for p in parts if p[0] == i]
        rendered.append(
            SimpleNamespace(
                **{
                    k: np.concatenate([p[j] for p in mine])
                    for j, k in ((2, "rgb"), (3, "depth"), (4, "intrinsics"), (5, "c2w"))
                }
            )
        )
    keys = []
    for i, scene in enumerate(rendered):
        ws = w.write(scene, Path(a.data), w.default_scene_id(i))
        save_truth(a.truth, key_safe(ws.scene_id), scene)
        keys.append(key_safe(ws.scene_id))
    copies = [(str(a.data), str(a.truth), i, keys[i % unique], i // unique) for i in range(unique, len(frames))]
    with ProcessPoolExecutor(max_workers=max(1, a.cpus)) as ex:  # encoding frames: ~25 ms each at 360x640
        list(ex.map(_write_copy, copies))


def _write_copy(job) -> None:
    """Scene ``i``: :func:`variant` ``copy`` of the scene whose truth is saved under ``source``."""
    from types import SimpleNamespace

    from pipeline.demo.megasam_stand_in import save_truth
    from pipeline.demo.writers import realestate10k as w
    from pipeline.plan import key_safe

    data, truth, i, source, copy = job
    with np.load(Path(truth) / f"{source}.npz", allow_pickle=False) as z:
        scene = variant(SimpleNamespace(**{k: z[k] for k in ("rgb", "depth", "intrinsics", "c2w")}), copy)
    ws = w.write(scene, Path(data), w.default_scene_id(i))
    save_truth(truth, key_safe(ws.scene_id), scene)


def build_config(a, out: Path, granularity: str, gpus: int, tracks: bool, log: Path):
    from pipeline.config import BuildConfig
    from pipeline.demo.megasam_stand_in import command_template

    gpu = gpus > 0
    per_gpu = max(1, getattr(a, "actors_per_gpu", 1))  # model actors sharing each GPU
    share = ((0.45 if tracks else 0.9) / per_gpu) if gpu else 0.0
    actors = max(1, gpus) * per_gpu
    return BuildConfig.model_validate(
        {
            "output": str(out),
            "shard_size": 8,
            "max_inflight_shards": a.inflight,
            "shard_deadline_s": 1800,
            "datasets": {
                "realestate10k": {
                    "root": str(a.data),
                    "clip_length": CLIP_LENGTH,
                    "frame_stride": FRAME_STRIDE,
                    # extracted frames: no video decoder needed (the GPU image has no PyAV)
                    "options": {"form": "camera_files", "frames": "images"},
                    "clip_stride": CLIP_STRIDE,
                    "depth_source": "megasam",
                    "track_source": "cotracker" if tracks else "none",
                }
            },
            "stages": {
                "depth": {
                    "encoder": a.encoder,
                    "metric": True,
                    "input_size": a.input_size,
                    "dtype": "fp16" if gpu else "fp32",
                    "allow_random_weights": True,
                    "resources": {"num_gpus": share, "actors": actors, "num_cpus": a.actor_cpus},
                },
                "align": {
                    "drop_on_qc": False,
                    "model": "scale_only",
                    "megasam_num_gpus": a.megasam_gpus if gpu else 0.0,
                    "megasam_command": command_template(a.truth, log=log, noise=NOISE, scale_jitter=SCALE_JITTER),
                },
                "tracks": {
                    "dtype": "bf16" if gpu else "fp32",
                    "allow_random_weights": True,
                    "drop_on_qc": False,
                    "resources": {"num_gpus": share, "actors": actors},
                },
                "scene": {"granularity": granularity},
            },
            "ray": {"num_cpus": a.cpus, "num_gpus": gpus},
        }
    )


def plan_frames(cfg) -> dict:
    """Distinct source frames, model input frames and VDA window slots of the plan, per path."""
    from pipeline.plan import make_plan
    from stages.depth.vda.infer import INFER_LEN, num_windows

    plan = make_plan(cfg)
    scenes: dict[str, list] = {}
    for c in plan.clips:
        scenes.setdefault(c["scene"], []).append(c["frames"])
    distinct = sum(len(set().union(*map(set, fr))) for fr in scenes.values())
    if cfg.stages.scene.granularity == "scene":
        passes = [len(set().union(*map(set, fr))) for fr in scenes.values()]
    else:
        passes = [len(f) for fr in scenes.values() for f in fr]
    return {
        "scenes": len(scenes),
        "clips": len(plan.clips),
        "distinct_frames": distinct,
        "model_frames": sum(passes),
        "window_slots": sum(INFER_LEN * num_windows(n) for n in passes),
    }


def scale_spread(out: Path) -> dict:
    """Relative spread (max - min) / mean of qc.align.scale and extra.pose_scale over each scene's clips."""
    import tarfile

    per: dict[str, list] = {}
    for p in sorted((out / "shards").rglob("*.tar")):
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".meta.json"):
                    meta = json.loads(tar.extractfile(m).read())
                    per.setdefault(meta["scene"], []).append(
                        (meta["qc"]["align"]["scale"], meta["extra"].get("pose_scale"))
                    )
    out_ = {"scale": [], "pose_scale": []}
    for vals in per.values():
        if len(vals) < 2:
            continue
        for k, col in (("scale", [v[0] for v in vals]), ("pose_scale", [v[1] for v in vals])):
            col = np.asarray(col, dtype=np.float64)
            out_[k].append(float((col.max() - col.min()) / abs(col.mean())))
    return {f"{k}_spread_max": (max(v) if v else None) for k, v in out_.items()} | {
        f"{k}_spread_mean": (float(np.mean(v)) if v else None) for k, v in out_.items()
    }


def steady_throughput(events: list[dict], full_after: int = 0) -> dict:
    """Clips/s of a build between its first and its last shard completion (ledger events): the clips
    of every shard done after the first, over that span. A whole build's clips/s includes a head
    (the actors' start-up, the first shards' ingest, the warm-up, the first shard's pipeline) and
    a tail that more GPUs do not shorten; this rate is what a build of the full dataset runs at
    for hours. A shard counts once, at its latest ``done`` event.

    How much work is already done behind the first completion depends on how the build admitted
    its first shards (all at once, or one per model actor while the actors start), which moves
    that figure. With ``full_after`` = k (the shards in flight), ``full_clips_per_s`` is the same
    rate from the k-th completion on, when the pipeline has been full whatever the admission."""
    done: dict[str, tuple[float, int]] = {}
    for e in events:
        if e.get("state") == "done" and e.get("finished_at") is not None:
            done[e["shard_id"]] = (float(e["finished_at"]), int(e.get("samples_written") or 0))
    times = sorted(done.values())
    if len(times) < 2:
        return {"steady_clips_per_s": None, "steady_span_s": None, "full_clips_per_s": None, "shards_done": len(times)}
    span = times[-1][0] - times[0][0]
    full = None
    if full_after >= 1 and len(times) > full_after + 1:
        full_span = times[-1][0] - times[full_after - 1][0]
        full = sum(n for _, n in times[full_after:]) / full_span if full_span > 0 else None
    return {
        "steady_clips_per_s": sum(n for _, n in times[1:]) / span if span > 0 else None,
        "steady_span_s": span,
        "full_clips_per_s": full,
        "shards_done": len(times),
    }


def used_gpu_samples(samples: list) -> list:
    """The samples of the GPUs the build used (some sample above 5 %): a 1-GPU build on a host with
    more GPUs must not average in the idle ones."""
    used = {s[1] for s in samples if s[2] > 5}
    return [s for s in samples if s[1] in used]


def steady_util(samples: list) -> dict:
    samples = used_gpu_samples(samples)
    busy = [i for i, s in enumerate(samples) if s[2] > 5]
    if not busy:
        return {"gpu_util_steady": None, "gpu_util_mean": None, "gpu_mem_max_mib": None}
    win = samples[busy[0] : busy[-1] + 1]
    return {
        "gpu_util_steady": float(np.mean([s[2] for s in win])),
        "gpu_util_mean": float(np.mean([s[2] for s in samples])),
        "gpu_steady_s": round(win[-1][0] - win[0][0], 1),
        "gpu_mem_max_mib": max(s[3] for s in samples),
    }


def merge_spans(spans: list) -> list[tuple[float, float]]:
    """Overlapping or touching (start, end) intervals joined: two GPU actors' holds can overlap."""
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def hold_util(samples: list, holds: list, warmup_s: float, warm_holds: list | None = None) -> dict:
    """GPU utilisation over the GPU actors' steady state: from the end of the depth actors' warm-up
    for the frame size to the end of the last hold in ``holds``; also the share of that span some
    actor held its model (overlapping holds of two actors count once), and the utilisation while
    one did. Only the GPUs the build used count (:func:`used_gpu_samples`).

    ``warm_holds``: each depth actor's holds (default: ``holds``, one actor). Each actor warms up at
    the start of its first hold, and ``warmup_s`` (``depth.warmup_s``) is summed over the actors, so
    the warm-up ends ``warmup_s / actors`` after the last actor's first hold began.

    ``samples``: (time, gpu, util %, MiB) from :class:`GpuSampler`; a sample at ``t`` is the
    utilisation over the period before ``t``, so it belongs to an interval ``(a, b]`` when
    ``a < t <= b``. ``holds``: (start, end) wall-clock times (``fault.trace_dir``'s ``holds/``)."""
    none = {"gpu_util_after_warmup": None, "gpu_util_while_held": None, "depth_held_fraction": None}
    if not holds:
        return none | {"gpu_steady_span_s": None}
    actors = [sorted(h) for h in (warm_holds or [holds]) if h]
    samples, holds = used_gpu_samples(samples), merge_spans(holds)
    start, end = max(h[0][0] for h in actors) + warmup_s / len(actors), holds[-1][1]
    span = max(0.0, end - start)
    window = [s for s in samples if start < s[0] <= end]
    held = [s for s in window if any(a < s[0] <= b for a, b in holds)]
    held_s = sum(max(0.0, min(b, end) - max(a, start)) for a, b in holds)
    return {
        "gpu_util_after_warmup": float(np.mean([s[2] for s in window])) if window else None,
        "gpu_util_while_held": float(np.mean([s[2] for s in held])) if held else None,
        "depth_held_fraction": held_s / span if span else None,
        "gpu_steady_span_s": span,
    }


def read_holds_by_actor(trace: Path, stage: str = "depth") -> list[list[tuple[float, float]]]:
    """The (start, end) of every hold of each of ``stage``'s model actors (``fault.trace_dir``/holds,
    one file per actor process)."""
    return [
        [tuple(map(float, line.split())) for line in f.read_text().splitlines() if line.strip()]
        for f in sorted((trace / "holds").glob(f"{stage}.*"))
    ]


def build_timeline(t0: float, trace: Path, holds: list[tuple[float, float]], events: list[dict]) -> dict:
    """Seconds from the build's start to: the first model actor process up, the last one's model
    built and warmed up (``fault.trace_dir``/startup), the first and the end of the last depth hold,
    the first and the last shard done (ledger). What lies before the first hold and after the last
    is the head and the tail that more GPUs do not shorten."""
    ups = [
        tuple(map(float, line.split()))
        for f in sorted((trace / "startup").glob("*"))
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    done = [float(e["finished_at"]) for e in events if e.get("state") == "done" and e.get("finished_at")]

    def rel(t):
        return round(t - t0, 2) if t is not None else None

    return {
        "actor_up_s": rel(min((u[0] for u in ups), default=None)),
        "actors_built_s": rel(max((u[1] for u in ups), default=None)),
        "actors_ready_s": rel(max((u[2] for u in ups), default=None)),
        "first_hold_s": rel(min((h[0] for h in holds), default=None)),
        "last_hold_end_s": rel(max((h[1] for h in holds), default=None)),
        "first_shard_done_s": rel(min(done, default=None)),
        "last_shard_done_s": rel(max(done, default=None)),
    }


def read_holds(trace: Path, stage: str = "depth") -> list[tuple[float, float]]:
    """The (start, end) of every hold of ``stage``'s model actors, all actors together."""
    return [span for actor in read_holds_by_actor(trace, stage) for span in actor]


def run_build(a, name: str, granularity: str, gpus: int, tracks: bool) -> dict:
    import ray

    from manifests.store import ManifestStore
    from pipeline.runner import build
    from pipeline.status import collect_status
    from pipeline.storage import Store

    out = a.work / name
    log = a.out / f"{name}-megasam-calls.txt"
    cfg = build_config(a, out, granularity, gpus, tracks, log)
    trace = a.out / f"{name}-trace"  # the depth actor's holds on its model (hold_util)
    shutil.rmtree(trace, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # a build left by an earlier run would only be resumed
    log.unlink(missing_ok=True)  # the stand-in appends a line per call
    cfg.fault.trace_dir = str(trace)
    pf = plan_frames(cfg)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=a.cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    sampler = GpuSampler()
    sampler.start()
    t0 = time.time()
    s = build(cfg, show_progress=False)
    wall = time.time() - t0
    sampler.stop()
    ray.shutdown()
    events = ManifestStore(Store(str(out))).ledger_events()  # read once: status, steady rate, timeline
    st = collect_status(cfg.output, events)
    depth_s = st["stage_seconds"].get("depth", 0.0)
    calls = log.read_text().split() if log.exists() else []
    depth_actors = read_holds_by_actor(trace)  # each depth actor's holds on its model
    depth_holds = [span for actor in depth_actors for span in actor]
    res = {
        "granularity": granularity,
        "gpus": gpus,
        "tracks": tracks,
        **pf,
        "build_s": round(wall, 1),
        "clips_written": s.clips_written,
        "clips_failed": s.clips_failed,
        "clips_per_s": s.clips_written / wall,
        "depth_busy_s": round(depth_s, 2),
        "vda_frames_per_s_in_build": pf["distinct_frames"] / depth_s if depth_s else None,
        "depth_model_s": round(s.stats.get("depth.model_s", 0.0), 2),
        "depth_held_s": round(s.stats.get("depth.model_held_s", 0.0), 2),
        "depth_warmup_s": round(s.stats.get("depth.warmup_s", 0.0), 2),
        "depth_idle_s": round(s.stats.get("depth.model_idle_s", 0.0), 2),  # between calls, all actors
        "vda_frames_per_s_gpu_held": (
            pf["distinct_frames"] / s.stats["depth.model_held_s"] if s.stats.get("depth.model_held_s") else None
        ),
        "vda_frames_per_s_model_call": (
            pf["distinct_frames"] / s.stats["depth.model_s"] if s.stats.get("depth.model_s") else None
        ),
        "vda_model_frames_per_source_frame": pf["model_frames"] / pf["distinct_frames"],
        "vda_window_slots_per_source_frame": pf["window_slots"] / pf["distinct_frames"],
        "stats": s.stats,
        "megasam_calls": len(calls),
        "megasam_calls_per_scene": len(calls) / pf["scenes"],
        "stage_busy_s": st["stage_seconds"],
        **steady_util(sampler.samples),
        **hold_util(sampler.samples, depth_holds, s.stats.get("depth.warmup_s", 0.0), warm_holds=depth_actors),
        # with tracks: the same window to the last hold of either GPU actor, held when either held
        **(
            {
                f"all_gpu_{k}": v
                for k, v in hold_util(
                    sampler.samples,
                    depth_holds + read_holds(trace, "tracks"),
                    s.stats.get("depth.warmup_s", 0.0),
                    warm_holds=depth_actors,
                ).items()
            }
            if tracks
            else {}
        ),
        **scale_spread(out),
        **steady_throughput(events, full_after=a.inflight),
        "timeline": build_timeline(t0, trace, depth_holds, events),
        "failures": s.failures[:3],
    }
    return res


def standalone_vda(a) -> dict:
    """Whole-video VDA on each scene's frame sequence (the scene pass's frames), one process."""
    import torch

    from pipeline.plan import key_safe, make_plan
    from stages.depth.vda.runner import VDARunner

    cfg = build_config(a, a.work / "standalone-plan", "scene", 1, False, a.out / "unused.txt")
    plan = make_plan(cfg)
    frames: dict[str, set] = {}
    for c in plan.clips:
        frames.setdefault(c["scene"], set()).update(c["frames"])
    device = "cuda" if torch.cuda.is_available() and a.gpus else "cpu"
    runner = VDARunner(
        encoder=a.encoder,
        metric=True,
        device=device,
        dtype="fp16" if device == "cuda" else "fp32",
        input_size=a.input_size,
        allow_random_weights=True,
    )
    videos = []
    for scene, fr in sorted(frames.items()):
        with np.load(a.truth / f"{key_safe(scene)}.npz", allow_pickle=False) as z:
            videos.append(np.ascontiguousarray(z["rgb"][sorted(fr)]))
    warm_s = runner.warm_for(videos)  # every shape of this frame size once, as the depth stage does
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    for v in videos:  # one video at a time, as a standalone user runs it
        runner.predict([v])
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t0
    n = sum(len(v) for v in videos)
    return {"frames": n, "seconds": round(secs, 2), "frames_per_s": n / secs, "warmup_s": round(warm_s, 2)}


def _accuracy_scene(job) -> dict:
    """Per-clip against per-scene alignment of one scene, with the stages' own code (no Ray)."""
    data, truth_dir, scene, specs, cfg_raw = job
    from pipeline.clip import Clip
    from pipeline.config import BuildConfig
    from pipeline.plan import key_safe
    from stages.align.megasam_stage import megasam_pass
    from stages.align.pipeline_stage import align_group
    from stages.ingest import get_adapter
    from stages.ingest.stage import ingest_clip

    with np.load(Path(truth_dir) / f"{key_safe(scene)}.npz", allow_pickle=False) as z:
        true_depth = z["depth"]
    rng = np.random.default_rng(0)
    out = {}
    for gran in ("clip", "scene"):
        cfg = BuildConfig.model_validate(
            {**cfg_raw, "stages": {**cfg_raw["stages"], "scene": {"granularity": gran}}}
        ).resolved()
        sc = next(
            s for s in get_adapter("realestate10k", cfg.datasets["realestate10k"].root).discover() if s.scene == scene
        )
        clips = [ingest_clip(s, sc, cfg) for s in specs]
        for c in clips:
            d = true_depth[c.meta.frame_indices].astype(np.float64)
            c.aux["relative_depth"] = ((2.5 / d + 0.3) * np.exp(rng.normal(0, 0.01, d.shape))).astype(np.float32)
            c.aux["relative_kind"] = "disparity"
        groups = [[c] for c in clips] if gran == "clip" else [clips]
        aligned = []
        for g in groups:
            key = g[0].key if gran == "clip" else g[0].key.rsplit("__", 1)[0]
            aligned += align_group(g, cfg, megasam_pass(g, key, cfg))
        scales, pose, absrel, failed = [], [], [], []
        for c in aligned:
            if not isinstance(c, Clip):
                failed.append(f"{c.stage}: {c.reason}"[:300])
                continue
            t = true_depth[c.meta.frame_indices]
            v = c.depth_valid & (t > 0)
            absrel.append(float(np.mean(np.abs(c.depth[v] - t[v]) / t[v])))
            scales.append(c.meta.qc["align"]["scale"])
            pose.append(c.meta.extra.get("pose_scale"))
        out[gran] = {
            "clips": len(scales),
            "scale_spread": float((max(scales) - min(scales)) / np.mean(scales)) if scales else None,
            "pose_scale_spread": float((max(pose) - min(pose)) / np.mean(pose)) if pose else None,
            "abs_rel": absrel,
            "failed": failed,
        }
    return out


def accuracy(a) -> dict:
    from pipeline.plan import make_plan

    cfg = build_config(a, a.work / "accuracy", "scene", 0, False, a.out / "accuracy-megasam-calls.txt")
    cfg_raw = cfg.model_dump(mode="json")
    cfg_raw["stages"]["align"]["model"] = "disparity_affine"  # the default fit, for a relative prediction
    cfg_raw["stages"]["align"]["cache_dir"] = str(a.work / "accuracy-cache")
    plan = make_plan(cfg)
    by_scene: dict[str, list] = {}
    for c in plan.clips:
        by_scene.setdefault(c["scene"], []).append({**c, "ordinal": -1})
    jobs = [(str(a.data), str(a.truth), s, specs, cfg_raw) for s, specs in sorted(by_scene.items())]
    with ProcessPoolExecutor(max_workers=max(1, min(len(jobs), a.cpus))) as ex:
        per = list(ex.map(_accuracy_scene, jobs))
    res = {}
    for gran in ("clip", "scene"):
        rows = [p[gran] for p in per]
        failed = [f for r in rows for f in r["failed"]]
        if not any(r["abs_rel"] for r in rows):
            raise RuntimeError(f"accuracy, per {gran}: no clip aligned; first failures: {failed[:3]}")
        res[gran] = {
            "scale_spread_max": max(r["scale_spread"] or 0 for r in rows),
            "pose_scale_spread_max": max(r["pose_scale_spread"] or 0 for r in rows),
            "abs_rel_mean": float(np.mean([x for r in rows for x in r["abs_rel"]])),
            "abs_rel_max": float(np.max([x for r in rows for x in r["abs_rel"]])),
            "clips": sum(r["clips"] for r in rows),
            "failed": len(failed),
            "first_failures": failed[:3],
        }
    return res


def markdown(res: dict) -> str:
    lines = [
        f"scenes {res['setup']['scenes']} of {res['setup']['frames']} frames at {res['setup']['size']}, "
        f"clips {CLIP_LENGTH} frames at stride {FRAME_STRIDE}, clip stride {CLIP_STRIDE}; {res['setup']['encoder']}",
        "",
        "| build | clips | wall s | clips/s | VDA frames/s in build | while holding the GPU | in its model calls | "
        "model frames / source frame | window slots / source frame | MegaSaM calls / scene | GPU util steady | "
        "scale spread max | pose-scale spread max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ("clip", "scene", "full", "scene2"):
        r = res.get(k)
        if not r:
            continue
        f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"
        lines.append(
            f"| {k} | {r['clips_written']} | {r['build_s']} | {f(r['clips_per_s'])} | "
            f"{f(r['vda_frames_per_s_in_build'], 1)} | {f(r.get('vda_frames_per_s_gpu_held'), 1)} | "
            f"{f(r.get('vda_frames_per_s_model_call'), 1)} | "
            f"{f(r['vda_model_frames_per_source_frame'])} | "
            f"{f(r['vda_window_slots_per_source_frame'])} | {f(r['megasam_calls_per_scene'])} | "
            f"{f(r['gpu_util_steady'], 0)} % | {f(r['scale_spread_max'], 4)} | {f(r['pose_scale_spread_max'], 4)} |"
        )
    spans = (
        ("", "its last model call", "the depth actor held", "while it held it"),
        ("all_gpu_", "the last model call of the depth or the track actor", "one of them held", "while one did"),
    )
    for k in ("clip", "scene", "full", "scene2"):
        r = res.get(k) or {}
        for pre, until, who, held_by in spans:
            if r.get(f"{pre}gpu_util_after_warmup") is None:
                continue
            held = r[f"{pre}gpu_util_while_held"]
            lines += [
                "",
                f"{k}: GPU util from the end of the depth warm-up to {until} ({r[f'{pre}gpu_steady_span_s']:.1f} s): "
                f"{r[f'{pre}gpu_util_after_warmup']:.0f} %; {who} the GPU {r[f'{pre}depth_held_fraction']:.0%} of that "
                "span" + (f", util {held_by} {held:.0f} %" if held is not None else ""),
            ]
    if res.get("standalone"):
        sa = res["standalone"]
        sc = res.get("scene") or {}
        ratio = sc["vda_frames_per_s_in_build"] / sa["frames_per_s"] if sc.get("vda_frames_per_s_in_build") else None
        call = sc["vda_frames_per_s_model_call"] / sa["frames_per_s"] if sc.get("vda_frames_per_s_model_call") else None
        held = sc["vda_frames_per_s_gpu_held"] / sa["frames_per_s"] if sc.get("vda_frames_per_s_gpu_held") else None
        lines += [
            "",
            f"standalone whole-video VDA: {sa['frames_per_s']:.1f} frames/s over {sa['frames']} frames; "
            f"scene build / standalone = {ratio:.1%} (the depth stage's busy time)"
            + (f", {held:.1%} (while it holds the GPU)" if held else "")
            + (f", {call:.1%} (its model calls alone)" if call else "")
            if ratio
            else "",
        ]
        if sc.get("depth_warmup_s") and sc.get("depth_busy_s"):
            busy = sc["depth_busy_s"] - sc["depth_warmup_s"]
            lines += [
                "",
                f"warm-up (every shape of the frame size once, per actor and network size): "
                f"{sc['depth_warmup_s']:.2f} s in the build, {sa.get('warmup_s', 0):.2f} s standalone, neither in "
                f"the model-call figures; the depth stage's busy time less its warm-up: "
                f"{sc['distinct_frames'] / busy:.1f} frames/s = {sc['distinct_frames'] / busy / sa['frames_per_s']:.1%} "
                "of standalone",
            ]
    if res.get("scene2") and res.get("scene"):
        one, two = res["scene"], res["scene2"]
        for k in ("scene", "scene2"):
            r = res[k]
            lines.append(f"{k} timeline (s from the build's start): " + json.dumps(r.get("timeline", {})))
            if r.get("depth_held_s"):
                idle = r.get("depth_idle_s", 0.0)
                lines.append(
                    f"{k}: depth models held {r['depth_held_s']:.1f} s, waited between calls {idle:.1f} s "
                    f"({idle / (idle + r['depth_held_s']):.0%})"
                )
        lines += ["", f"2 GPUs: {two['clips_per_s'] / one['clips_per_s']:.2f}x the clips/s of 1 GPU (whole build)"]
        if one.get("steady_clips_per_s") and two.get("steady_clips_per_s"):
            lines.append(
                f"2 GPUs, first to last shard done: {two['steady_clips_per_s'] / one['steady_clips_per_s']:.2f}x "
                f"({two['steady_clips_per_s']:.2f} vs {one['steady_clips_per_s']:.2f} clips/s over "
                f"{two['steady_span_s']:.1f} vs {one['steady_span_s']:.1f} s, {one['shards_done']} shards)"
            )
        if one.get("full_clips_per_s") and two.get("full_clips_per_s"):
            lines.append(
                f"2 GPUs, from the completion that fills the pipeline to the last: "
                f"{two['full_clips_per_s'] / one['full_clips_per_s']:.2f}x "
                f"({two['full_clips_per_s']:.2f} vs {one['full_clips_per_s']:.2f} clips/s)"
            )
    if res.get("accuracy"):
        lines += [
            "",
            "| alignment (CPU) | clips | scale spread max | pose-scale spread max | AbsRel mean | AbsRel max |",
            "|---|---|---|---|---|---|",
        ]
        for k, r in res["accuracy"].items():
            lines.append(
                f"| per {k} | {r['clips']} | {r['scale_spread_max']:.4f} | {r['pose_scale_spread_max']:.4f} | "
                f"{r['abs_rel_mean']:.4f} | {r['abs_rel_max']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="results (JSON, markdown), logs and traces")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="the rendered scenes and the builds' outputs (default: --out); tens of GB for long builds, so "
        "on the device machine a folder outside $OUT. Scenes rendered there before with the same settings "
        "are reused",
    )
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument(
        "--unique",
        type=int,
        default=0,
        help="render only this many scenes and make the others darker copies of them (new content, same "
        "geometry): longer builds for a fraction of the rendering; 0: every scene rendered",
    )
    ap.add_argument("--min-frames", type=int, default=150)
    ap.add_argument("--max-frames", type=int, default=300)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--encoder", default="vitl")
    ap.add_argument("--input-size", type=int, default=518)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument(
        "--megasam-gpus",
        type=float,
        default=0.0,
        help="stages.align.megasam_num_gpus of the GPU builds. 0: the stand-in (no GPU work) runs on the CPUs "
        "in parallel, so the GPU figures show what the DAG feeds the model actors; 0.1 schedules it as real "
        "MegaSaM is scheduled (a GPU task: one run at a time beside two 0.45-GPU actors), and the GPU waits for it",
    )
    ap.add_argument(
        "--inflight",
        type=int,
        default=16,
        help="max_inflight_shards of the builds: the shards in flight must cover a shard's time in the CPU "
        "stages around the model actors (8 left two depth actors waiting ~20 %% of the time, session 9)",
    )
    ap.add_argument("--actor-cpus", type=float, default=1.0, help="stages.depth.resources.num_cpus")
    ap.add_argument(
        "--actors-per-gpu",
        type=int,
        default=1,
        help="model actors per GPU, each with its share of it: a second actor's call can fill the GPU while "
        "the first one's host work (window stitching, copies back) runs",
    )
    ap.add_argument("--gpus", type=int, default=None, help="GPUs for the 1-GPU builds (default: 1 if CUDA else 0)")
    ap.add_argument(
        "--parts",
        default="clip,scene,standalone,full,scene2",
        help="also 'accuracy' (CPU-bound: run it at a small size, e.g. --height 90 --width 160)",
    )
    a = ap.parse_args(argv)
    import torch

    n_gpus = torch.cuda.device_count()
    a.gpus = (1 if n_gpus else 0) if a.gpus is None else a.gpus
    a.out = a.out.resolve()
    a.work = (a.work or a.out).resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    a.data, a.truth = a.work / "data" / "realestate10k", a.work / "data" / "truth"
    parts = [p for p in a.parts.split(",") if p]
    unique = a.unique if 0 < a.unique < a.scenes else a.scenes
    frames = np.linspace(a.min_frames, a.max_frames, unique).round().astype(int).tolist()
    frames = [frames[i % unique] for i in range(a.scenes)]
    res = {
        "setup": {
            "scenes": a.scenes,
            "unique_scenes": unique,
            "frames": f"{min(frames)}-{max(frames)}",
            "size": f"{a.height}x{a.width}",
            "encoder": f"VDA {a.encoder} input {a.input_size} random weights",
            "cpus": a.cpus,
            "gpus_seen": n_gpus,
            "gpu": torch.cuda.get_device_name(0) if n_gpus else None,
            "max_inflight_shards": a.inflight,
            "actors_per_gpu": a.actors_per_gpu,
            "megasam": f"stand-in, noise {NOISE}, scale jitter {SCALE_JITTER}, {a.megasam_gpus:g} GPU per run",
        }
    }

    def save():
        (a.out / "bench_scene_passes.json").write_text(json.dumps(res, indent=1, default=str))
        (a.out / "bench_scene_passes.md").write_text(markdown(res))

    t0 = time.time()
    rendered = json.dumps({"frames": frames, "unique": unique, "size": [a.height, a.width]})
    marker = a.data / ".rendered"
    if not marker.exists() or marker.read_text() != rendered:
        shutil.rmtree(a.work / "data", ignore_errors=True)
        render_scenes(a, frames, unique)
        marker.write_text(rendered)
    res["setup"]["render_s"] = round(time.time() - t0, 1)
    save()
    print(f"rendered {a.scenes} scenes in {res['setup']['render_s']} s", flush=True)
    todo = [("clip", "clip", a.gpus, False), ("scene", "scene", a.gpus, False), ("full", "scene", a.gpus, True)]
    for name, gran, gpus, tracks in todo:
        if name in parts:
            res[name] = run_build(a, name, gran, gpus, tracks)
            save()
            print(name, json.dumps({k: v for k, v in res[name].items() if k not in ("stats", "failures")}), flush=True)
        if name == "scene" and "standalone" in parts:
            res["standalone"] = standalone_vda(a)
            save()
            print("standalone", res["standalone"], flush=True)
    if "accuracy" in parts:
        res["accuracy"] = accuracy(a)
        save()
        print("accuracy", res["accuracy"], flush=True)
    if "scene2" in parts and n_gpus >= 2:
        res["scene2"] = run_build(a, "scene2", "scene", 2, False)
        save()
    print(markdown(res))
    print(
        f"total {time.time() - t0:.0f} s; written {a.out / 'bench_scene_passes.json'}, {a.out / 'bench_scene_passes.md'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
