"""Training loader throughput: samples/s that ``training.data.make_loader`` delivers to one rank, CPU only.

    python bench/bench_loader.py --out DIR [--workers 1,2] [--frames 49] [--res 512] [--seconds 20]
        [--clips 8] [--src 512] [--shards DIR]

Shards (unless ``--shards``): ``--clips`` clips of ``--frames`` frames at ``--src``² in the build's
sample format (JPEG q95 frames, 16-bit PNG log-depth, 1024 tracks), with photograph-like texture — a
1/f-spectrum texture that the camera pans across — so that JPEG sizes and decode times are those of
natural images rather than of flat synthetic renders. Every configured worker count is timed over
``--seconds`` after its first batch (the DataLoader's start-up is reported apart); the stream loops over
the clips epoch after epoch (files in the page cache: storage reads are not measured). A per-sample
breakdown (read, JPEG decode, depth decode, crop + resize, tracks) comes from one process.

Writes DIR/bench_loader.json and DIR/bench_loader.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np


def pink_texture(size: int, seed: int) -> np.ndarray:
    """A (size, size, 3) uint8 field with a 1/f^1.3 amplitude spectrum, mostly luminance (channels share one
    field, plus 30 % of their own): natural-image statistics. At 512² it is ~170 kB as a q95 4:4:4 JPEG,
    within the 100-250 kB of photographs of that size (the size sets the JPEG decode time)."""
    rng = np.random.default_rng(seed)
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    f[0, 0] = 1.0

    def field():
        img = np.real(np.fft.ifft2((rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / f**1.3))
        return (img - img.mean()) / (img.std() + 1e-9)

    lum = field()
    img = np.stack([lum + 0.3 * field() for _ in range(3)], -1) * 40 + 128
    return np.clip(img, 0, 255).astype(np.uint8)


def textured_clip(seed: int, t: int, size: int, n_tracks: int = 1024):
    """A clip whose frames pan across a 1/f texture twice their size, with smooth depth and tracks."""
    from pipeline.clip import Clip, ClipMeta

    tex = pink_texture(2 * size, seed)
    shift = np.linspace(0, size - 1, t).astype(int)
    rgb = np.stack([tex[s // 2 : s // 2 + size, s : s + size] for s in shift])
    yy, xx = np.mgrid[0:size, 0:size] / size
    depth = np.stack([(2.0 + 3.0 * yy + 0.5 * np.sin(6 * xx + 0.1 * i)).astype(np.float32) for i in range(t)])
    f = 1.1 * size
    intr = np.tile([f, f, size / 2, size / 2], (t, 1)).astype(np.float64)
    c2w = np.tile(np.eye(4), (t, 1, 1))
    c2w[:, 0, 3] = np.linspace(0.0, 0.5, t)
    rng = np.random.default_rng(seed)
    tracks = (rng.normal(size=(1, n_tracks, 3)) * [1.0, 1.0, 0.5] + [0, 0, 4]).astype(np.float32).repeat(t, 0)
    vis = rng.random((t, n_tracks)) < 0.8
    meta = ClipMeta(
        dataset="bench",
        scene=f"s{seed}",
        clip_id=f"bench__s{seed}__0",
        frame_indices=list(range(t)),
        dynamic=True,
        real=False,
        depth_source="gt",
        track_source="gt",
    )
    return Clip(
        meta=meta,
        rgb=rgb,
        intrinsics=intr,
        c2w=c2w,
        depth=depth,
        depth_valid=np.ones_like(depth, bool),
        tracks=tracks,
        track_visible=vis,
    )


def write_shards(out: str, clips: int, t: int, size: int) -> dict:
    """``out/shards/*.tar`` (one clip each) + ``out/index.parquet``; -> sizes of what was written."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from training.data import ENCODE

    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    rows, jpeg, png = [], [], []
    for i in range(clips):
        clip = textured_clip(i, t, size)
        sample = ENCODE(clip)
        jpeg += [len(v) for k, v in sample.items() if k.endswith(".jpg")]
        png += [len(v) for k, v in sample.items() if k.endswith(".png")]
        path = os.path.join(out, "shards", f"shard-{i:06d}.tar")
        with wds.TarWriter(path) as sink:
            sink.write(sample)
        with tarfile.open(path) as tar:
            offset = tar.getmembers()[0].offset
        rows.append(
            {
                "key": clip.key,
                "dataset": "bench",
                "shard_path": os.path.relpath(path, out),
                "offset": offset,
                "num_frames": t,
                "dynamic": True,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, "index.parquet"))
    return {
        "clips": clips,
        "frames": t,
        "src": size,
        "jpeg_kb_mean": float(np.mean(jpeg)) / 1e3,
        "depth_png_kb_mean": float(np.mean(png)) / 1e3,
    }


def _stage(frames: int, res: int):
    from training.config import StageConfig

    return StageConfig(name="bench", steps=10**9, resolution=res, num_frames=frames, scenes="any", max_frame_stride=1)


def measure(root: str, frames: int, res: int, workers: int, seconds: float, tracks: int = 256) -> dict:
    """Samples/s one rank's loader delivers with ``workers`` DataLoader workers (batch 1)."""
    from training.config import DataConfig
    from training.data import make_loader

    data = DataConfig(root=root, num_workers=workers, shuffle_buffer=4)
    t0 = time.perf_counter()
    it = iter(make_loader(data, _stage(frames, res), 0, tracks, 1, 0, 1))
    next(it)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        batch = next(it)
        n += 1
    dt = time.perf_counter() - t1
    assert batch["video"].shape == (1, frames, 3, res, res)
    del it
    return {"workers": workers, "samples": n, "seconds": dt, "samples_per_s": n / dt, "first_batch_s": first}


def breakdown(root: str, frames: int, res: int, n: int = 3) -> dict:
    """Seconds per sample of each loader step, in one process (the mean of ``n`` samples)."""
    from PIL import Image

    from pipeline.sample_format import decode_depth
    from training.data import DECODE, crop_resize, iter_tar, process, resolve_catalog

    urls = [u for us in resolve_catalog(type("D", (), {"root": root, "shards": []})()).shards.values() for u in us][:n]
    acc: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
        return out

    for url in urls:
        raw = timed("read tar", lambda: next(iter_tar(url)))
        idx = list(range(frames))
        timed(
            "jpeg decode",
            lambda: [np.asarray(Image.open(io.BytesIO(raw[f"rgb.{i:03d}.jpg"])).convert("RGB")) for i in idx],
        )
        timed(
            "depth png decode",
            lambda: [decode_depth(np.asarray(Image.open(io.BytesIO(raw[f"depth.{i:03d}.png"])))) for i in idx],
        )
        clip = timed("decode_sample (all)", lambda: DECODE(raw, idx))
        timed("crop + resize", lambda: crop_resize(clip, res))
        timed(
            "process (all: crop, resize, tracks, tensors)",
            lambda: process(clip, idx, res, 256, np.random.default_rng(0)),
        )
    return {k: v / len(urls) for k, v in acc.items()}


def render_md(res: dict) -> str:
    s = res["shards"]
    lines = [
        f"# bench_loader ({res['host']}, {res['cpus']} CPUs, torch {res['torch']})",
        "",
        f"{s['clips']} clips of {s['frames']} frames at {s['src']}², JPEG {s['jpeg_kb_mean']:.0f} kB and depth PNG "
        f"{s['depth_png_kb_mean']:.0f} kB per frame; loader output {res['frames']} x {res['res']}², batch 1, one rank.",
        "",
        "| workers | samples/s | s per sample per worker | first batch (s) |",
        "|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['workers']} | {r['samples_per_s']:.2f} | {max(r['workers'], 1) / r['samples_per_s']:.2f} | "
            f"{r['first_batch_s']:.1f} |"
        )
    lines += ["", "| step (one process) | s per sample |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in res["breakdown"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shards", help="an existing bench shard dir (default: written into --work or a temp dir)")
    ap.add_argument("--work", help="where to write the shards (default: a temporary directory)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--src", type=int, default=512)
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args(argv)
    import tempfile

    import torch

    os.makedirs(a.out, exist_ok=True)
    root = a.shards or os.path.join(a.work or tempfile.mkdtemp(prefix="bench_loader_"), "shards_loader")
    t0 = time.perf_counter()
    if a.shards and os.path.exists(os.path.join(root, "index.parquet")):
        shards = json.load(open(os.path.join(root, "shards.json")))
    else:
        shards = write_shards(root, a.clips, a.frames, a.src)
        json.dump(shards, open(os.path.join(root, "shards.json"), "w"))
    res = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "frames": a.frames,
        "res": a.res,
        "shards": shards,
        "write_s": time.perf_counter() - t0,
        "runs": [],
    }
    res["breakdown"] = breakdown(root, a.frames, a.res)
    for w in (int(x) for x in a.workers.split(",")):
        res["runs"].append(measure(root, a.frames, a.res, w, a.seconds))
        print(f"[bench_loader] {res['runs'][-1]}", flush=True)
        with open(os.path.join(a.out, "bench_loader.json"), "w") as f:
            json.dump(res, f, indent=1)
    md = render_md(res)
    with open(os.path.join(a.out, "bench_loader.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
