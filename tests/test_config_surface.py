"""The config surface: YAML and values a config loader must refuse in one line naming the key,
for the build config, the training config and the commands that read them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ConfigError, load_config

runner = CliRunner()
BASE = "output: /tmp/x\ndatasets:\n  tartanair: {root: /tmp}\n"


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("shard_size: 3\nshard_size: 40\n", "duplicate key 'shard_size'"),  # last one silently won
        ("stages:\n  depth: {input_size: 0}\n", "stages.depth.input_size"),  # failed later, per clip
        ("stages:\n  depth: {resources: {num_cpus: -1}}\n", "stages.depth.resources.num_cpus"),  # Ray refused it
        ("ray: {num_cpus: -4}\n", "ray.num_cpus"),
        ("lease: {ttl_s: 1, heartbeat_s: 10}\n", "heartbeat_s"),  # the driver fenced itself
        ("shard_size: 8\n\tjpeg_quality: 90\n", "line 5"),  # a tab: was three lines
        ("qc: {min_valid_depth_fraction: 2}\n", "qc.min_valid_depth_fraction"),
        ("stages:\n  tracks: {min_kept_fraction: 2}\n", "stages.tracks.min_kept_fraction"),
        ("stages:\n  tracks: {grid_size: 0}\n", "stages.tracks.grid_size"),
        ("datasets:\n  tartanair: {root: /tmp, min_depth_m: 10, max_depth_m: 1}\n", "min_depth_m 10 must be below"),
        ("datasets:\n  tartanair: {root: /tmp, loss_weights: {depth: -1}}\n", "loss_weights must be >= 0"),
    ],
)
def test_build_config_refuses_in_one_line(tmp_path, extra, needle):
    with pytest.raises(ConfigError) as err:
        load_config(("output: /tmp/x\n" if extra.startswith("datasets:") else BASE) + extra, is_text=True)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- a\n", "mapping"),
        ("hello\n", "mapping"),
        ("preset: tinny\n", "unknown preset 'tinny'"),
        ("preset: tiny\noptim: {lr_: 1}\n", "optim.lr_"),
        ("preset: tiny\nldrm: {heads: 0}\n", "ldrm.heads"),  # integer modulo by zero
        ("preset: tiny\nldrm: {patch_size: 0}\n", "ldrm.patch_size"),
        ("preset: tiny\nmax_steps: 0\n", "max_steps"),  # meant: the whole curriculum
        ("preset: tiny\nmax_steps: 2\nmax_steps: 3\n", "duplicate key 'max_steps'"),
        ("preset: tiny\nruntime: {ckpt_every: 0}\n", "runtime.ckpt_every"),  # step % 0 in the trainer
        ("preset: tiny\nruntime: {log_every: 0}\n", "runtime.log_every"),
        ("preset: tiny\noptim: {lr: -1}\n", "optim.lr"),
        ("preset: tiny\noptim: {grad_accum: 0}\n", "optim.grad_accum"),
        # weights and ranges that were taken silently: a negative weight became a probability below 0
        # (numpy refused mid-stage), depth_min above depth_max inverted the LDRM's depth squash
        ("preset: tiny\nstages: [{name: a, steps: 1, resolution: 8, num_frames: 3, mixture: {x: -1}}]\n", "mixture"),
        ("preset: tiny\ndata: {repeat: {x: -2}}\n", "data.repeat"),
        ("preset: tiny\nldrm: {depth_min: 5, depth_max: 1}\n", "ldrm.depth_min 5.0 must be below"),
        ("preset: tiny\nldrm: {depth_min: 0}\n", "ldrm.depth_min"),  # log(0) in the depth squash
        ("preset: tiny\nldrm: {clean_latent_prob: 1.5}\n", "ldrm.clean_latent_prob"),
        ("preset: tiny\nldrm: {prune_opacity: 1}\n", "ldrm.prune_opacity"),  # every Gaussian dropped
        ("preset: tiny\nldrm: {scale_min: 0}\n", "ldrm.scale_min"),
        ("preset: tiny\nloss: {lambda_geo: -1}\n", "loss.lambda_geo"),  # rewarded a worse geometry
        ("preset: tiny\nloss: {render_frames: 0}\n", "loss.render_frames"),
        ("preset: tiny\noptim: {betas: [0.9, 1.5]}\n", "optim.betas"),
    ],
)
def test_training_config_refuses_in_one_line(tmp_path, text, needle):
    from training.config import load_config as load_train

    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as err:
        load_train(p)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    r = runner.invoke(app, ["eval", str(tmp_path / "ck"), str(tmp_path / "data"), "--out", "o", "--config", str(p)])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit) and needle in r.output, r.output


def test_ray_address_local_starts_a_local_ray(monkeypatch):
    """``RAY_ADDRESS=local`` (or ray.address: local) was taken for a joined cluster: the local Ray
    ignored ray.num_cpus/num_gpus and the check that a local Ray cannot gain GPUs was skipped."""
    import pipeline.dag as dag

    calls = []
    monkeypatch.setattr(dag.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(dag.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "local")
    cfg = load_config(BASE + "ray: {num_cpus: 2, num_gpus: 0}\n", is_text=True)
    dag.ensure_ray(cfg)
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 2 and not dag._joined_cluster(cfg)


def test_a_damaged_recorded_config_and_bad_counts_are_one_line(tmp_path):
    out = tmp_path / "out"
    (out / "manifests").mkdir(parents=True)
    (out / "manifests" / "shards.parquet").write_bytes(b"")
    (out / "config.resolved.yaml").write_text("stages: [1, 2]\noutput: o\n")
    r = runner.invoke(app, ["resume", str(out), "--no-progress"])
    assert r.exit_code == 2 and "config.resolved.yaml" in r.output, r.output
    for rows, needle in (
        ("- {dataset: tartanair, scenes: abc, frames_per_scene: 100}\n", "scenes"),
        ("- {dataset: tartanairr, scenes: 3, frames_per_scene: 100}\n", "tartanairr"),
        ("- {dataset: tartanair, scenes: -10, frames_per_scene: 0}\n", "scenes"),
    ):
        (tmp_path / "counts.yaml").write_text(rows)
        r = runner.invoke(app, ["plan", "--counts", str(tmp_path / "counts.yaml")])
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit) and needle in r.output, (rows, r.output)
