"""Optional text prompt: a frozen T5 encoder from a local directory, and captions -> embeddings.

CogVideoX conditions on T5 (v1.1 XXL) embeddings of ``max_text_seq_length`` (226) tokens. Here the
encoder is loaded with ``transformers`` (the optional ``text`` extra) from ``backbone.text_encoder_dir``:
a CogVideoX checkpoint directory (``text_encoder/`` and ``tokenizer/``) or a directory holding both
directly; nothing is downloaded. Captions are tokenised as diffusers' CogVideoX pipelines do (padded to
``max_length``, truncated, end-of-sequence token added) and encoded without an attention mask, as there.

The encoder lives beside the model, not in it: frozen, never in the optimiser, the DDP/FSDP wrapper or
the checkpoints. Embeddings are computed once per distinct caption and kept (on the CPU) in an LRU of
``cache_size`` captions: a sample's caption is encoded the first time it is drawn and looked up after.
Samples without a caption (or with it dropped, ``backbone.caption_dropout``, so that the learned empty
prompt is also the unconditional prompt of classifier-free guidance) use the backbone's learned empty
prompt.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch


class TextEncoder:
    def __init__(
        self,
        path: str,
        max_length: int,
        device: torch.device,
        dtype: torch.dtype | None = None,
        cache_size: int = 1024,
        expect_dim: int | None = None,
    ):
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "backbone.text_encoder_dir is set but 'transformers' is not installed: pip install 'd4s[text]'"
            ) from e

        def sub(name: str) -> str:
            d = os.path.join(path, name)
            return d if os.path.isdir(d) else path

        if not os.path.isdir(path):
            raise FileNotFoundError(f"backbone.text_encoder_dir {path} is not a directory")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(sub("tokenizer"), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(sub("text_encoder"), local_files_only=True)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if expect_dim is not None and self.model.config.d_model != expect_dim:
            raise ValueError(
                f"the text encoder in {path} gives {self.model.config.d_model}-dim embeddings; "
                f"the transformer's text_embed_dim is {expect_dim}"
            )
        self.max_length, self.device, self.cache_size = max_length, device, cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, max_length, D) float32 on the encoder's device."""
        new = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if new:
            ids = self.tokenizer(
                new,
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            emb = self.model(ids.to(self.device))[0]
            for c, e in zip(new, emb):
                self._cache[c] = e.cpu()
        got = []
        for c in captions:
            self._cache.move_to_end(c)
            got.append(self._cache[c])
        while len(self._cache) > max(self.cache_size, len(set(captions))):
            self._cache.popitem(last=False)
        return torch.stack(got).to(self.device, torch.float32)


def embed_captions(
    encoder: TextEncoder | None, captions: list[str], dropout: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> (embeddings (B, L, D), use (B,) bool), or (None, None) without an encoder.

    ``use`` is False for an empty caption and, with probability ``dropout``, for any other one; those
    rows of the embeddings are zeros and the model puts its learned empty prompt there.
    """
    if encoder is None:
        return None, None
    keep = torch.rand(len(captions), generator=generator) >= dropout
    use = torch.tensor([bool(c) for c in captions]) & keep
    emb = torch.zeros(len(captions), encoder.max_length, encoder.model.config.d_model, device=encoder.device)
    idx = use.nonzero().flatten().tolist()
    if idx:
        emb[idx] = encoder.encode([captions[i] for i in idx])
    return emb, use.to(encoder.device)
