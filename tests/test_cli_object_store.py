"""Every command given an ``s3://`` location it cannot use (no credentials anywhere, or an endpoint
where nothing answers) fails in one line naming the cause, exit 2. Most of them printed botocore's
``NoCredentialsError`` at the end of a traceback (exit 1); only status, verify and report said one
line, and that one told the user to "try again" though the store was never reached."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

U = "s3://d4s-test-no-such-bucket"


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """An environment where botocore finds no credentials (no variables, files, profile or instance
    metadata), and no file system instance cached from a test that had some."""
    import s3fs

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    s3fs.S3FileSystem.clear_instance_cache()
    yield tmp_path
    s3fs.S3FileSystem.clear_instance_cache()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(r, *parts: str) -> str:
    text = r.output.strip()
    assert r.exit_code == 2, r.output[-3000:]
    assert "Traceback" not in text and len(text.splitlines()) == 1, text[-3000:]
    for p in parts:
        assert p in text, (p, text)
    return text


COMMANDS = {
    "status": ["status", f"{U}/out"],
    "show": ["show", f"{U}/out", "--clip", "x", "--rrd", "x.rrd"],
    "resume": ["resume", f"{U}/out"],
    "build a config on s3": ["build", f"{U}/cfg.yaml"],
    "plan a config on s3": ["plan", f"{U}/cfg.yaml"],
    "train --demo": ["train", "--demo", f"{U}/out", "--max-steps", "1"],
    "train-report": ["train-report", f"{U}/train"],
    "eval": ["eval", f"{U}/train", f"{U}/out", "--out", "e"],
    "generate": ["generate", f"{U}/train", "--image", "img.png", "--trajectory", "orbit", "--out", "g"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_credentials_is_one_line(no_credentials, monkeypatch, name):
    monkeypatch.chdir(no_credentials)
    r = CliRunner().invoke(app, COMMANDS[name])
    text = _one_line(r, "credentials")
    assert "try again" not in text, text


def test_a_build_whose_output_is_on_s3_without_credentials_is_one_line(no_credentials, monkeypatch):
    """The lease is the first thing a build touches on its output."""
    import yaml

    monkeypatch.chdir(no_credentials)
    cfg = {"output": f"{U}/out", "datasets": {"tartanair": {"root": str(no_credentials / "data")}}}
    (no_credentials / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    _one_line(CliRunner().invoke(app, ["build", "cfg.yaml", "--no-progress"]), "credentials")


def test_an_endpoint_where_nothing_answers_is_one_line(no_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _one_line(CliRunner().invoke(app, ["resume", f"{U}/out"]), "did not answer")


@pytest.mark.parametrize("cmd", ["generate", "eval", "eval --rrd"])
def test_an_out_on_s3_without_credentials_is_refused_before_any_work(no_credentials, monkeypatch, cmd):
    """``--out s3://...`` of generate and eval: the whole generation (or evaluation) ran first, and
    the command failed only when it wrote its results."""
    from conftest import write_tiny_use_inputs

    def refuse(*a, **k):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    write_tiny_use_inputs(no_credentials, step=3)
    monkeypatch.setattr("training.load.load_model", refuse)
    ckpt = str(next(no_credentials.rglob("*.pt")))
    args = {
        "generate": ["generate", ckpt, "--image", str(next(no_credentials.rglob("*.png"))), "--trajectory", "orbit"],
        "eval": ["eval", ckpt, str(no_credentials / "data"), "--split", "train", "--out", f"{U}/results"],
        "eval --rrd": ["eval", ckpt, str(no_credentials / "data"), "--out", "e", "--rrd", f"{U}/e.rrd"],
    }[cmd]
    if cmd == "generate":
        args += ["--out", f"{U}/results"]
    _one_line(CliRunner().invoke(app, args), "credentials")
