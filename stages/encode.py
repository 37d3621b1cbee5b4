"""Encode stage: a finished Clip -> one WebDataset sample (format in docs/FORMAT.md).

It runs as one task per clip, as soon as the clip is done, so a shard's clips are encoded in
parallel and the write task receives their bytes (JPEG frames, compact depth: a fraction of the
clip's arrays through the object store) instead of encoding them one after the other itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.clip import Clip, ClipFailure
from pipeline.sample_format import DEPTH_PNG_LEVEL, encode_clip
from stages.contract import StageContract

CONTRACT = StageContract(
    name="encode",
    inputs=("rgb", "intrinsics", "c2w", "depth?", "tracks?", "meta"),
    outputs=("sample bytes", "the ledger's QC row"),
    runs_as="task (CPU, one per clip, before the write task)",
    acts_when="always",
    errors="contract violations left by earlier stages",
)


@dataclass
class EncodedClip:
    """What the write stage needs of a finished clip, without the arrays it was encoded from:
    the sample (``__key__`` and its files' bytes), the ledger's rows, and the clip's stage
    seconds and counters (summed per shard)."""

    key: str
    sample: dict
    num_frames: int
    dynamic: bool
    qc: dict
    timings: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def encode(clip: Clip | ClipFailure, jpeg_quality: int, depth_png_level: int = DEPTH_PNG_LEVEL) -> dict | ClipFailure:
    if isinstance(clip, ClipFailure):
        return clip
    try:
        return encode_clip(clip, jpeg_quality, depth_png_level)
    except Exception as exc:
        return ClipFailure.from_exception(clip.key, "encode", exc)


def encode_for_shard(
    clip: Clip | ClipFailure, jpeg_quality: int, depth_png_level: int = DEPTH_PNG_LEVEL
) -> EncodedClip | ClipFailure:
    """The encode stage on one clip: its sample and QC row, with ``encode`` added to its stage
    seconds; a failure passes through (one at encoding keeps the counters the clip had)."""
    from manifests.clip_qc import sample_qc

    if isinstance(clip, ClipFailure):
        return clip
    t0 = time.time()
    enc = encode(clip, jpeg_quality, depth_png_level)
    if isinstance(enc, ClipFailure):
        return enc.carrying(clip)
    qc = sample_qc(clip, enc)
    timings = dict(clip.aux.get("timings", {}))
    timings["encode"] = timings.get("encode", 0.0) + time.time() - t0
    return EncodedClip(
        clip.key,
        enc,
        int(clip.num_frames),
        bool(clip.meta.dynamic),
        qc,
        timings,
        dict(clip.aux.get("stats", {})),
    )
