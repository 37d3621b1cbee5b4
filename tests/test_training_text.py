"""Optional text prompt: a T5 encoder from a local directory (CogVideoX's layout), captions from the
sample's ``meta.json``, the learned empty prompt otherwise; each distinct caption encoded once."""

import json
import os

import numpy as np
import pytest
import torch

from training.config import make_config

transformers = pytest.importorskip("transformers")  # the optional `text` extra

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "car", "drives", "down", "the", "street", "room", "empty"]


def save_tiny_t5(root) -> str:
    """A 1-layer T5 encoder (d_model 16 = the tiny preset's text_embed_dim) and a word-level tokenizer,
    in CogVideoX's layout: ``text_encoder/`` and ``tokenizer/``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    T5EncoderModel(
        T5Config(
            vocab_size=len(WORDS),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).save_pretrained(os.path.join(root, "text_encoder"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(os.path.join(root, "tokenizer"))
    return str(root)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("t5"))


def test_encoder_pads_to_the_prompt_length_and_encodes_each_caption_once(t5_dir):
    from training.text import TextEncoder

    enc = TextEncoder(t5_dir, max_length=4, device=torch.device("cpu"), cache_size=8)
    calls = []
    enc.model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    e1 = enc.encode(["a red car", "the empty room", "a red car"])
    assert e1.shape == (3, 4, 16) and e1.dtype == torch.float32
    assert torch.equal(e1[0], e1[2]) and not torch.allclose(e1[0], e1[1])
    e2 = enc.encode(["the empty room", "a red car"])
    assert calls == [2]  # two distinct captions, encoded once, in one call; the rest from the cache
    assert torch.equal(e2[0], e1[1])
    # truncation to max_length (4 tokens with </s>) and the same ids as the tokenizer gives
    ids = enc.tokenizer(
        ["a red car drives down the street"], padding="max_length", max_length=4, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.shape == (1, 4)
    with pytest.raises(ValueError, match="text_embed_dim"):
        TextEncoder(t5_dir, max_length=4, device=torch.device("cpu"), expect_dim=32)


def test_backbone_uses_text_where_given_and_the_empty_prompt_elsewhere():
    from training.backbone import VideoBackbone

    cfg = make_config("tiny")
    torch.manual_seed(0)
    bb = VideoBackbone(cfg.backbone).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 12, 12, generator=g)
    pl = torch.randn(2, 3, 6, 24, 24, generator=g)
    t = torch.tensor([0.3, 0.6])
    text = torch.randn(2, 4, 16, generator=g)
    with torch.no_grad():
        null = bb.velocity(z, t, z[:, :1], pl)
        mixed = bb.velocity(z, t, z[:, :1], pl, text, torch.tensor([True, False]))
    assert not torch.allclose(mixed[0], null[0]) and torch.allclose(mixed[1], null[1], atol=1e-6)


def test_training_with_captions(t5_dir, tmp_path):
    """Two local training steps with the T5 encoder on shards where half the clips have captions."""
    from training.synthetic import write_shards
    from training.trainer import train

    shards = str(tmp_path / "shards")
    write_shards(
        shards,
        n_clips=2,
        per_shard=1,
        t=5,
        size=24,
        caption=lambda ds, i: "a red car drives down the street" if i % 2 == 0 else None,
    )
    metas = []
    from training.data import iter_tar, resolve_shards

    for urls in resolve_shards(make_config("tiny", data={"root": shards}).data)[0].values():
        metas += [json.loads(s["meta.json"]) for u in urls for s in iter_tar(u)]
    assert sorted(m.get("caption", "") for m in metas) == ["", "a red car drives down the street"]
    stage = dict(name="s", steps=2, resolution=24, num_frames=5, max_frame_stride=1)
    cfg = make_config(
        "tiny",
        data={"root": shards},
        workdir=str(tmp_path / "w"),
        stages=[stage],
        backbone={"text_encoder_dir": t5_dir, "caption_dropout": 0.0},
        runtime={"launcher": "local", "num_workers": 1, "tensorboard": False, "ckpt_every": 100},
    )
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)


def test_caption_dropout_and_missing_captions_use_the_empty_prompt(t5_dir):
    from training.text import TextEncoder, embed_captions

    enc = TextEncoder(t5_dir, max_length=4, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    emb, use = embed_captions(enc, ["a red car", "", "the room"], dropout=0.0, generator=g)
    assert use.tolist() == [True, False, True] and emb.shape == (3, 4, 16)
    emb, use = embed_captions(enc, ["a red car", "", "the room"], dropout=1.0, generator=g)
    assert use.tolist() == [False, False, False]
    emb, use = embed_captions(None, ["a red car"], dropout=0.0, generator=g)
    assert emb is None and use is None
