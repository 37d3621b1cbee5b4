"""RealEstate10K as pixelSplat / MVSplat chunks: ``<split>/<NNNNNN>.torch`` beside ``<split>/index.json``.

Facts (sources in docs/datasets/realestate10k.md): a chunk is ``torch.save`` of a Python list of
examples, about 100 MB of them per chunk; each example is a dict with

- ``key``: the sequence id (the camera file's stem),
- ``url``: line 1 of the camera file (the YouTube URL),
- ``timestamps``: int64 (T,), microseconds, one per camera line,
- ``cameras``: float32 (T, 18), the 18 numbers after the timestamp on each camera line:
  ``fx fy cx cy`` normalised by the image size, ``k1 k2`` (zero), a row-major 3x4 world-to-camera,
- ``images``: a list of T uint8 1-D tensors, each the bytes of the JPEG file of the frame at that
  timestamp, in timestamp order.

``index.json`` maps each key to its chunk's file name; d4s does not need it (it lists a chunk's
examples itself) but reports keys it names that the chunks lack.

Safety: chunks are loaded with ``torch.load(weights_only=True)``: tensors, lists, dicts, strings
and numbers only, no arbitrary unpickling. A chunk that needs more is refused with the reason.
Listing reads only the pickled structure (tensors as shapes, under FakeTensorMode: about 0.3 MB of
a 100 MB chunk); loading a local chunk maps it (``mmap=True``) so only the JPEGs that are decoded
are read; from a remote chunk only the example's timestamps, cameras and wanted images are fetched,
at the file offsets torch records for tensors loaded under FakeTensorMode (its structure, read once,
is kept per process; a torch that records no offsets reads the chunk whole).
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from pipeline.clip import ClipError
from pipeline.storage import Store
from stages.ingest.base import DISCOVERY_BLOCK

REQUIRED_KEYS = ("key", "url", "timestamps", "cameras", "images")
SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a key becomes part of scene ids and file names


@dataclass(frozen=True)
class ExampleSummary:
    key: str
    num_frames: int  # len(timestamps), 0 when unknown
    problem: str = ""  # why this example cannot be read (found while listing)


def _load(store: Store, rel: str, meta_only: bool):
    import torch

    where = store.display(rel)
    try:
        if meta_only:
            from torch._subclasses.fake_tensor import FakeTensorMode

            # a small read-ahead: the structure is read from a few places in the file (on an
            # object store s3fs's 50 MiB default fetched 2.3x a 69 MB chunk to list it)
            with store.open(rel, block_size=DISCOVERY_BLOCK) as f, FakeTensorMode():
                return torch.load(f, weights_only=True)
        if store.is_local:
            return torch.load(store.path(rel), weights_only=True, mmap=True)
        return torch.load(io.BytesIO(store.read_bytes(rel)), weights_only=True)
    except FileNotFoundError:
        raise ClipError("chunk file is missing", where) from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClipError(
            "refused to load: the chunk holds objects other than tensors, lists, dicts, strings and "
            f"numbers, and d4s loads chunks with torch.load(weights_only=True) ({first})",
            where,
        ) from None
    except Exception as exc:  # zip/EOF/runtime errors of a truncated or foreign file
        raise ClipError(f"unreadable or truncated chunk ({type(exc).__name__}: {str(exc)[:200]})", where) from None


@lru_cache(maxsize=2)
def _cached_remote(url: str, rel: str, size: int):
    return _load(Store(url), rel, meta_only=False)


def load_chunk(store: Store, rel: str) -> list:
    """The chunk's examples (tensors memory-mapped for a local file)."""
    if store.is_local:
        chunk = _load(store, rel, meta_only=False)
    else:
        chunk = _cached_remote(store.url, rel, store.size(rel))
    if not isinstance(chunk, list):
        raise ClipError(f"a chunk is a list of examples, this file holds a {type(chunk).__name__}", store.display(rel))
    return chunk


@lru_cache(maxsize=8)
def _remote_structure(url: str, rel: str, fingerprint: str) -> list:
    """A remote chunk's pickled structure (tensors as fake ones that know where their bytes lie in
    the file): a fraction of a MB per chunk, so a process keeps several."""
    chunk = _load(Store(url), rel, meta_only=True)
    if not isinstance(chunk, list):
        where = Store(url).display(rel)
        raise ClipError(f"a chunk is a list of examples, this file holds a {type(chunk).__name__}", where)
    return chunk


def _file_range(t) -> tuple[int, int] | None:
    """Where a tensor loaded under FakeTensorMode keeps its bytes in the chunk file, (start, end);
    None when torch did not record it (then the chunk is read whole). torch.save stores each
    storage uncompressed, its file offset in ``_checkpoint_offset``."""
    offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
    if not isinstance(offset, int) or not t.is_contiguous():
        return None
    start = offset + t.storage_offset() * t.element_size()
    return start, start + t.numel() * t.element_size()


def load_example(store: Store, rel: str, index: int, frames: list[int]) -> tuple[int, dict | None]:
    """(the chunk's example count, example ``index`` with the images of ``frames``; None when
    ``index`` is beyond the chunk). A local chunk is memory-mapped; from a remote one only the
    example's timestamps, cameras and those images are fetched (in one concurrent batch), after
    its structure: it was read whole, ~100 MB, by every process that loaded one of its examples.
    An example that is not a valid one is returned as it is, for :func:`example_problem`."""
    import torch

    if store.is_local:
        chunk = load_chunk(store, rel)
        return len(chunk), (chunk[index] if index < len(chunk) else None)
    try:
        fingerprint = store.fingerprint_of(rel)  # a rewritten chunk is not read by old offsets
    except FileNotFoundError:
        raise ClipError("chunk file is missing", store.display(rel)) from None
    try:
        chunk = _remote_structure(store.url, rel, fingerprint)
    except ClipError as exc:
        if "refused" in exc.reason:
            raise
        whole = load_chunk(store, rel)  # FakeTensorMode unavailable in this torch: read it whole
        return len(whole), (whole[index] if index < len(whole) else None)
    if index >= len(chunk):
        return len(chunk), None
    ex = chunk[index]
    if example_problem(ex, index):
        return len(chunk), ex
    wanted = {"timestamps": ex["timestamps"], "cameras": ex["cameras"]}
    wanted.update({i: ex["images"][i] for i in sorted(set(frames)) if 0 <= i < len(ex["images"])})
    ranges = {k: _file_range(t) for k, t in wanted.items()}
    if any(r is None for r in ranges.values()):  # this torch does not say where tensors lie
        whole = load_chunk(store, rel)
        return len(whole), whole[index]
    try:
        got = store.read_ranges(rel, list(ranges.values()))
    except FileNotFoundError:
        raise ClipError("chunk file is missing", store.display(rel)) from None
    real = {}
    for (k, t), data in zip(wanted.items(), got):
        start, end = ranges[k]
        if len(data) != end - start:
            raise ClipError(f"chunk is truncated (example {index}: {k!r})", store.display(rel))
        real[k] = (
            torch.frombuffer(bytearray(data), dtype=t.dtype).reshape(t.shape)
            if data
            else torch.empty(tuple(t.shape), dtype=t.dtype)
        )
    images = [real.get(i, im) for i, im in enumerate(ex["images"])]  # the others stay shapes only
    return len(chunk), {**ex, "timestamps": real["timestamps"], "cameras": real["cameras"], "images": images}


def list_examples(store: Store, rel: str) -> list[ExampleSummary]:
    """Keys and frame counts of a chunk's examples without reading its images."""
    try:
        chunk = _load(store, rel, meta_only=True)
    except ClipError as exc:
        if "refused" in exc.reason:
            raise
        chunk = load_chunk(store, rel)  # FakeTensorMode unavailable in this torch: read it for real
    if not isinstance(chunk, list):
        raise ClipError(f"a chunk is a list of examples, this file holds a {type(chunk).__name__}", store.display(rel))
    out = []
    for i, ex in enumerate(chunk):
        problem = example_problem(ex, i)
        key = ex.get("key") if isinstance(ex, dict) else None
        key = key if isinstance(key, str) and SAFE_KEY.fullmatch(key) else f"example{i:04d}"
        n = 0
        if not problem:
            n = int(ex["timestamps"].shape[0])
        out.append(ExampleSummary(key, n, problem))
    return out


def example_problem(ex, index: int) -> str:
    """Why example ``index`` is not a valid pixelSplat example ('' when it is). Shapes only."""
    import torch

    if not isinstance(ex, dict):
        return f"example {index} is a {type(ex).__name__}, not a dict"
    missing = [k for k in REQUIRED_KEYS if k not in ex]
    name = f"example {index}" + (f" ({ex['key']!r})" if isinstance(ex.get("key"), str) else "")
    if missing:
        return f"{name} is missing {missing} (has {sorted(map(str, ex))})"
    if not isinstance(ex["key"], str) or not SAFE_KEY.fullmatch(ex["key"]):
        return f"{name}: 'key' must be a string of letters, digits, '_' or '-' (it names the scene)"
    if not isinstance(ex["url"], str):
        return f"{name}: 'url' must be a string, got {type(ex['url']).__name__}"
    ts, cams, imgs = ex["timestamps"], ex["cameras"], ex["images"]
    if not isinstance(ts, torch.Tensor) or ts.ndim != 1 or ts.dtype.is_floating_point or ts.dtype == torch.bool:
        return f"{name}: 'timestamps' must be a 1-D integer tensor"
    t = int(ts.shape[0])
    if t == 0:
        return f"{name}: no frames ('timestamps' is empty)"
    if not isinstance(cams, torch.Tensor) or tuple(cams.shape) != (t, 18) or not cams.dtype.is_floating_point:
        shape = tuple(cams.shape) if isinstance(cams, torch.Tensor) else type(cams).__name__
        return f"{name}: 'cameras' must be a float ({t}, 18) tensor, got {shape}"
    if not isinstance(imgs, (list, tuple)) or len(imgs) != t:
        n = len(imgs) if isinstance(imgs, (list, tuple)) else type(imgs).__name__
        return f"{name}: 'images' must be a list of {t} byte tensors (one per timestamp), got {n}"
    for i, im in enumerate(imgs):
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.ndim != 1:
            return f"{name}: image {i} must be a 1-D uint8 tensor of file bytes"
    return ""


def decode_image(data, where: str, what: str) -> np.ndarray:
    """One example image (tensor of JPEG/PNG file bytes) -> (H, W, 3) uint8 RGB."""
    raw = data.numpy().tobytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise ClipError(f"{what} is not a readable image ({type(exc).__name__}: {exc})", where) from None


def read_index(store: Store, split: str) -> dict[str, str] | None:
    """``<split>/index.json`` (key -> chunk file name), or None when absent or unreadable."""
    import json

    rel = f"{split}/index.json" if split else "index.json"
    if not store.exists(rel):
        return None
    try:
        data = json.loads(store.read_text(rel))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
