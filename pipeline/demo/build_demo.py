"""``d4s build --demo OUT``: render miniature scenes, write them in each dataset's raw layout
under ``OUT/demo_data/<dataset>/``, and return a config that builds them into ``OUT``.

The demo exercises the same adapters and stages as a real build. Where a dataset needs a model
(depth or tracks for the real datasets) the demo opts into random weights explicitly; every such
sample says so in ``meta.untrained_models``. Clips stay small (8 frames); the RealEstate10K and
Stereo4D scenes give two overlapping clips each, so their scene passes (one depth pass and one
metric fit per scene) show in ``meta.json``: ``qc.align.scale`` (and RealEstate10K's
``extra.pose_scale``) are equal over the clips of a scene.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.config import BuildConfig, ConfigError
from pipeline.demo.render import render
from pipeline.demo.writers import WRITERS, writer_module

DEMO_SCENES_PER_DATASET = 2
SCENE_PASS_DEMOS = ("realestate10k", "stereo4d")


def available_demo_datasets() -> list[str]:
    """Datasets that have both a fixture writer and an adapter in this checkout."""
    from stages.ingest import ADAPTERS

    out = []
    for name in WRITERS:
        mod = ADAPTERS[name].split(":")[0]
        if importlib.util.find_spec(f"pipeline.demo.writers.{name}") and importlib.util.find_spec(mod):
            out.append(name)
    return out


def write_demo_data(
    root: Path, datasets: list[str], scenes: int = DEMO_SCENES_PER_DATASET, seed: int = 0, truth_dir: Path | None = None
) -> None:
    """Render and write each dataset's scenes once; a marker makes re-runs skip finished ones.

    ``truth_dir``: also keep each RealEstate10K scene's rendered truth there, where the MegaSaM
    stand-in (``pipeline/demo/megasam_stand_in.py``) finds it."""
    from pipeline.demo.megasam_stand_in import save_truth
    from pipeline.plan import key_safe

    for di, name in enumerate(datasets):
        droot = root / name
        marker = droot / ".d4s-demo-complete"
        keep_truth = truth_dir is not None and name == "realestate10k"
        if marker.exists() and (not keep_truth or (truth_dir / f".{name}-complete").exists()):
            continue
        w = writer_module(name)
        for i in range(scenes):
            spec = w.demo_spec(i, seed=seed * 1000 + di * 100 + i)
            rendered = render(spec)
            if hasattr(w, "demo_write"):  # writers whose demo scenes use several of the dataset's forms
                ws = w.demo_write(rendered, droot, i)
            else:
                ws = w.write(rendered, droot, w.default_scene_id(i))
            if keep_truth:
                save_truth(truth_dir, key_safe(ws.scene_id), rendered)
        marker.write_text("ok\n")
        if keep_truth:
            (truth_dir / f".{name}-complete").write_text("ok\n")


def demo_config(
    out: str,
    datasets: list[str] | None = None,
    scenes: int = DEMO_SCENES_PER_DATASET,
    megasam_stand_in: bool = False,
    megasam_delay_s: float = 0.0,
) -> BuildConfig:
    """The demo's config. ``megasam_stand_in``: RealEstate10K takes MegaSaM as its reference, played
    by the stand-in program answering the rendered truth (for chaos runs and benchmarks), each
    run taking ``megasam_delay_s``."""
    out_path = Path(out).resolve()
    if out_path.exists() and not out_path.is_dir():
        raise ConfigError(f"output {out_path} is not a folder (a file is there)")
    datasets = datasets or available_demo_datasets()
    data_root = out_path / "demo_data"
    truth = out_path / "demo_truth" if megasam_stand_in else None
    write_demo_data(data_root, datasets, scenes, truth_dir=truth)
    raw = {
        "output": str(out_path),
        "shard_size": 2,
        "jpeg_quality": 95,
        "max_inflight_shards": 4,
        "datasets": {
            name: {
                "root": str(data_root / name),
                "clip_length": 8,
                "frame_stride": 1,
                # the two real datasets plan two overlapping clips per scene, so the demo shows
                # one scene pass (one metric scale) shared by the clips of a scene
                "clip_stride": 2 if name in SCENE_PASS_DEMOS else 4,
                # No MegaSaM in the demo: RealEstate10K takes the metric VDA prediction as its reference.
                **({"depth_source": "vda_metric"} if name == "realestate10k" else {}),
                "options": dict(getattr(writer_module(name), "DEMO_OPTIONS", {})),
            }
            for name in datasets
        },
        "stages": {
            "depth": {
                "encoder": "vits",
                "metric": True,
                "input_size": 112,
                "dtype": "fp32",
                "allow_random_weights": True,
                "resources": {"num_gpus": 0, "actors": 1},
            },
            # Random-weight models give meaningless depth: keep such clips (flagged untrained, QC
            # recorded in meta) instead of dropping them, so the demo shows every layout end to end.
            "align": {"drop_on_qc": False},
            "tracks": {
                "grid_size": 4,
                "dtype": "fp32",
                "allow_random_weights": True,
                "drop_on_qc": False,
                "resources": {"num_gpus": 0, "actors": 1},
            },
        },
    }
    if megasam_stand_in:
        from pipeline.demo.megasam_stand_in import command_template

        if "realestate10k" in raw["datasets"]:
            raw["datasets"]["realestate10k"]["depth_source"] = "megasam"
        raw["stages"]["align"].update(
            megasam_command=command_template(truth, delay_s=megasam_delay_s), megasam_retries=1, megasam_num_gpus=0.0
        )
    return BuildConfig.model_validate(raw)
