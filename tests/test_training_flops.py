"""The stated FLOP formula (training/flops.py) equals what torch.utils.flop_counter counts on the real
modules (run on the "meta" device: shapes only), component by component."""

import pytest

from training import flops
from training.config import make_config


@pytest.mark.parametrize("preset,frames,res", [("tiny", 5, 24), ("mid", 9, 64)])
def test_formula_matches_the_counter(preset, frames, res):
    cfg = make_config(preset)
    for stage in (cfg.stages[0], cfg.stages[-1]):  # deformation frozen / trained
        f = flops.formula(cfg, stage, frames, res)
        c = flops.count_flops(cfg, stage, frames, res)
        for k in ("vae_encode", "backbone", "ldrm"):
            assert abs(f[k] - c[k]) <= 1e-9 * c[k], (stage.name, k, f[k], c[k])


def test_attention_is_quadratic_and_training_is_three_forwards():
    cfg = make_config("mid")
    stage = cfg.stages[-1]
    fwd = flops.backbone_flops(cfg, 9, 256)
    assert 2.9 * fwd < flops.formula(cfg, stage, 9, 256)["backbone"] <= 3 * fwd
    # doubling the side: 4x the tokens; linear layers 4x, attention 16x
    t = cfg.backbone.transformer
    n = lambda res: 3 * (res // 8 // 2) ** 2 + t.max_text_seq_length  # 9 frames -> 3 latent
    d = t.num_attention_heads * t.attention_head_dim
    attn = lambda res: t.num_layers * 4.0 * n(res) ** 2 * d
    lin = flops.backbone_flops(cfg, 9, 256) - attn(256)
    assert flops.backbone_flops(cfg, 9, 512) - attn(512) == pytest.approx(4 * lin, rel=0.02)
    assert flops.vae_chunks(49) == [9, 8, 8, 8, 8, 8] and flops.vae_chunks(13) == [13] and flops.vae_chunks(5) == [5]


def test_full_preset_at_49_frames_512():
    cfg = make_config("full")
    stage = cfg.stages[-1].model_copy(update={"num_frames": 49})
    cfg = cfg.model_copy(update={"stages": [stage]})
    f, c = flops.formula(cfg, stage), flops.count_flops(cfg, stage)
    for k in ("vae_encode", "backbone", "ldrm"):
        assert abs(f[k] - c[k]) <= 1e-9 * c[k], (k, f[k], c[k])
    assert 3.9e14 < f["total"] < 4.2e14  # ~0.40 PFLOP per sample (docs/TRAINING.md)
    assert 0 < f["render"] < 1e-3 * f["total"]  # the rasteriser's estimate does not move the MFU
