"""Measure the ground-truth self-check on the demo renderer's scenes of the seven synthetic datasets.

For each dataset: render its demo scenes (``pipeline.demo.writers.<ds>.demo_spec``) with several
seeds, write them in the dataset's raw layout, read every demo clip window back through the
adapter (so the adapter's own decoding is what is checked), and compute the self-check's
agreement for the clip as read and for the clip with its convention broken in each way the
self-check must catch (poses inverted, camera y/z flipped, rotations transposed, depth in the
wrong unit). The printed table is what ``QCConfig.selfcheck_min_agreement`` was chosen from
(docs/DATASETS.md, "Ground-truth self-check"; bench/RESULTS.md).

Usage: python bench/selfcheck_calibration.py [--seeds 4] [--out DIR]   (CPU, about a minute)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SYNTHETIC = ["tartanair", "matrixcity", "pointodyssey", "dynamic_replica", "spring", "vkitti2", "kubric_movi_f"]
CLIP_LENGTH, CLIP_STRIDE = 8, 4  # the demo build's windows (pipeline/demo/build_demo.py)


def corruptions():
    from pipeline import geometry as geo
    from stages.selfcheck import _transpose_rotations

    return {
        "as read": lambda c2w, d: (c2w, d),
        "inverted pose": lambda c2w, d: (geo.invert_pose(c2w), d),
        "flipped y/z": lambda c2w, d: (c2w @ geo.GL_TO_CV, d),
        "transposed rotation": lambda c2w, d: (_transpose_rotations(c2w), d),
        "depth x1000 (mm as m)": lambda c2w, d: (c2w, d * 1000.0),
        "depth x100 (cm as m)": lambda c2w, d: (c2w, d * 100.0),
        "depth /1000 (m as mm)": lambda c2w, d: (c2w, d / 1000.0),
    }


def clips_of(dataset: str, root: Path, seeds: int):
    """Every demo clip window of ``seeds`` freshly written demo scenes, read by the adapter."""
    from pipeline.clip import ClipMeta
    from pipeline.demo.render import render
    from pipeline.demo.writers import writer_module
    from stages.ingest import get_adapter

    w = writer_module(dataset)
    for i in range(seeds):
        w.write(render(w.demo_spec(i, seed=1000 + 17 * i)), root, w.default_scene_id(i))
    adapter = get_adapter(dataset, str(root))
    for scene in adapter.discover():
        for start in range(0, scene.num_frames - CLIP_LENGTH + 1, CLIP_STRIDE):
            frames = list(range(start, start + CLIP_LENGTH))
            meta = ClipMeta(dataset, scene.scene, f"{scene.scene}:{start}", frames, True, False)
            yield adapter.load_clip(scene, frames, meta)


def release_size_ms(pixels: int) -> float:
    """Cost of one :func:`agreement` on a full-size clip: it samples a fixed number of pixels, so
    only the gathers grow with the frame size."""
    from pipeline.demo.render import default_camera_path, random_scene
    from stages.selfcheck import agreement

    rng = np.random.default_rng(0)
    t, h, w = 16, 720, 1280
    rgb = rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)
    depth = rng.uniform(1.0, 5.0, size=(t, h, w)).astype(np.float32)
    k = np.tile([1244.0, 1244.0, w / 2, h / 2], (t, 1))
    c2w = default_camera_path(random_scene("timing", 0, dynamic=False, num_frames=t))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        agreement(rgb, depth, np.ones(depth.shape, bool), k, c2w, pixels)
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4, help="demo scenes per dataset")
    ap.add_argument("--out", default=None, help="folder for selfcheck_calibration.json / .md")
    args = ap.parse_args()
    from pipeline.config import QCConfig
    from stages.selfcheck import agreement, verdict

    cfg = QCConfig()
    cases = corruptions()
    rows: list[dict] = []
    t0, n_clips = time.time(), 0
    with tempfile.TemporaryDirectory() as tmp:
        for ds in SYNTHETIC:
            for clip in clips_of(ds, Path(tmp) / ds, args.seeds):
                n_clips += 1
                for name, fix in cases.items():
                    c2w, depth = fix(clip.c2w, clip.depth)
                    t1 = time.perf_counter()
                    res = agreement(clip.rgb, depth, clip.depth_valid, clip.intrinsics, c2w, cfg.selfcheck_pixels)
                    rows.append(
                        {
                            "dataset": ds,
                            "case": name,
                            "clip": clip.meta.clip_id,
                            **res,
                            "flagged": verdict(res, cfg) is not None,
                            "ms": 1000 * (time.perf_counter() - t1),
                        }
                    )
    secs = time.time() - t0
    head = (
        f"{n_clips} demo clips ({CLIP_LENGTH} frames), {args.seeds} scenes per dataset; thresholds: agreement >= "
        f"{cfg.selfcheck_min_agreement}, overlap >= {cfg.selfcheck_min_overlap}; {secs:.1f} s in all."
    )
    md = [
        head,
        "",
        "Agreement min / median / max (`-` not judged), flagged clips / clips:",
        "",
        "| dataset | " + " | ".join(cases) + " |",
        "|---|" + "---|" * len(cases),
    ]
    for ds in SYNTHETIC:
        cells = []
        for name in cases:
            sel = [r for r in rows if r["dataset"] == ds and r["case"] == name]
            vals = np.array([r["agreement"] for r in sel if r["agreement"] is not None])
            rng = f"{vals.min():.2f} / {np.median(vals):.2f} / {vals.max():.2f}" if vals.size else "-"
            cells.append(f"{rng}, {sum(r['flagged'] for r in sel)}/{len(sel)}")
        md.append(f"| {ds} | " + " | ".join(cells) + " |")
    good = [r for r in rows if r["case"] == "as read"]
    bad = [r for r in rows if r["case"] != "as read"]
    ga = np.array([r["agreement"] for r in good if r["agreement"] is not None])
    go = np.array([r["overlap"] for r in good])
    missed = [r["agreement"] or 0.0 for r in bad if not r["flagged"]]
    read_line = (
        f"As read: agreement min {ga.min():.3f} (5th percentile {np.percentile(ga, 5):.3f}), neighbour "
        f"overlap min {go.min():.3f}; flagged {sum(r['flagged'] for r in good)}/{len(good)}."
    )
    broken_line = (
        f"Broken conventions: flagged {sum(r['flagged'] for r in bad)}/{len(bad)}; highest agreement of an "
        f"unflagged one: {max(missed):.3f}."
        if missed
        else f"Broken conventions: flagged {len(bad)}/{len(bad)}."
    )
    md += [
        "",
        read_line,
        broken_line,
        f"Time per check (one convention, as read): median {np.median([r['ms'] for r in good]):.1f} ms.",
    ]
    md.append(
        f"Time of one check on a 16-frame 1280x720 clip (release size of Dynamic Replica): "
        f"{release_size_ms(cfg.selfcheck_pixels):.1f} ms (median of 5)."
    )
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "selfcheck_calibration.json").write_text(json.dumps(rows, indent=1))
        (out / "selfcheck_calibration.md").write_text(text)


if __name__ == "__main__":
    main()
