"""End-to-end training on CPU: curriculum stages under Ray (gloo, 2 workers), overfitting, kill-and-resume, CLI."""

import json
import os

import pytest
import torch

from training.config import make_config
from training.synthetic import write_shards
from training.trainer import latest_checkpoint, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_shards")
    write_shards(str(out), n_clips=4, per_shard=1, t=9, size=32)
    return str(out)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _stages(n):
    cfg = make_config("tiny")
    return [s.model_copy(update={"steps": n}).model_dump() for s in cfg.stages]


def test_curriculum_stages_ray_two_workers(shards, tmp_path):
    cfg = make_config(
        "tiny",
        data={"root": shards},
        workdir=str(tmp_path / "w"),
        stages=_stages(2),
        runtime={"launcher": "ray", "num_workers": 2, "ckpt_every": 100},
    )
    train(cfg)
    rows = _metrics(cfg.workdir)
    assert [r["stage"] for r in rows] == ["static"] * 2 + ["static_hi"] * 2 + ["dynamic"] * 2
    assert all("motion" in r for r in rows[4:]) and not any("motion" in r for r in rows[:4])
    # the curriculum as described: static stages photometric + geometric only, the dynamic stage all four
    assert all("photo" in r and "geo" in r for r in rows) and not any("fm" in r for r in rows[:4])
    assert all("fm" in r for r in rows[4:])
    assert all(r["loss"] == r["loss"] and r["loss"] < 1e3 for r in rows)  # finite
    assert latest_checkpoint(cfg.workdir).endswith("step-00000006.pt")
    import importlib.util

    # TensorBoard event files are written when the optional `tensorboard` package is installed
    # (extra `[train]`); without it the trainer logs metrics.jsonl only.
    assert os.path.isdir(os.path.join(cfg.workdir, "tb")) == (importlib.util.find_spec("tensorboard") is not None)


def test_overfit_one_clip_photometric_loss_falls(tmp_path):
    out = tmp_path / "one"
    write_shards(str(out), n_clips=1, per_shard=1, t=5, size=24, datasets=("synth_static",))
    stage = dict(
        name="overfit",
        steps=40,
        resolution=24,
        num_frames=5,
        scenes="any",
        frozen=["deformation"],
        losses=["photo"],
        max_frame_stride=1,
    )
    cfg = make_config(
        "tiny",
        data={"root": str(out)},
        workdir=str(tmp_path / "w"),
        stages=[stage],
        ldrm={"clean_latent_prob": 1.0, "dim": 64, "decoder_channels": 32},
        loss={"render_frames": 5},
        optim={"lr": 5e-3},
        runtime={"launcher": "local", "num_workers": 1, "ckpt_every": 1000, "tensorboard": False},
    )
    train(cfg)
    photo = [r["photo"] for r in _metrics(cfg.workdir)]
    first, last = sum(photo[:5]) / 5, sum(photo[-5:]) / 5
    assert last < 0.6 * first, (first, last)  # measured: the last 5 at ~0.33x the first 5 after 40 steps


def test_kill_and_resume_matches_uninterrupted(shards, tmp_path):
    base = dict(
        data={"root": shards},
        stages=_stages(3),
        runtime={"launcher": "local", "num_workers": 1, "ckpt_every": 2, "tensorboard": False},
    )
    ref = make_config("tiny", workdir=str(tmp_path / "ref"), max_steps=7, **base)
    train(ref)
    crash = make_config(
        "tiny",
        workdir=str(tmp_path / "crash"),
        max_steps=7,
        **{**base, "runtime": {**base["runtime"], "crash_at_step": 5}},
    )
    with pytest.raises(Exception, match="injected crash"):
        train(crash)
    assert latest_checkpoint(crash.workdir).endswith("step-00000004.pt")  # step 5 was lost with the crash
    train(crash.model_copy(update={"runtime": crash.runtime.model_copy(update={"crash_at_step": None})}))
    a = {r["step"]: r["loss"] for r in _metrics(ref.workdir)}
    rows = _metrics(crash.workdir)
    b = {r["step"]: r["loss"] for r in rows}  # the resumed run's later rows overwrite the crashed step 5
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5, 6, 7]
    for s in range(1, 8):
        assert abs(a[s] - b[s]) < 1e-5 * max(1.0, abs(a[s])), (s, a[s], b[s])


def test_cli_resume(shards, tmp_path, capsys):
    from training.cli import train_main

    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(
        f"preset: tiny\ndata: {{root: {shards}}}\n"
        "runtime: {launcher: local, num_workers: 1, ckpt_every: 1, tensorboard: false}\n"
    )
    wd = str(tmp_path / "w")
    assert train_main(str(cfgfile), None, 1, wd) == 0
    assert "starting" in capsys.readouterr().out
    assert train_main(str(cfgfile), None, 2, wd) == 0
    out = capsys.readouterr().out
    assert "resumed from checkpoint" in out and "step 1" in out
    assert latest_checkpoint(wd).endswith("step-00000002.pt")
    assert train_main(None, None, None, wd) == 2  # neither a config nor --demo


@pytest.mark.slow
def test_cli_demo_ray(shards, tmp_path, capsys):
    from training.cli import train_main

    wd = str(tmp_path / "demo")
    assert train_main(None, shards, 2, wd) == 0
    assert train_main(None, shards, 3, wd) == 0
    assert "resumed from checkpoint" in capsys.readouterr().out


def test_logged_lr_is_the_steps_and_a_workdir_of_another_model_is_refused(shards, tmp_path):
    """``metrics.jsonl``'s ``lr`` is the rate the step used (it was the next step's); resuming a
    workdir whose checkpoint is of another model (weight-shaping fields differ) is refused naming
    the fields (a changed head count resumed silently, re-splitting the weights; a changed width
    was torch's size-mismatch traceback)."""
    from training.load import CheckpointError

    cfg = make_config(
        "tiny",
        workdir=str(tmp_path / "w"),
        max_steps=3,
        data={"root": shards},
        stages=_stages(3),
        optim={"lr": 1e-3, "warmup_steps": 4},
        runtime={"launcher": "local", "num_workers": 1, "ckpt_every": 1, "tensorboard": False},
    )
    train(cfg)
    assert [r["lr"] for r in _metrics(cfg.workdir)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    other = cfg.model_copy(update={"ldrm": cfg.ldrm.model_copy(update={"heads": 2 * cfg.ldrm.heads}), "max_steps": 4})
    with pytest.raises(CheckpointError, match="ldrm.heads"):
        train(other)


def test_validation_setup_leaves_the_random_state_alone(shards, monkeypatch):
    """Building LPIPS for validation draws random numbers (its layers' initialisation). It runs after
    a resume restored the random state, so a resumed run drew different numbers from the
    uninterrupted one from there on; it now runs on a forked random state."""
    import training.metrics as metrics
    from training.trainer import _validation_setup

    monkeypatch.setattr(metrics, "load_lpips", lambda *a, **k: (torch.nn.Linear(64, 64), None))
    cfg = make_config("tiny", data={"root": shards}, validation={"every": 1000})
    before = torch.get_rng_state()
    _validation_setup(cfg, 0, 1, torch.device("cpu"), None, None)
    assert torch.equal(torch.get_rng_state(), before)
