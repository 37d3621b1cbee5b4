"""CPU seconds of the align stage on one RealEstate10K-layout scene (a scene pass, as in a build).

The align stage runs beside the model actors on the same nodes; its CPU time per scene bounds how
many scenes per second a node's cores can take, and its latency is the tail of every shard. This
renders one scene (cached in --work), ingests its 49-frame clips, gives them a relative disparity
(the truth, made relative, with noise), runs the MegaSaM stand-in pass once (cached) and then times
``align_group`` on the scene, single-threaded, ``--repeat`` times (the minimum is reported).

    python bench/bench_align_cpu.py --work DIR [--frames 175] [--height 360 --width 640] [--profile]

Side by side against other code: run it with ``PYTHONPATH`` pointing at that checkout (the
package is imported from there; this script only drives it).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def scene_setup(a):
    """The rendered scene (cached in --work), its build config, its clip specs and its SceneRef."""
    from bench_scene_passes import build_config, render_scenes

    from pipeline.config import BuildConfig
    from pipeline.plan import make_plan
    from stages.ingest import get_adapter

    ns = SimpleNamespace(
        work=a.work, data=a.work / "data" / "realestate10k", truth=a.work / "data" / "truth", height=a.height,
        width=a.width, cpus=a.cpus, inflight=4, actor_cpus=1.0, encoder="vits", input_size=56, megasam_gpus=0.0,
    )  # fmt: skip
    marker = ns.data / ".rendered"
    want = json.dumps({"frames": [a.frames], "size": [a.height, a.width]})
    if not marker.exists() or marker.read_text() != want:
        render_scenes(ns, [a.frames])
        marker.write_text(want)
    cfg = build_config(ns, a.work / "out", "scene", 0, False, a.work / "megasam-calls.txt")
    raw = cfg.model_dump(mode="json")
    raw["stages"]["align"]["model"] = "disparity_affine"
    raw["stages"]["align"]["cache_dir"] = str(a.work / "cache")
    cfg = BuildConfig.model_validate(raw).resolved()
    specs = [{**c, "ordinal": -1} for c in make_plan(cfg).clips]
    scene = specs[0]["scene"]
    sc = next(
        s for s in get_adapter("realestate10k", cfg.datasets["realestate10k"].root).discover() if s.scene == scene
    )
    return ns, cfg, specs, sc


def scene_clips(a):
    """The scene's ingested clips with a relative disparity each, its config and its MegaSaM result."""
    from pipeline.plan import key_safe
    from stages.align.megasam_stage import megasam_pass
    from stages.ingest.stage import ingest_clip

    ns, cfg, specs, sc = scene_setup(a)
    scene = sc.scene
    with np.load(ns.truth / f"{key_safe(scene)}.npz", allow_pickle=False) as z:
        true_depth = z["depth"]
    rng = np.random.default_rng(0)
    clips = [ingest_clip(s, sc, cfg) for s in specs]
    for c in clips:
        d = true_depth[c.meta.frame_indices].astype(np.float64)
        c.aux["relative_depth"] = ((2.5 / d + 0.3) * np.exp(rng.normal(0, 0.01, d.shape))).astype(np.float32)
        c.aux["relative_kind"] = "disparity"
    key = clips[0].key.rsplit("__", 1)[0]
    return clips, cfg, megasam_pass(clips, key, cfg)


def scene_args(doc: str, repeat: int) -> argparse.ArgumentParser:
    """The options of the benches on this scene (its work folder, size, and repeats)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--frames", type=int, default=175)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=repeat)
    return ap


def parsed(ap: argparse.ArgumentParser, argv) -> argparse.Namespace:
    a = ap.parse_args(argv)
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    return a


def main(argv=None) -> int:
    ap = scene_args(__doc__, repeat=3)
    ap.add_argument("--profile", action="store_true", help="print the 25 costliest functions of one run")
    a = parsed(ap, argv)
    import copy

    from pipeline.clip import Clip
    from stages.align.pipeline_stage import align_group

    clips, cfg, megasam = scene_clips(a)
    times, out = [], None
    for _ in range(a.repeat):
        batch = copy.deepcopy(clips)
        t0 = time.process_time()
        out = align_group(batch, cfg, megasam)
        times.append(time.process_time() - t0)
    kept = [c for c in out if isinstance(c, Clip)]
    res = {
        "frames": a.frames,
        "size": f"{a.height}x{a.width}",
        "clips": len(clips),
        "kept": len(kept),
        "scale": kept[0].meta.qc["align"]["scale"] if kept else None,
        "cpu_s_min": round(min(times), 3),
        "cpu_s": [round(t, 3) for t in times],
    }
    print(json.dumps(res))
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        align_group(copy.deepcopy(clips), cfg, megasam)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
