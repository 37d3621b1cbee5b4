"""CPU seconds to ingest one RealEstate10K-layout scene's clips: clip by clip against together.

A scene pass's clips share frames (RealEstate10K's defaults: 49 frames at stride 2, a clip every
48 source frames, so half of a clip's frames are also its neighbour's). Read clip by clip
(``ingest_clip`` per spec, each its own task in the DAG) every shared frame is decoded twice; read
together (``ingest_scene``, one task per scene) once. This renders the align bench's scene (cached in
--work: the same scene, JPEG frames at 360x640), checks that both give the same pixels, and times
both in turn, single-threaded, ``--repeat`` times each (alternating; min and median reported).

    OMP_NUM_THREADS=1 python bench/bench_ingest_scene.py --work DIR [--frames 175] [--repeat 12]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    from bench_align_cpu import parsed, scene_args, scene_setup

    from stages.ingest.stage import ingest_clip, ingest_scene

    a = parsed(scene_args(__doc__, repeat=12), argv)
    _, cfg, specs, scene = scene_setup(a)
    alone = [ingest_clip(s, scene, cfg) for s in specs]  # also warms the page cache and the adapter
    together = ingest_scene(specs, scene, cfg)
    for x, y in zip(alone, together):
        if x.rgb.tobytes() != y.rgb.tobytes() or x.meta != y.meta:
            raise SystemExit(f"{x.key}: read together differs from read alone")
    times: dict[str, list[float]] = {"clip_by_clip": [], "together": []}
    for _ in range(a.repeat):
        t0 = time.process_time()
        [ingest_clip(s, scene, cfg) for s in specs]
        times["clip_by_clip"].append(time.process_time() - t0)
        t0 = time.process_time()
        ingest_scene(specs, scene, cfg)
        times["together"].append(time.process_time() - t0)
    res = {
        "frames": a.frames,
        "size": f"{a.height}x{a.width}",
        "clips": len(specs),
        "clip_frames": sum(len(s["frames"]) for s in specs),
        "frames_read_together": together[0].aux["stats"]["ingest.frames_read"],
        **{f"{k}_cpu_s_min": round(min(v), 3) for k, v in times.items()},
        **{f"{k}_cpu_s_median": round(statistics.median(v), 3) for k, v in times.items()},
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
