"""No credentials in the output or the logs: a location written as a URL with a user name or
password (``https://user:pw@host/...``, which fsspec accepts) was copied into
config.resolved.yaml and, through the load errors that repeat it, into Ray's world-readable logs.
Such a URL is refused where it is given, naming the field but not the secret; credentials come
from the environment (docs/CLUSTER.md)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.storage import Store
from training.config import TrainConfigError, make_config

SECRET = "TOPSECRET-pw-123"


def _build_yaml(tmp_path, **over) -> str:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    root = over.pop("root", str(data))
    lines = [
        f"output: {over.pop('output', str(tmp_path / 'out'))}",
        "datasets:",
        "  realestate10k:",
        f"    root: {root}",
    ]
    if "options" in over:
        lines += ["    options:", *(f"      {k}: {v}" for k, v in over.pop("options").items())]
    if "checkpoint" in over:
        lines += ["stages:", "  depth:", f"    checkpoint: {over.pop('checkpoint')}"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "field, over",
    [
        ("stages.depth.checkpoint", {"checkpoint": f"http://ci-bot:{SECRET}@127.0.0.1:9/vda.pth"}),
        ("datasets.realestate10k.root", {"root": f"s3://AKIA123:{SECRET}@bucket/re10k"}),
        ("output", {"output": f"https://{SECRET}@files.example.org/out"}),
        ("datasets.realestate10k.options.video_map", {"options": {"video_map": f"ftp://u:{SECRET}@h/map.json"}}),
        ("datasets.realestate10k.root", {"root": f"simplecache::https://u:{SECRET}@h/re10k"}),
    ],
)
def test_a_build_config_url_with_credentials_is_refused_without_echoing_them(tmp_path, field, over):
    with pytest.raises(ConfigError) as err:
        load_config(_build_yaml(tmp_path, **over), is_text=True)
    msg = str(err.value)
    assert field in msg and "user name or password" in msg and "environment" in msg, msg
    assert SECRET not in msg


def test_urls_without_credentials_stay_accepted(tmp_path):
    cfg = load_config(
        _build_yaml(tmp_path, checkpoint="https://example.org/a@b/vda.pth", root="s3://bucket/re10k@v2"),
        is_text=True,
    )
    assert cfg.stages.depth.checkpoint == "https://example.org/a@b/vda.pth"


def test_a_training_config_url_with_credentials_is_refused():
    with pytest.raises(TrainConfigError) as err:
        make_config("tiny", data={"root": f"https://u:{SECRET}@h/out"})
    msg = str(err.value)
    assert "data.root" in msg and "user name or password" in msg and SECRET not in msg
    with pytest.raises(TrainConfigError) as err:
        make_config("tiny", workdir=f"s3://k:{SECRET}@bucket/run")
    assert "workdir" in str(err.value) and SECRET not in str(err.value)


def test_a_store_given_such_a_url_on_the_command_line_refuses_it():
    with pytest.raises(ConfigError) as err:
        Store(f"https://u:{SECRET}@h/out")
    assert "user name or password" in str(err.value) and SECRET not in str(err.value)
