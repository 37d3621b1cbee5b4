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


def _bad_files(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "bin.yaml").write_bytes(b"output: \xff\xfe\x00 /x\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    return {"a folder": tmp_path / "adir", "not UTF-8": tmp_path / "bin.yaml"}


@pytest.mark.parametrize("cmd", [["build"], ["plan"]])
def test_config_files_that_cannot_be_read_are_one_line_naming_them(tmp_path, cmd):
    """A folder or a file that is not UTF-8 given as the config printed a traceback (exit 1); a
    config that is not a mapping did not name its file."""
    for what, path in _bad_files(tmp_path).items():
        r = runner.invoke(app, [*cmd, str(path)])
        assert r.exit_code == 2 and str(path) in r.output and "Traceback" not in r.output, (what, r.output)
    r = runner.invoke(app, [*cmd, str(tmp_path / "list.yaml")])
    assert r.exit_code == 2 and "list.yaml" in r.output and "mapping" in r.output, r.output


@pytest.mark.parametrize(
    "rows, needle",
    [
        ("- {dataset: tartanair, scenes: 2, frames_per_scene: 10, hw: foo}\n", "hw"),  # TypeError deep inside
        ("- {dataset: tartanair, scenes: 2, frames_per_scene: 10, hw: [0, 0]}\n", "hw"),  # planned 0x0 images
        ("[]\n", "no rows"),  # a pydantic traceback
    ],
)
def test_counts_rows_are_checked(tmp_path, rows, needle):
    p = tmp_path / "counts.yaml"
    p.write_text(rows)
    r = runner.invoke(app, ["plan", "--counts", str(p)])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output


def test_counts_and_costs_files_that_cannot_be_read_are_one_line(tmp_path):
    for what, path in _bad_files(tmp_path).items():
        for args in (["plan", "--counts", str(path)], ["plan", "--full-build", "--costs", str(path)]):
            r = runner.invoke(app, args)
            assert r.exit_code == 2 and str(path) in r.output, (what, args, r.output)


def test_an_output_that_is_a_file_is_one_line(tmp_path):
    """`d4s build --demo FILE` and a config whose output is a file printed NotADirectoryError tracebacks."""
    f = tmp_path / "afile"
    f.write_text("x")
    r = runner.invoke(app, ["build", "--demo", str(f)])
    assert r.exit_code == 2 and str(f) in r.output and "not a folder" in r.output, r.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output: {f}\ndatasets:\n  tartanair: {{root: {tmp_path}}}\n")
    r = runner.invoke(app, ["build", str(cfg)])
    assert r.exit_code == 2 and str(f) in r.output and "not a folder" in r.output, r.output
