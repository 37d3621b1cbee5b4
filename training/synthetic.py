"""Tiny synthetic clips and shards for tests, ``bench_train.py --quick`` and smoke runs.

A clip is rendered with the reference rasteriser from a backdrop wall of Gaussians plus a few
foreground blobs (moving when ``dynamic``) seen from a camera sliding sideways, so rgb, depth,
cameras and tracks are mutually consistent. Shards are written with ``webdataset.TarWriter`` in the
sample format of :mod:`pipeline.sample_format` (via :data:`training.data.ENCODE`), plus
``index.parquet`` (key, shard, dataset) like a build's OUT.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from pipeline.clip import Clip, ClipMeta
from training.render_torch import rasterize


def make_clip(
    seed: int,
    t: int = 9,
    size: int = 64,
    dynamic: bool = False,
    dataset: str = "synth",
    n_fg: int = 12,
    device: str = "cpu",
) -> Clip:
    """One synthetic clip (module docs); ``device`` only says where it is rendered (same clip anywhere)."""
    g = torch.Generator().manual_seed(seed)
    gx, gy = torch.meshgrid(torch.linspace(-3, 3, 24), torch.linspace(-3, 3, 24), indexing="ij")
    wall = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.full((576,), 5.0)], -1)
    wall_col = 0.5 + 0.4 * torch.stack([torch.sin(gx * 1.3), torch.cos(gy * 1.1), torch.sin(gx + gy)], -1).reshape(
        -1, 3
    )
    fg = torch.rand(n_fg, 3, generator=g) * torch.tensor([2.4, 2.4, 1.5]) + torch.tensor([-1.2, -1.2, 2.0])
    fg_col = torch.rand(n_fg, 3, generator=g)
    vel = (torch.rand(n_fg, 3, generator=g) - 0.5) * 0.1 if dynamic else torch.zeros(n_fg, 3)
    f = size * 1.1
    intr = np.tile(np.array([f, f, size / 2, size / 2]), (t, 1))
    c2w = np.tile(np.eye(4), (t, 1, 1))
    c2w[:, 0, 3] = np.linspace(-0.3, 0.3, t) + float(torch.rand(1, generator=g)) * 0.2
    c2w[:, 1, 3] = np.linspace(0.0, 0.1, t)
    rgbs, depths, valids, tracks, vis = [], [], [], [], []
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])[None]
    for i in range(t):
        fg_i = fg + vel * i
        means = torch.cat([wall, fg_i])
        n = means.shape[0]
        scales = torch.cat([torch.full((576, 3), 0.17), torch.full((n_fg, 3), 0.18)])
        quats = torch.tensor([1.0, 0, 0, 0]).expand(n, 4)
        opac = torch.cat([torch.full((576,), 0.99), torch.full((n_fg,), 0.95)])
        cols = torch.cat([wall_col, fg_col])
        vm = torch.linalg.inv(torch.tensor(c2w[i], dtype=torch.float32))[None]
        rgb, dep, alp = (
            x.cpu() for x in rasterize(*(a.to(device) for a in (means, quats, scales, opac, cols, vm, K)), size, size)
        )
        rgbs.append((rgb[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        ed = (dep[0] / alp[0].clamp_min(1e-4)).numpy().astype(np.float32)
        valids.append(alp[0].numpy() > 0.9)
        depths.append(np.where(valids[-1], ed, 0).astype(np.float32))
        tracks.append(fg_i.numpy().astype(np.float32))
        cam = (fg_i - torch.tensor(c2w[i, :3, 3], dtype=torch.float32)).numpy()
        u = f * cam[:, 0] / cam[:, 2] + size / 2
        v = f * cam[:, 1] / cam[:, 2] + size / 2
        vis.append((u >= 0) & (u < size) & (v >= 0) & (v < size))
    meta = ClipMeta(
        dataset=dataset,
        scene=f"s{seed}",
        clip_id=f"{dataset}__s{seed}__0",
        frame_indices=list(range(t)),
        dynamic=dynamic,
        real=False,
        depth_source="gt",
        track_source="gt",
    )
    return Clip(
        meta=meta,
        rgb=np.stack(rgbs),
        intrinsics=intr,
        c2w=c2w,
        depth=np.stack(depths),
        depth_valid=np.stack(valids),
        tracks=np.stack(tracks),
        track_visible=np.stack(vis),
    ).validate()


def write_shards(
    out: str,
    n_clips: int = 8,
    per_shard: int = 2,
    t: int = 9,
    size: int = 64,
    datasets: tuple[str, ...] = ("synth_static", "synth_dynamic"),
    dynamic: Callable[[str, int], bool] | None = None,
    caption: Callable[[str, int], str | None] | None = None,
    device: str = "cpu",
    val: Callable[[str, int], bool] | None = None,
    seed_offset: int = 0,
) -> list[str]:
    """Write ``out/shards/shard-XXXXXX.tar`` and ``out/index.parquet``; returns shard paths.

    Clip ``i`` goes to dataset ``datasets[i % len(datasets)]``; it is dynamic when ``dynamic(ds, i)``
    (default: the dataset's name contains "dynamic") and carries ``caption(ds, i)`` in ``meta.json``
    when that is not None. The index has a build's columns (key, dataset, shard_path, byte offset of
    the sample's first member, num_frames, dynamic, scene, split): clip ``i`` is a held-out scene (split
    ``val``) when ``val(ds, i)``. Clip ``i`` is rendered from seed ``seed_offset + i``.
    """
    import json
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from training.data import ENCODE

    dynamic = dynamic or (lambda ds, i: "dynamic" in ds)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    rows, paths = [], []
    by_ds = {ds: [i for i in range(n_clips) if i % len(datasets) == k] for k, ds in enumerate(datasets)}
    shard_no = 0
    for ds, ids in by_ds.items():  # shards hold one dataset each, like a build's
        for s0 in range(0, len(ids), per_shard):
            path = os.path.join(out, "shards", f"shard-{shard_no:06d}.tar")
            shard_no += 1
            written = []
            with wds.TarWriter(path) as sink:
                for i in ids[s0 : s0 + per_shard]:
                    clip = make_clip(seed_offset + i, t=t, size=size, dynamic=dynamic(ds, i), dataset=ds, device=device)
                    sample = ENCODE(clip)
                    text = caption(ds, i) if caption else None
                    if text is not None:
                        meta = json.loads(sample["meta.json"])
                        meta["caption"] = text
                        sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
                    sink.write(sample)
                    written.append((i, clip))
            with tarfile.open(path) as tar:  # each sample's first member header
                offsets: dict[str, int] = {}
                for m in tar.getmembers():
                    offsets.setdefault(m.name.split(".", 1)[0], m.offset)
            for i, clip in written:
                rows.append(
                    {
                        "key": clip.key,
                        "dataset": ds,
                        "shard_path": os.path.relpath(path, out),
                        "offset": offsets[clip.key],
                        "num_frames": clip.rgb.shape[0],
                        "dynamic": bool(clip.meta.dynamic),
                        "scene": clip.meta.scene,
                        "split": "val" if val is not None and val(ds, i) else "train",
                    }
                )
            paths.append(path)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, "index.parquet"))
    return paths
