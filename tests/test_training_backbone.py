"""Released CogVideoX layouts load and get their positions: 2B T2V (sin-cos), 5B T2V (rotary), 5B I2V
(rotary + learned positional embeddings, at resolutions other than its native one).

Each layout is a tiny model saved with ``save_pretrained`` (``vae/``, ``transformer/``) and loaded through
``backbone.pretrained_dir``, as a released checkpoint would be.
"""

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

from training.backbone import VideoBackbone
from training.config import BackboneConfig

LATENT = 4
LAYOUTS = {  # name -> transformer kwargs that differ between the released checkpoints
    "2b_t2v": dict(in_channels=LATENT, use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False),
    "5b_t2v": dict(in_channels=LATENT, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False),
    "5b_i2v": dict(
        in_channels=2 * LATENT, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True
    ),
}
NATIVE = (6, 8, 5)  # the tiny transformer's sample_height, sample_width (latent units) and sample_frames


def _save(root, layout):
    torch.manual_seed(0)
    AutoencoderKLCogVideoX(
        block_out_channels=(8, 8),
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        latent_channels=LATENT,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=2,
    ).save_pretrained(root / "vae")
    tf = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        out_channels=LATENT,
        time_embed_dim=16,
        text_embed_dim=16,
        num_layers=1,
        patch_size=1,
        max_text_seq_length=4,
        sample_height=NATIVE[0],
        sample_width=NATIVE[1],
        sample_frames=NATIVE[2],
        temporal_compression_ratio=2,
        **LAYOUTS[layout],
    )
    if layout == "5b_i2v":  # a trained learned embedding is not the sin-cos it starts from: make it distinct
        with torch.no_grad():
            tf.patch_embed.pos_embedding.normal_()
    tf.save_pretrained(root / "transformer")
    return root


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def backbone(request, tmp_path_factory):
    root = _save(tmp_path_factory.mktemp(request.param), request.param)
    bb = VideoBackbone(BackboneConfig(pretrained_dir=str(root), camera_channels=4)).eval()
    return request.param, bb


def _inputs(h, w, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, frames, LATENT, h, w, generator=g)
    pl = torch.randn(1, frames, 6, 2 * h, 2 * w, generator=g)
    return z, z[:, :1].clone(), pl


def _swap(x, a, b):
    x = x.clone()
    x[..., a[0], a[1]], x[..., b[0], b[1]] = x[..., b[0], b[1]].clone(), x[..., a[0], a[1]].clone()
    return x


@torch.no_grad()
def test_layouts_run_at_other_resolutions_and_know_positions(backbone):
    """Every layout runs at 12 x 12 latents (not its native 6 x 8), and the transformer is not
    permutation-equivariant over latent positions (the rotary / learned / sin-cos positions reach it)."""
    name, bb = backbone
    z, first, pl = _inputs(12, 12)
    t = torch.tensor([0.4])
    v = bb.velocity(z, t, first, pl)
    assert v.shape == z.shape and torch.isfinite(v).all()
    a, b = (2, 3), (9, 7)
    v2 = bb.velocity(_swap(z, a, b), t, _swap(first, a, b), pl)
    # a position-free transformer would just swap the two outputs
    diff = (v2[..., a[0], a[1]] - v[..., b[0], b[1]]).abs().max() / v.abs().max()
    assert float(diff) > 1e-3, name


@torch.no_grad()
def test_rotary_embedding_as_diffusers_pipelines_compute_it(backbone):
    _, bb = backbone
    if not bb.transformer.config.use_rotary_positional_embeddings:
        assert bb.rotary_embedding(3, 12, 10, torch.device("cpu")) is None
        return
    pytest.importorskip("transformers")  # diffusers' pipeline modules import it
    from types import SimpleNamespace

    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    fake = SimpleNamespace(vae_scale_factor_spatial=bb.fs, transformer=bb.transformer)
    for frames, h, w in ((3, 12, 12), (2, 6, 8), (4, 16, 10)):
        ref = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, h * bb.fs, w * bb.fs, frames, "cpu")
        ours = bb.rotary_embedding(frames, h, w, torch.device("cpu"))
        assert all(torch.equal(x, y) for x, y in zip(ours, ref)), (frames, h, w)


@torch.no_grad()
def test_learned_positions_native_size_unchanged_and_resampled_elsewhere(backbone):
    """5B-I2V: at its native grid the learned embedding is used exactly as diffusers uses it; at another
    grid it is resampled (not refused); more latent frames than it was trained for is a clear error."""
    name, bb = backbone
    if name != "5b_i2v":
        return
    h, w, frames = NATIVE[0], NATIVE[1], 1 + (NATIVE[2] - 1) // 2
    pe = bb.transformer.patch_embed
    # what diffusers adds at its native size: the stored embedding itself
    native = bb.learned_position_embedding(frames, h, w, torch.device("cpu"), torch.float32)
    assert torch.equal(native, pe.pos_embedding.to(torch.float32))
    emb = bb.learned_position_embedding(frames, 12, 12, torch.device("cpu"), torch.float32)
    assert emb.shape == (1, 4 + frames * 144, pe.embed_dim)
    # and it reaches the transformer: a different stored embedding, a different velocity
    z, first, pl = _inputs(12, 12)
    t = torch.tensor([0.7])
    v = bb.velocity(z, t, first, pl)
    saved = pe.pos_embedding.clone()
    try:
        pe.pos_embedding.mul_(2.0)
        assert not torch.allclose(bb.velocity(z, t, first, pl), v)
    finally:
        pe.pos_embedding.copy_(saved)
    z, first, pl = _inputs(12, 12, frames + 1)
    with pytest.raises(ValueError, match="latent frames"):
        bb.velocity(z, t, first, pl)
