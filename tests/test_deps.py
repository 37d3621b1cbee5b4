"""Declared packages (pipeline/deps.py): a missing one stops `d4s build`, `d4s plan` and `d4s train`
before any work, with every missing package listed and how to install it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.config import BuildConfig
from pipeline.deps import NEEDS, MissingPackages, build_needs, check

ROOT = Path(__file__).resolve().parents[1]


def simulate_missing(monkeypatch, *modules: str) -> None:
    """Make ``import m`` fail and ``find_spec(m)`` return None, as on a machine without them."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def _cfg(tmp_path, **datasets) -> BuildConfig:
    return BuildConfig.model_validate(
        {
            "output": str(tmp_path / "out"),
            "datasets": {n: {"root": str(tmp_path / n), **o} for n, o in datasets.items()},
        }
    )


def test_build_stops_before_planning_and_lists_every_missing_package(tmp_path, monkeypatch):
    import pipeline.runner as runner

    simulate_missing(monkeypatch, "OpenEXR", "av")
    started = []
    monkeypatch.setattr(runner, "make_plan", lambda cfg: started.append("plan"))
    monkeypatch.setattr(runner, "ShardDAG", lambda *a: started.append("ray"))
    cfg = _cfg(
        tmp_path,
        matrixcity={},
        stereo4d={},
        realestate10k={"depth_source": "vda_metric"},
        tartanair={"track_source": "none"},
    )
    with pytest.raises(MissingPackages) as exc:
        runner.build(cfg, show_progress=False)
    msg = str(exc.value)
    assert started == [] and not (tmp_path / "out").exists()  # no plan, no Ray, nothing written
    assert "pip install 'OpenEXR>=3.2'" in msg and "dataset matrixcity" in msg
    assert "pip install 'av>=12'" in msg and "dataset stereo4d" in msg and "dataset realestate10k" in msg
    assert msg.count("  - ") == 2  # each package once, however many datasets need it
    assert msg.splitlines()[-1] == "install them all: pip install 'OpenEXR>=3.2' 'av>=12'"


def test_only_what_the_config_uses_is_required(tmp_path, monkeypatch):
    simulate_missing(monkeypatch, "OpenEXR", "av", "h5py", "gsplat")
    check(build_needs(_cfg(tmp_path, tartanair={"track_source": "none"}, vkitti2={})), "d4s build")  # no error
    with pytest.raises(MissingPackages, match="h5py"):
        check(build_needs(_cfg(tmp_path, spring={})), "d4s build")


def test_object_store_roots_and_outputs_need_their_filesystem(tmp_path, monkeypatch):
    simulate_missing(monkeypatch, "s3fs", "gcsfs")
    cfg = BuildConfig.model_validate(
        {"output": "s3://bucket/out", "datasets": {"tartanair": {"root": "gs://b/tartanair", "track_source": "none"}}}
    )
    with pytest.raises(MissingPackages) as exc:
        check(build_needs(cfg), "d4s build")
    msg = str(exc.value)
    assert "pip install 's3fs>=2024.6'" in msg and "the output" in msg
    assert "pip install 'gcsfs>=2024.6'" in msg and "dataset tartanair (root)" in msg


def test_plan_command_lists_missing_packages(tmp_path, monkeypatch):
    from pipeline.cli import app

    simulate_missing(monkeypatch, "OpenEXR")
    p = tmp_path / "c.yaml"
    p.write_text(_cfg(tmp_path, matrixcity={}).to_yaml())
    res = CliRunner().invoke(app, ["plan", str(p)])
    assert res.exit_code == 2, res.output
    assert "pip install 'OpenEXR>=3.2'" in res.output and "dataset matrixcity" in res.output


def test_trainer_lists_missing_packages_before_training(tmp_path, monkeypatch, capsys):
    import training.trainer
    from training.cli import train_main
    from training.config import make_config

    simulate_missing(monkeypatch, "gsplat", "lpips")
    monkeypatch.setattr(training.trainer, "train", lambda cfg: pytest.fail("training started"))
    cfg = make_config(
        "tiny",
        data={"root": str(tmp_path)},
        workdir=str(tmp_path / "w"),
        runtime={"renderer": "gsplat"},
        loss={"lpips_enabled": True},
    )
    p = tmp_path / "train.yaml"
    import yaml

    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert train_main(str(p)) == 2
    err = capsys.readouterr().err
    assert "pip install 'gsplat>=1.4'" in err and "runtime.renderer" in err
    assert "pip install 'lpips'" in err and "loss.lpips_enabled" in err


def test_declared_pip_requirements_are_the_projects_own():
    """The advice installs what pyproject.toml pins (a dependency or an extra), never a guess."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = set(meta["dependencies"]) | {r for extra in meta["optional-dependencies"].values() for r in extra}
    names = {re.split(r"[<>=\[]", r)[0].lower(): r for r in pinned}
    for key, reqs in NEEDS.items():
        for r in reqs:
            if r.pip in ("lpips", "torchvision", "torchcodec"):  # installed by hand against the torch build
                continue
            assert r.pip in pinned or names.get(r.pip.split("[")[0].lower()) == r.pip, (key, r.pip)


def test_a_video_decoder_only_where_the_dataset_can_read_videos(tmp_path):
    """RealEstate10K read from extracted frames decodes no video: the preflight must not ask for PyAV
    there (it stopped the scene-pass benchmark on a GPU image without PyAV); from videos it must."""
    frames = {"depth_source": "vda_metric", "options": {"form": "camera_files", "frames": "images"}}
    assert "av" not in {n.req.module for n in build_needs(_cfg(tmp_path, realestate10k=frames))}
    auto = {"depth_source": "vda_metric"}
    assert "av" in {n.req.module for n in build_needs(_cfg(tmp_path, realestate10k=auto))}
    assert "av" in {n.req.module for n in build_needs(_cfg(tmp_path, stereo4d={}))}
