"""``d4s plan --full-build`` / ``--counts FILE``: the capacity model applied to a table of scene
and frame counts instead of data on disk (the full-build figures in docs/CLUSTER.md come from
:data:`FULL_BUILD_COUNTS`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.capacity.costs import load_costs
from pipeline.capacity.rows import assemble_report, dataset_row, pass_frames
from pipeline.capacity.text import human_bytes
from pipeline.config import BuildConfig, ConfigError

#: Estimated composition of a ~130k-scene build (the size of the Diff4Splat training set): the
#: full releases as documented in docs/datasets/*.md and shared/datasets/FORMATS.md, with
#: Stereo4D taking the remainder up to 130,000 scenes (the paper's own split is not known here).
#: ``frames_per_scene`` is a release's frame count divided by its scene count (a mean: scenes of
#: unequal length give a few more or fewer clips). These are ESTIMATES, not counts of real data.
FULL_BUILD_COUNTS: list[dict] = [
    {
        "dataset": "tartanair",
        "scenes": 370,
        "frames_per_scene": 2700,
        "source": "~370 trajectories, ~1M frames per camera (docs/datasets/tartanair.md)",
    },
    {
        "dataset": "matrixcity",
        "label": "matrixcity (aerial)",
        "scenes": 32,
        "frames_per_scene": 2100,
        "hw": [1080, 1920],
        "source": "~67k aerial images; ~32 block folders (small city 10+10 test, big city 6+6 test) (docs/datasets/matrixcity.md)",
    },
    {
        "dataset": "matrixcity",
        "label": "matrixcity (street)",
        "scenes": 20,
        "frames_per_scene": 22600,
        "hw": [1000, 1000],
        "source": "~452k street images; ~20 road/area folders over the splits (docs/datasets/matrixcity.md)",
    },
    {
        "dataset": "pointodyssey",
        "scenes": 105,
        "frames_per_scene": 1550,
        "source": "105 videos, ~163k frames (docs/datasets/pointodyssey.md)",
    },
    {
        "dataset": "dynamic_replica",
        "scenes": 524,
        "frames_per_scene": 277,
        "source": "524 videos, 145,200 stereo frames; left view only (docs/datasets/dynamic_replica.md)",
    },
    {
        "dataset": "spring",
        "scenes": 37,
        "frames_per_scene": 135,
        "source": "37 train sequences, 5,000 frames per camera (docs/datasets/spring.md)",
    },
    {
        "dataset": "vkitti2",
        "scenes": 50,
        "frames_per_scene": 425,
        "source": "5 scenes x 10 variations, Camera_0, 21,260 frames (docs/datasets/vkitti2.md)",
    },
    {
        "dataset": "kubric_movi_f",
        "scenes": 6000,
        "frames_per_scene": 24,
        "source": "about 6k videos of 24 frames at 512x512 (docs/datasets/kubric_movi_f.md)",
    },
    {
        "dataset": "realestate10k",
        "scenes": 67000,
        "frames_per_scene": 135,
        "source": "~67k train sequences, ~10M frames over ~74k sequences (docs/datasets/realestate10k.md)",
    },
    {
        "dataset": "stereo4d",
        "scenes": 55862,
        "frames_per_scene": 128,
        "source": "remainder to 130,000 of ~100k released clips; 128 frames per clip assumed (not documented here)",
    },
]


def _default_cfg(names: list[str]) -> BuildConfig:
    return BuildConfig.model_validate(
        {"output": "<projection>", "datasets": {n: {"root": "<not read>"} for n in names}}
    )


def projection_from_counts(
    counts: list[dict], cfg: BuildConfig | None = None, costs: str | Path | dict | None = None
) -> dict:
    """The capacity report for a table of counts instead of data on disk.

    Each row: ``dataset``, ``scenes``, ``frames_per_scene``, optional ``label``, ``hw`` ([H, W];
    default: the nominal size in the costs file), ``gt_tracks`` and ``source``. Clips per scene
    follow the planner's rule (:func:`pipeline.plan.clip_starts`, ``max_clips_per_scene``) with the
    config's (default: the adapters') clip settings, and the default stage settings unless ``cfg``
    is given (its datasets must include every row's dataset; its roots are not read).
    """
    from pipeline.plan import clip_starts
    from pipeline.stage_routes import whole_scene_shards

    c = load_costs(costs)
    names = sorted({r["dataset"] for r in counts})
    cfg = (cfg or _default_cfg(names)).resolved()
    missing = [n for n in names if n not in cfg.datasets]
    if missing:
        raise ConfigError(f"projection: datasets {missing} are not in the config")
    rows = []
    for r in counts:
        name = r["dataset"]
        ds = cfg.datasets[name]
        nhw, nn = None, 0
        if not r.get("hw") or ("gt_tracks" not in r and ds.track_source == "gt"):
            nhw, nn, _ = c.nominal(name)
        hw = tuple(r.get("hw") or nhw)
        n_scenes = int(r["scenes"])
        if ds.max_scenes:
            n_scenes = min(n_scenes, ds.max_scenes)
        starts = clip_starts(int(r["frames_per_scene"]), ds.clip_length, ds.frame_stride, ds.clip_stride)
        if ds.max_clips_per_scene:
            starts = starts[: ds.max_clips_per_scene]
        per_scene = len(starts)
        clips = n_scenes * per_scene
        one_scene = [[s + i * ds.frame_stride for i in range(ds.clip_length)] for s in starts]
        shards = -(-clips // cfg.shard_size)
        if whole_scene_shards(cfg, name) and per_scene:  # whole scenes per shard (pipeline/plan.py)
            shards = -(-n_scenes // max(1, cfg.shard_size // per_scene))
        rows.append(
            dataset_row(
                name,
                cfg,
                c,
                scenes=n_scenes,
                clips=clips,
                shards=shards,
                image_hw=hw,
                gt_tracks=int(r.get("gt_tracks", nn)),
                hw_source="counts table" if r.get("hw") else "nominal (counts table)",
                label=r.get("label"),
                passes=pass_frames(cfg, name, [one_scene] * n_scenes),
            )
        )
    notes = [
        "Counts are a table of estimates, not read from data: "
        + "; ".join(
            f"{r.get('label', r['dataset'])}: {r['scenes']:,} scenes x {r['frames_per_scene']:,} frames"
            + (f" ({r['source']})" if r.get("source") else "")
            for r in counts
        )
    ]
    return assemble_report(cfg, c, rows, notes, mode="projection")


def full_build_markdown(costs: str | Path | dict | None = None) -> str:
    """The docs/CLUSTER.md table of the ~130k-scene projection (``d4s plan --full-build --markdown``)."""
    rep = projection_from_counts(FULL_BUILD_COUNTS, costs=costs)
    lines = [
        "| dataset | scenes | frames/scene | image | clips | frames | output | depth GPU-h | tracks GPU-h "
        "| MegaSaM GPU-h | MegaSaM cache | CPU core-h |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fps = {r.get("label", r["dataset"]): r["frames_per_scene"] for r in FULL_BUILD_COUNTS}

    def num(x):
        return f"{x:,.1f}" if x >= 1 or x == 0 else f"{x:.2f}"

    def h(r, k):
        return num(r["gpu_hours"][k]) if k in r["model_stages"] else "-"

    for r in rep["datasets"]:
        lines.append(
            f"| {r['label']} | {r['scenes']:,} | {fps[r['label']]:,} | {r['image_hw'][1]}x{r['image_hw'][0]} "
            f"| {r['clips']:,} | {r['frames']:,} | {human_bytes(r['output_bytes'])} | {h(r, 'depth')} "
            f"| {h(r, 'tracks')} | {h(r, 'megasam')} "
            f"| {human_bytes(r['megasam_cache_bytes']) if r['megasam_cache_bytes'] else '-'} "
            f"| {num(r['cpu_core_hours']['total'])} |"
        )
    t = rep["totals"]
    g = t["gpu_hours"]
    lines.append(
        f"| **total** | **{t['scenes']:,}** | | | **{t['clips']:,}** | **{t['frames']:,}** "
        f"| **{human_bytes(t['output_bytes'])}** | **{num(g['depth'])}** | **{num(g['tracks'])}** "
        f"| **{num(g['megasam'])}** | **{human_bytes(t['megasam_cache_bytes'])}** "
        f"| **{num(t['cpu_core_hours']['total'])}** |"
    )
    return "\n".join(lines)
