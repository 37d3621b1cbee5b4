"""Depth PNG bytes and encoding time per zlib level (``depth_png_level``), one thread.

Two kinds of depth: rendered scenes (smooth, like the synthetic datasets' ground truth) at three
sizes, and, with ``--aligned``, the aligned depth of the align bench's RealEstate10K-layout scene
(random-weight VDA aligned to the MegaSaM stand-in: noisy; rendered and cached by
bench/bench_align_cpu.py in ``--work``).

    OMP_NUM_THREADS=1 python bench/bench_depth_png.py [--aligned --work .bench-work/align]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

LEVELS = (1, 2, 3, 4, 5, 6, 9)


def rate(codes: list[np.ndarray], level: int) -> dict:
    from pipeline.sample_format import _png16

    t0, n = time.process_time(), 0
    for c in codes:
        n += len(_png16(c, level))
    h, w = codes[0].shape
    return {
        "level": level,
        "ms_per_frame": round((time.process_time() - t0) / len(codes) * 1e3, 1),
        "bytes_per_frame": n // len(codes),
        "bytes_per_pixel": round(n / len(codes) / (h * w), 4),
    }


def rendered_codes(h: int, w: int) -> list[np.ndarray]:
    from pipeline.demo.render import random_scene, render
    from pipeline.sample_format import encode_depth

    out = []
    for seed in (3, 4):
        r = render(random_scene("bytes", seed=seed, dynamic=bool(seed % 2), num_frames=4, height=h, width=w))
        out += [encode_depth(r.depth[i], np.isfinite(r.depth[i])) for i in range(4)]
    return out


def aligned_codes(work: Path) -> list[np.ndarray]:
    from types import SimpleNamespace

    import bench_align_cpu

    from pipeline.clip import Clip
    from pipeline.sample_format import encode_depth
    from stages.align.pipeline_stage import align_group

    a = SimpleNamespace(work=work.resolve(), frames=175, height=360, width=640, cpus=2)
    clips, cfg, megasam = bench_align_cpu.scene_clips(a)
    c = next(c for c in align_group(clips, cfg, megasam) if isinstance(c, Clip))
    return [encode_depth(c.depth[i], c.depth_valid[i]) for i in range(c.num_frames)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aligned", action="store_true")
    ap.add_argument("--work", type=Path, default=Path(".bench-work/align"))
    a = ap.parse_args(argv)
    sets = [(f"rendered {h}x{w}", rendered_codes(h, w)) for h, w in ((240, 320), (480, 640), (720, 1280))]
    if a.aligned:
        sets.append(("aligned 360x640", aligned_codes(a.work)))
    for name, codes in sets:
        for level in LEVELS:
            print(json.dumps({"depth": name, **rate(codes, level)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
