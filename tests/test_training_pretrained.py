"""Training from a pretrained CogVideoX backbone (``backbone.pretrained_dir``): tiny T2V and I2V models saved
with diffusers' ``save_pretrained`` load with their weights, the patch embedding widened with zero input
channels, train a step, checkpoint and resume."""

import json

import pytest
import torch
from test_training_backbone import LATENT, _save

from training.config import make_config
from training.synthetic import write_shards

STAGE = dict(
    name="s",
    steps=4,
    resolution=16,
    num_frames=5,
    scenes="any",
    losses=["fm", "photo", "geo"],
    frozen=["deformation"],
    max_frame_stride=1,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre_shards")
    write_shards(str(out), n_clips=2, per_shard=2, t=5, size=16, datasets=("synth",))
    return str(out)


def _cfg(pretrained, shards, workdir, **over):
    return make_config(
        "tiny",
        backbone={"pretrained_dir": str(pretrained)},
        data={"root": shards},
        workdir=str(workdir),
        stages=[STAGE],
        validation={"every": 0},
        runtime={"launcher": "local", "num_workers": 1, "ckpt_every": 1, "tensorboard": False},
        **over,
    )


@pytest.mark.parametrize("layout", ["2b_t2v", "5b_i2v"])
def test_pretrained_backbone_loads_widens_trains_and_resumes(layout, shards, tmp_path):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    from training.model import Diff4Splat
    from training.trainer import latest_checkpoint, load_checkpoint, train

    pre = _save(tmp_path / "pre", layout)
    cfg = _cfg(pre, shards, tmp_path / "w", max_steps=1)
    tf = CogVideoXTransformer3DModel.from_pretrained(pre / "transformer")
    vae = AutoencoderKLCogVideoX.from_pretrained(pre / "vae")
    model = Diff4Splat(cfg)
    ours = model.backbone.transformer.state_dict()
    for k, v in tf.state_dict().items():
        if k == "patch_embed.proj.weight":  # widened: the released channels, then zeros for the camera (+ image) ones
            old = v.shape[1]
            assert ours[k].shape[1] == 2 * LATENT + cfg.backbone.camera_channels
            assert torch.equal(ours[k][:, :old], v) and not ours[k][:, old:].any()
        else:
            assert torch.equal(ours[k], v), k
    assert all(torch.equal(model.backbone.vae.state_dict()[k], v) for k, v in vae.state_dict().items())

    train(cfg)
    assert latest_checkpoint(cfg.workdir).endswith("step-00000001.pt")
    train(cfg.model_copy(update={"max_steps": 2}))  # resumes from the checkpoint
    state = load_checkpoint(latest_checkpoint(cfg.workdir))
    assert state["step"] == 2
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    # the frozen VAE is the pretrained one still; the transformer trained
    assert all(torch.equal(state["model"][f"backbone.vae.{k}"], v) for k, v in vae.state_dict().items())
    w = state["model"]["backbone.transformer.patch_embed.proj.weight"]
    assert not torch.equal(w, ours["patch_embed.proj.weight"])


def test_config_that_does_not_describe_the_pretrained_vae_is_refused(shards, tmp_path):
    from training.model import Diff4Splat

    pre = _save(tmp_path / "pre", "5b_t2v")
    cfg = _cfg(pre, shards, tmp_path / "w", max_steps=1)
    wrong = cfg.model_copy(
        update={
            "backbone": cfg.backbone.model_copy(
                update={
                    "vae": cfg.backbone.vae.model_copy(
                        update={"temporal_compression_ratio": 4, "block_out_channels": [8, 8, 8]}
                    )
                }
            )
        }
    )
    with pytest.raises(ValueError, match="compresses space by 2 and time by 2"):
        Diff4Splat(wrong)
