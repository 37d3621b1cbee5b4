"""Measure the shard encoder's bytes per pixel (JPEG frames, 16-bit log-depth PNGs) at several sizes.

Reproduces ``output.rgb_bytes_per_pixel`` and ``output.depth_bytes_per_pixel`` of the capacity
model's costs file (pipeline/capacity/costs.yaml): rendered demo scenes (pipeline/demo/render.py,
2 scenes x 4 frames per size) through pipeline/sample_format.py. No GPU, a few seconds.

Usage: python bench/measure_bytes_per_pixel.py [--quality 95]   (one JSON line per size)
"""

from __future__ import annotations

import argparse
import json


def measure_bytes_per_pixel(
    sizes=((48, 64), (240, 320), (480, 640), (720, 1280)), frames: int = 4, seeds=(3, 4), jpeg_quality: int = 95
) -> list[dict]:
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
        out.append(
            {
                "hw": [h, w],
                "pixels": h * w,
                "rgb_bytes_per_pixel": rgb_b / n / (h * w),
                "depth_bytes_per_pixel": dep_b / n / (h * w),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality (the costs file's output.jpeg_quality)")
    for row in measure_bytes_per_pixel(jpeg_quality=ap.parse_args().quality):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
