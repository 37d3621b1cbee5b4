"""A small d4s output written without Ray, for the gallery and ``d4s show`` tests.

Clips are rendered by the demo renderer (exact depth, cameras and 3D tracks), encoded by the real
sample encoder and tar writer, and recorded in a plan and a ledger as a build records them, so
the readers under test see exactly what a build leaves behind, in well under a second.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from manifests.store import ManifestStore
from pipeline.clip import Clip, ClipMeta
from pipeline.demo.render import random_scene, render
from pipeline.sample_format import encode_clip
from pipeline.storage import Store
from stages.write import shard_bytes

FAILED_REASON = 'align QC: residual 0.9 > 0.2 <b>&"x"'


def rendered_clip(
    dataset: str, scene: str, seed: int, frames: int = 8, qc: dict | None = None, untrained: list[str] | None = None
) -> Clip:
    r = render(random_scene(scene, seed=seed, dynamic=True, num_frames=frames, height=24, width=32, num_tracks=12))
    meta = ClipMeta(
        dataset,
        scene,
        f"{dataset}__{scene}__000000",
        list(range(3, 3 + frames)),
        True,
        False,
        depth_source="gt",
        track_source="gt",
        untrained_models=list(untrained or []),
        qc=dict(qc or {}),
    )
    return Clip(
        meta, r.rgb, r.intrinsics, r.c2w, r.depth, r.depth > 0, r.tracks_world.astype(np.float32), r.tracks_visible
    )


def write_output(root: Path | str) -> dict:
    """Two datasets: ``pointodyssey`` (3 clips in 2 shards) and ``spring`` (1 clip written, 1 failed),
    under ``root/out`` (a folder, or an object-store URL).

    Returns ``{"output": path, "clips": {key: Clip}, "failed": clip_id}``.
    """
    out = f"{root}/out" if "://" in str(root) else root / "out"
    store = Store(str(out))
    ms = ManifestStore(store)
    po = [
        rendered_clip(
            "pointodyssey",
            f"scene{i}",
            seed=10 + i,
            qc={"tracks_visible_fraction": 0.9 - 0.1 * i, "per_frame_error": [0.1, 0.2, 0.3]},
        )
        for i in range(3)
    ]
    sp = rendered_clip(
        "spring",
        "s0",
        seed=20,
        untrained=["cotracker3"],
        qc={"align": {"residual": 0.0123, "keep": False, "reference": "vda_metric"}},
    )
    failed_id = "spring__s1__000000"
    layout = [
        ("pointodyssey-000000", "pointodyssey", po[:2], []),
        ("pointodyssey-000001", "pointodyssey", po[2:], []),
        (
            "spring-000000",
            "spring",
            [sp],
            [{"clip_id": failed_id, "stage": "align", "reason": FAILED_REASON, "path": "/data/<s1>/cam.txt"}],
        ),
    ]
    shards, clips, events = [], [], []
    for shard_id, ds, cs, fails in layout:
        rel = f"shards/{ds}/{shard_id}.tar"
        data, offsets = shard_bytes([encode_clip(c) for c in cs])
        store.write_bytes_atomic(rel, data)
        ids = [c.key for c in cs] + [f["clip_id"] for f in fails]
        shards.append({"shard_id": shard_id, "dataset": ds, "path": rel, "num_clips": len(ids), "clip_ids": ids})
        clips.extend(
            {
                "clip_id": k,
                "ordinal": len(clips) + i,
                "dataset": ds,
                "scene": k.split("__")[1],
                "start": 0,
                "frames": list(range(8)),
                "shard_id": shard_id,
            }
            for i, k in enumerate(ids)
        )
        events.append({"shard_id": shard_id, "state": "running", "build_id": "b1", "started_at": 1.0})
        events.append(
            {
                "shard_id": shard_id,
                "state": "done",
                "build_id": "b1",
                "started_at": 1.0,
                "finished_at": 2.0,
                "samples_written": len(cs),
                "clips_failed": fails,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "samples": [[k, off, c.num_frames, True] for (k, off), c in zip(offsets, cs)],
            }
        )
    ms.write_plan([], clips, shards)
    ms.append_events(events)
    return {"output": str(out), "clips": {c.key: c for c in po + [sp]}, "failed": failed_id}
