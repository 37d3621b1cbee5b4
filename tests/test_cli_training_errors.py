"""Ordinary bad input to ``d4s train``, ``train-report``, ``eval``, ``generate`` and ``parity``: one line
naming the file or option at fault and exit 2, before any work (no Ray, no model loaded, no evaluation run).
None of these tests starts Ray: ``training.trainer.train`` is replaced by one that fails the test."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import TINY_STAGE, write_tiny_use_inputs
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
STAGE = TINY_STAGE


def _one_line(r, *parts: str) -> str:
    """The output, checked to be one line holding every one of ``parts``, after exit 2."""
    text = r.output.strip()
    assert r.exit_code == 2, r.output
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    for p in parts:
        assert p in text, (p, text)
    return text


@pytest.fixture(scope="module")
def use(tmp_path_factory):
    """A tiny checkpoint, a build-like output (index.parquet; clips 1 and 2 held out) and a 16x16 image."""
    root = tmp_path_factory.mktemp("errs")
    write_tiny_use_inputs(root, step=3)
    return root


@pytest.fixture()
def no_ray(monkeypatch):
    def refuse(cfg):
        raise AssertionError("training started (Ray and its workers) for data that cannot be trained on")

    monkeypatch.setattr("training.trainer.train", refuse)


@pytest.fixture()
def no_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the checkpoint was loaded before the options were checked")

    monkeypatch.setattr("training.load.load_model", refuse)


# --- d4s train ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "empty", "not_d4s", "a_file"])
def test_train_demo_that_is_not_a_build_is_one_line_before_ray(kind, tmp_path, no_ray):
    demo = tmp_path / "demo"
    if kind == "empty":
        demo.mkdir()
    elif kind == "not_d4s":
        demo.mkdir()
        (demo / "notes.txt").write_text("x")
    elif kind == "a_file":
        demo.write_text("x")
    wd = tmp_path / "wd"
    r = runner.invoke(app, ["train", "--demo", str(demo), "--workdir", str(wd), "--max-steps", "1"])
    _one_line(r, "--demo", str(demo))
    assert not wd.exists()  # no WORKDIR/ray: nothing started


def test_train_config_whose_data_resolves_to_nothing(tmp_path, no_ray):
    wd = tmp_path / "wd"
    cases = {
        "root.yaml": (f"preset: tiny\ndata: {{root: {tmp_path / 'nothing'}}}\n", "data.root"),
        "glob.yaml": (f"preset: tiny\ndata: {{shards: ['{tmp_path}/none/*.tar']}}\n", "data.shards"),
        "file.yaml": (f"preset: tiny\ndata: {{shards: ['{tmp_path}/gone.tar']}}\n", "gone.tar"),
        "neither.yaml": ("preset: tiny\n", "data.root"),
    }
    for name, (text, what) in cases.items():
        (tmp_path / name).write_text(text)
        r = runner.invoke(app, ["train", str(tmp_path / name), "--workdir", str(wd)])
        _one_line(r, name, what)
        assert not wd.exists()


def test_train_index_without_training_samples(tmp_path, no_ray):
    from training.synthetic import write_shards

    write_shards(str(tmp_path / "d"), n_clips=1, per_shard=1, t=5, size=16, val=lambda ds, i: True)
    r = runner.invoke(app, ["train", "--demo", str(tmp_path / "d"), "--workdir", str(tmp_path / "wd")])
    _one_line(r, "--demo", "no training samples")


@pytest.mark.parametrize("latest, what", [("../../elsewhere.pt", "not a checkpoint name"), (None, "readable")])
def test_train_resuming_a_workdir_with_a_bad_latest_checkpoint_is_one_line(use, tmp_path, no_ray, latest, what):
    """A workdir whose ckpt/latest names a path out of ckpt/, or whose latest checkpoint is not a
    torch file, printed a traceback before any worker started."""
    wd = tmp_path / "wd"
    (wd / "ckpt").mkdir(parents=True)
    if latest is None:
        (wd / "ckpt" / "step-00000002.pt").write_bytes(b"not a torch file")
        latest = "step-00000002.pt"
    (wd / "ckpt" / "latest").write_text(latest)
    r = runner.invoke(app, ["train", "--demo", str(use / "data"), "--workdir", str(wd), "--max-steps", "1"])
    _one_line(r, "latest" if "elsewhere" in latest else latest, what)


def test_train_max_steps_below_one_names_the_option(tmp_path, no_ray):
    r = runner.invoke(app, ["train", "--demo", str(tmp_path), "--max-steps", "0", "--workdir", str(tmp_path / "w")])
    _one_line(r, "--max-steps", "0")


def test_train_config_not_utf8_names_the_file(tmp_path, no_ray):
    cfg = tmp_path / "bin.yaml"
    cfg.write_bytes(b"\xff\xfe garbage")
    _one_line(runner.invoke(app, ["train", str(cfg)]), str(cfg))
    _one_line(runner.invoke(app, ["train", str(tmp_path / "gone.yaml")]), "gone.yaml")
    build = tmp_path / "build.yaml"  # a build config given to d4s train: the key and the file named
    build.write_text("output: /tmp/x\n")
    _one_line(runner.invoke(app, ["train", str(build)]), str(build), "output")


# --- d4s eval / generate: options checked before the checkpoint is loaded ---------------------------
def _eval(use, *extra, out=None):
    return runner.invoke(app, ["eval", str(use / "ckpt.pt"), str(use / "data"), "--out", str(out), *extra])


def _gen(use, *extra, out=None, traj="dolly"):
    args = ["generate", str(use / "ckpt.pt"), "--image", str(use / "img.png"), "--trajectory", traj]
    return runner.invoke(app, [*args, "--out", str(out), "--steps", "1", "--no-ply", *extra])


@pytest.mark.parametrize("cmd", ["eval", "generate"])
def test_out_that_is_a_file_is_refused_before_any_work(cmd, use, tmp_path, no_load):
    run = _eval if cmd == "eval" else _gen
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line(run(use, out=afile), "--out", str(afile))
    _one_line(run(use, out=afile / "sub"), "--out", str(afile))


@pytest.mark.parametrize("cmd", ["eval", "generate"])
def test_bad_device_resolution_and_frames_are_refused_up_front(cmd, use, tmp_path, no_load):
    run = _eval if cmd == "eval" else _gen
    out = tmp_path / "o"
    _one_line(run(use, "--device", "bogus", out=out), "--device", "bogus")
    for opt, v in (("--resolution", "-8"), ("--resolution", "0"), ("--frames", "0"), ("--frames", "-1")):
        _one_line(run(use, opt, v, out=out), opt, v)
    assert not out.exists()


def test_resolution_zero_is_not_the_default_in_the_library(use, tmp_path, monkeypatch):
    """``resolution=0`` was silently the last stage's (``resolution or ...``); None is the default."""
    from training.evaluate import EvalError, evaluate
    from training.generate import GenerateError, generate

    def refuse(*a, **k):
        raise AssertionError("measured at another resolution than asked")

    monkeypatch.setattr("training.validate.measure", refuse)
    with pytest.raises(EvalError, match="resolution 0"):
        evaluate(str(use / "ckpt.pt"), [str(use / "data")], str(tmp_path / "e"), resolution=0, device="cpu")
    with pytest.raises(EvalError, match="frames 0"):
        evaluate(str(use / "ckpt.pt"), [str(use / "data")], str(tmp_path / "e"), frames=0, device="cpu")
    with pytest.raises(GenerateError, match="resolution 0"):
        generate(str(use / "ckpt.pt"), str(use / "img.png"), "dolly", str(tmp_path / "g"), resolution=0)


def test_eval_damaged_or_tampered_shard_is_named(use, tmp_path):
    import pyarrow.parquet as pq

    dmg = tmp_path / "dmg"
    shutil.copytree(use / "data", dmg)
    (shard,) = sorted((dmg / "shards").glob("*.tar"))
    shard.write_bytes(b"not a tar at all" * 64)
    _one_line(_eval_data(use, dmg, tmp_path / "o"), "shard-000000.tar")
    _one_line(_eval_data(use, shard, tmp_path / "o"), "shard-000000.tar")  # as a shard file, too

    tampered = tmp_path / "tampered"
    shutil.copytree(use / "data", tampered)
    tab = pq.read_table(tampered / "index.parquet")
    tab = tab.append_column("shard_sha256", [["0" * 64] * tab.num_rows])  # not the shard's sha256
    pq.write_table(tab, tampered / "index.parquet")
    _one_line(_eval_data(use, tampered, tmp_path / "o"), "shard-000000.tar", "sha256")
    assert not (tmp_path / "o").exists()


def _eval_data(use, data, out):
    return runner.invoke(app, ["eval", str(use / "ckpt.pt"), str(data), "--out", str(out), "--sample-steps", "0"])


def test_eval_text_file_as_checkpoint_is_not_a_d4s_checkpoint(use, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("junk\n")
    for cmd in (
        ["eval", str(junk), str(use / "data")],
        ["generate", str(junk), "--image", "i.png", "--trajectory", "dolly"],
    ):
        _one_line(runner.invoke(app, [*cmd, "--out", str(tmp_path / "o")]), str(junk), "not a d4s")


def test_random_bytes_as_checkpoint_are_not_called_objects(tmp_path):
    """Random bytes read as "it holds objects other than tensors" (the weights_only refusal); they
    are no torch file at all."""
    import random

    from training.load import CheckpointError, read_checkpoint

    rand = tmp_path / "rand.pt"
    rand.write_bytes(random.Random(0).randbytes(2000))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(rand))
    assert "not a d4s checkpoint" in str(err.value) and "objects other than tensors" not in str(err.value)


def test_generate_trajectory_json_with_bad_field_types(use, tmp_path):
    from training import trajectory as tj

    cases = {
        "w.json": ({"c2w": [], "width": "a", "height": 3}, "width"),
        "h.json": ({"c2w": np.tile(np.eye(4), (5, 1, 1)).tolist(), "width": 16, "height": 2.5}, "height"),
        "one.json": ({"c2w": np.tile(np.eye(4), (5, 1, 1)).tolist(), "width": 16}, "height"),
        "inf.json": ({"c2w": np.tile(np.eye(4), (5, 1, 1)).tolist(), "width": float("inf"), "height": 16}, "width"),
        "list.json": ({"c2w": "x"}, "c2w"),
    }
    for name, (d, field) in cases.items():
        (tmp_path / name).write_text(json.dumps(d))
        with pytest.raises(tj.TrajectoryError, match=field) as e:
            tj.load(str(tmp_path / name), 5, (16, 16), 16)
        assert str(tmp_path / name) in str(e.value)
    _one_line(_gen(use, out=tmp_path / "o", traj=str(tmp_path / "w.json")), "w.json", "width")


@pytest.mark.parametrize("fov", ["0", "-5", "180", "500", "nan"])
def test_generate_fov_outside_0_180_is_refused(fov, use, tmp_path, no_load):
    _one_line(_gen(use, "--fov", fov, out=tmp_path / "o"), "--fov")
    assert not (tmp_path / "o").exists()


def test_generate_trajectory_folder_without_clip_asks_for_clip(use, tmp_path):
    _one_line(_gen(use, out=tmp_path / "o", traj=str(use / "data")), "--clip", str(use / "data"))


# --- d4s train-report -----------------------------------------------------------------------------------
def _rows(n):
    return [json.dumps({"step": i, "stage": "static", "loss": 1.0 / i}) for i in range(1, n + 1)]


def test_train_report_skips_a_truncated_last_line_with_a_warning(tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "metrics.jsonl").write_text("\n".join(_rows(3)) + '\n{"step": 4, "stage": "sta')
    r = runner.invoke(app, ["train-report", str(wd)])
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "metrics.jsonl" in r.output and "line 4" in r.output
    assert (wd / "report.html").is_file() and "3 steps logged" in (wd / "report.html").read_text()
    (wd / "metrics.jsonl").write_text("\n".join(_rows(2)) + "\n{garbage\n")  # cut, then a newline
    r = runner.invoke(app, ["train-report", str(wd)])
    assert r.exit_code == 0 and "line 3" in r.output, r.output
    assert "2 steps logged" in (wd / "report.html").read_text()


def test_train_report_bad_middle_line_names_file_and_line(tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    rows = _rows(3)
    (wd / "metrics.jsonl").write_text("\n".join([rows[0], "garbage line", *rows[1:]]) + "\n")
    _one_line(runner.invoke(app, ["train-report", str(wd)]), "metrics.jsonl", "line 2")
    (wd / "metrics.jsonl").write_text("\n".join([rows[0], "[1, 2]", *rows[1:]]) + "\n")
    _one_line(runner.invoke(app, ["train-report", str(wd)]), "metrics.jsonl", "line 2")
    assert not (wd / "report.html").exists()


# --- d4s parity -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vda", "cotracker3"])
def test_parity_on_a_folder_that_is_not_a_fixture(kind, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    _one_line(runner.invoke(app, ["parity", kind, str(tmp_path)]), str(tmp_path), "parity fixture")


def _workers_failed(exc: Exception) -> Exception:
    """What Ray Train's fit() raises when rank 1 raised ``exc`` (Ray 2.60's WorkerGroupError)."""
    from ray.train import WorkerGroupError

    return WorkerGroupError("rank 1 failed:\nTraceback ...\n" + str(exc), {1: exc})


@pytest.mark.parametrize("where", ["local", "ray"])
@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EROFS"])
def test_train_whose_disk_refuses_a_write_is_one_line_naming_the_file(where, code, tmp_path, monkeypatch):
    """A full disk or quota, a read-only workdir, in the local process or in a Ray Train rank: one
    line naming the file and the reason, exit 5 (the build's code for it), not a worker's traceback."""
    import errno

    from conftest import write_tiny_use_inputs

    write_tiny_use_inputs(tmp_path / "in", step=3)
    target = str(tmp_path / "w" / "ckpt" / "step-00000004.pt")
    refused = OSError(getattr(errno, code), os.strerror(getattr(errno, code)), target)

    def fails(cfg):
        raise refused if where == "local" else _workers_failed(refused)

    monkeypatch.setattr("training.trainer.train", fails)
    r = runner.invoke(app, ["train", "--demo", str(tmp_path / "in" / "data"), "--workdir", str(tmp_path / "w")])
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("d4s train: stopped")]
    assert r.exit_code == 5, r.output
    assert "Traceback" not in r.output and len(lines) == 1, r.output
    assert target in lines[0] and os.strerror(getattr(errno, code)) in lines[0], lines[0]
    assert ("rank 1" in lines[0]) == (where == "ray"), lines[0]


def test_train_that_fails_otherwise_keeps_its_traceback(tmp_path, monkeypatch):
    """A failure that is not the node refusing a write (a bug, a bad tensor) keeps the traceback
    that says where it came from, exit 1."""
    from conftest import write_tiny_use_inputs

    write_tiny_use_inputs(tmp_path / "in", step=3)

    def fails(cfg):
        raise _workers_failed(ValueError("shape mismatch in the decoder"))

    monkeypatch.setattr("training.trainer.train", fails)
    r = runner.invoke(app, ["train", "--demo", str(tmp_path / "in" / "data"), "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 1, r.output
    assert "Traceback" in r.output and "shape mismatch" in r.output
