"""Encode stage: a finished Clip -> one WebDataset sample (format in docs/FORMAT.md)."""

from __future__ import annotations

from pipeline.clip import Clip, ClipFailure
from pipeline.sample_format import encode_clip
from stages.contract import StageContract

CONTRACT = StageContract(
    name="encode",
    inputs=("rgb", "intrinsics", "c2w", "depth?", "tracks?", "meta"),
    outputs=("sample bytes",),
    runs_as="task (CPU, inside the write task)",
    acts_when="always",
    errors="contract violations left by earlier stages",
)


def encode(clip: Clip | ClipFailure, jpeg_quality: int) -> dict | ClipFailure:
    if isinstance(clip, ClipFailure):
        return clip
    try:
        return encode_clip(clip, jpeg_quality)
    except Exception as exc:
        return ClipFailure.from_exception(clip.key, "encode", exc)
