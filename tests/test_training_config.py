"""Training config checks and the presets' model sizes (built on the meta device: no memory, no init cost)."""

import pytest
import torch

from training.config import TrainConfigError, make_config
from training.model import Diff4Splat


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_preset_is_cogvideox_2b_shaped():
    """The ``full`` preset's transformer is CogVideoX-2B's (30 blocks of width 1920, ~1.69e9 parameters)
    and the LDRM has 16 blocks; buildable on the meta device, which is how a 2B model is sized before
    it is put on GPUs."""
    with torch.device("meta"):
        m = Diff4Splat(make_config("full"))
    tf = m.backbone.transformer
    assert len(tf.transformer_blocks) == 30
    assert tf.config.num_attention_heads * tf.config.attention_head_dim == 1920
    assert 1.6e9 < _count(tf) < 1.75e9
    assert len(m.ldrm.blocks) == 16
    assert _count(m) > 2.0e9
    with torch.device("meta"):
        mid = Diff4Splat(make_config("mid"))
    assert _count(mid) < _count(m) / 20


def test_ranks_sharing_a_gpu_need_gloo():
    with pytest.raises(TrainConfigError, match="NCCL refuses"):
        make_config("tiny", runtime={"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5})
    cfg = make_config("tiny", runtime={"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5, "backend": "gloo"})
    assert cfg.runtime.gpus_per_worker == 0.5
    with pytest.raises(TrainConfigError, match="use ddp"):
        make_config(
            "tiny",
            runtime={"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5, "backend": "gloo", "strategy": "fsdp"},
        )
    with pytest.raises(TrainConfigError):
        make_config("tiny", runtime={"gpus_per_worker": 0})


def test_bench_case_spec():
    from bench.bench_train import parse_case

    assert parse_case("full:256:fsdp+gc:1") == {
        "preset": "full",
        "resolution": 256,
        "strategy": "fsdp",
        "grad_ckpt": True,
        "workers": 1,
        "shared_gpu": False,
    }
    assert parse_case("mid:512:ddp:2/share") == {
        "preset": "mid",
        "resolution": 512,
        "strategy": "ddp",
        "grad_ckpt": False,
        "workers": 2,
        "shared_gpu": True,
    }


def test_relative_local_paths_made_absolute_for_the_ranks(tmp_path, monkeypatch):
    """Ray Train ranks do not share the driver's working directory: relative local paths are resolved
    against it before the config is handed to them; URLs stay as they are."""
    from training.trainer import absolute_local_paths

    monkeypatch.chdir(tmp_path)
    cfg = make_config(
        "tiny",
        workdir="runs/w",
        data={"root": "out", "shards": ["a/*.tar", "s3://b/c/*.tar"]},
        loss={"lpips_torch_home": "weights"},
        backbone={"text_encoder_dir": "t5"},
    )
    fixed = absolute_local_paths(cfg)
    assert fixed.workdir == str(tmp_path / "runs" / "w")
    assert fixed.data.root == str(tmp_path / "out")
    assert fixed.data.shards == [str(tmp_path / "a" / "*.tar"), "s3://b/c/*.tar"]
    assert fixed.loss.lpips_torch_home == str(tmp_path / "weights")
    assert fixed.backbone.pretrained_dir is None
    assert fixed.backbone.text_encoder_dir == str(tmp_path / "t5")
    assert absolute_local_paths(make_config("tiny", workdir="s3://bucket/run")).workdir == "s3://bucket/run"


class _Payload:  # a class the checkpoint loader must not instantiate
    pass


def test_checkpoints_load_without_unpickling_code(tmp_path):
    """Checkpoints (RNG states included) load with ``weights_only``; one carrying an arbitrary object
    is refused, so a workdir on shared storage cannot make the trainer run code."""
    import numpy as np

    from training.trainer import load_checkpoint, rng_state, save_checkpoint, set_rng_state

    np.random.seed(3)
    state = {"step": 1, "rng": [rng_state()], "model": {"w": torch.ones(2)}}
    expect = np.random.rand(4)
    path = save_checkpoint(str(tmp_path / "w"), state, keep=1)
    np.random.seed(99)
    set_rng_state(load_checkpoint(path)["rng"][0])
    assert np.array_equal(np.random.rand(4), expect)
    bad = save_checkpoint(str(tmp_path / "w2"), {"step": 2, "obj": _Payload()}, keep=1)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(bad)


def test_vae_precision_does_not_shape_the_weights():
    """A speed switch: a full-preset checkpoint (bfloat16 VAE) is evaluated with a float32 config."""
    from training.config import make_config
    from training.load import shaping_differences

    a = make_config("tiny")
    b = make_config("tiny", backbone={"vae_precision": "bfloat16"})
    assert a.backbone.vae_precision != b.backbone.vae_precision and shaping_differences(a, b) == []
