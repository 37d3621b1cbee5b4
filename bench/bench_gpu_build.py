"""Benchmark: a model-heavy `d4s build` on one GPU machine, per stage, with GPU utilisation.

Renders RealEstate10K-layout scenes (static, poses up to scale) at a realistic-ish size, then
builds them through every model stage as RealEstate10K's default config does: ingest -> Video
Depth Anything (random weights) -> align (MegaSaM reference, trajectory pose scale,
consistency) -> CoTracker3 (random weights) -> encode -> write, with one depth actor and one
track actor sharing the GPU. MegaSaM itself is not installed here: its place is taken by
``pipeline/demo/megasam_stand_in.py`` (answers with the rendered truth; a Python start-up per
clip), so MegaSaM's own GPU cost is NOT part of these figures. The scale-only fit keeps
random-weight depth alignable (a positive scale always exists). Reports clips/s and frames/s
of the whole build, each stage's summed busy seconds (from the ledger), GPU utilisation and
memory sampled with nvidia-smi every 0.5 s. Rendering is parallel and not timed.

Usage: python bench/bench_gpu_build.py --out DIR [--scenes 48 --frames 32 --height 288 --width 512]
       [--encoder vitl] [--cpus N] [--gpus 1]   (on a CPU-only box: --gpus 0 --encoder vits, small sizes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _write_scene(args):
    root, truth, i, frames, height, width = args
    from pipeline.demo.megasam_stand_in import save_truth
    from pipeline.demo.render import render
    from pipeline.demo.writers import realestate10k as w
    from pipeline.plan import key_safe

    spec = w.demo_spec(i, seed=9000 + i)
    spec.num_frames, spec.height, spec.width = frames, height, width
    rendered = render(spec)
    ws = w.write(rendered, Path(root), w.default_scene_id(i))
    save_truth(truth, key_safe(ws.scene_id), rendered)
    return i


class GpuSampler(threading.Thread):
    """nvidia-smi utilisation.gpu and memory.used every ``period`` seconds until stopped."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.samples, self._halt = period, [], threading.Event()

    def run(self):
        while not self._halt.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for gi, line in enumerate(out.strip().splitlines()):
                    u, m = (float(x) for x in line.split(","))
                    self.samples.append((time.time(), gi, u, m))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join(timeout=5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenes", type=int, default=48)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--height", type=int, default=288)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--clip-length", type=int, default=16)
    ap.add_argument("--encoder", default="vitl")
    ap.add_argument("--input-size", type=int, default=518)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--shard-size", type=int, default=4)
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = out / "data" / "realestate10k"
    t0 = time.time()
    truth = out / "data" / "truth"
    jobs = [(str(data), str(truth), i, args.frames, args.height, args.width) for i in range(args.scenes)]
    with ProcessPoolExecutor(max_workers=max(1, args.cpus)) as ex:
        list(ex.map(_write_scene, jobs))
    render_s = time.time() - t0
    print(f"rendered {args.scenes} scenes in {render_s:.1f} s", flush=True)

    import ray

    from pipeline.config import BuildConfig
    from pipeline.demo.megasam_stand_in import command_template
    from pipeline.runner import build
    from pipeline.status import collect_status

    gpu = args.gpus > 0
    share = 0.5 if gpu else 0.0
    cfg = BuildConfig.model_validate(
        {
            "output": str(out / "build"),
            "shard_size": args.shard_size,
            "max_inflight_shards": 8,
            "datasets": {
                "realestate10k": {
                    "root": str(data),
                    "clip_length": args.clip_length,
                    "frame_stride": 1,
                    "clip_stride": args.clip_length // 2,
                    "depth_source": "megasam",
                    "track_source": "cotracker",
                }
            },
            "stages": {
                # the metric head: a random-weight relative head at vitl outputs all zeros (ReLU)
                "depth": {
                    "encoder": args.encoder,
                    "metric": True,
                    "input_size": args.input_size,
                    "dtype": "fp16" if gpu else "fp32",
                    "allow_random_weights": True,
                    "resources": {"num_gpus": share, "actors": 1},
                },
                "align": {
                    "drop_on_qc": False,
                    "model": "scale_only",
                    "megasam_command": command_template(truth),
                    "megasam_num_gpus": 0.0,
                },  # the stand-in uses no GPU
                "tracks": {
                    "dtype": "bf16" if gpu else "fp32",
                    "allow_random_weights": True,
                    "drop_on_qc": False,
                    "resources": {"num_gpus": share, "actors": 1},
                },
            },
            "ray": {"num_cpus": args.cpus, "num_gpus": args.gpus},
        }
    )
    ray.init(address="local", num_cpus=args.cpus, num_gpus=args.gpus, include_dashboard=False, log_to_driver=True)
    sampler = GpuSampler()
    sampler.start()
    t1 = time.time()
    s = build(cfg, show_progress=False)
    build_s = time.time() - t1
    sampler.stop()
    st = collect_status(cfg.output)
    frames = s.clips_written * args.clip_length
    util = [u for _, _, u, _ in sampler.samples]
    mem = [m for _, _, _, m in sampler.samples]
    res = {
        "scenes": args.scenes,
        "frames_per_scene": args.frames,
        "size": [args.height, args.width],
        "encoder": args.encoder,
        "input_size": args.input_size,
        "cpus": args.cpus,
        "gpus": args.gpus,
        "render_s": render_s,
        "build_s": build_s,
        "clips": s.clips_written,
        "clips_failed": s.clips_failed,
        "frames": frames,
        "clips_per_s": s.clips_written / build_s,
        "frames_per_s": frames / build_s,
        "stage_busy_s": st["stage_seconds"],
        "stage_ms_per_frame": {k: 1000 * v / max(frames, 1) for k, v in st["stage_seconds"].items()},
        "gpu_util_mean": sum(util) / len(util) if util else None,
        "gpu_util_p90": sorted(util)[int(0.9 * (len(util) - 1))] if util else None,
        "gpu_mem_max_mib": max(mem) if mem else None,
        "gpu_samples": len(util),
        "failures": s.failures[:5],
    }
    (out / "bench_gpu_build.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    lines = [
        "| clips | frames | build s | clips/s | frames/s | GPU util mean / p90 | GPU mem max |",
        "|---|---|---|---|---|---|---|",
        f"| {res['clips']} | {frames} | {build_s:.1f} | {res['clips_per_s']:.2f} | {res['frames_per_s']:.1f} | "
        f"{res['gpu_util_mean'] or 0:.0f}% / {res['gpu_util_p90'] or 0:.0f}% | {res['gpu_mem_max_mib'] or 0:.0f} MiB |",
        "",
        "| stage | busy s (summed over clips) | ms per frame |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} | {res['stage_ms_per_frame'][k]:.2f} |" for k, v in st["stage_seconds"].items()]
    (out / "bench_gpu_build.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
