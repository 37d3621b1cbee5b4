"""Streaming training data from WebDataset shards: deterministic, resumable, mixture-weighted.

Shards are tar files (local paths or any fsspec URL). With ``data.root`` = a build's OUT, the shard
list and each shard's dataset come from ``OUT/index.parquet`` (key, shard, dataset); otherwise
``data.shards`` (paths, URLs or globs) are read as one dataset named ``all``.

The stream of one *part* (= one DataLoader worker of one rank; ``n_parts = world * workers``):

* per dataset, an endless sequence of epochs. Epoch ``e`` permutes the dataset's shards with
  ``seed``; parts take every ``n_parts``-th shard (split by node, then by worker), or — when a dataset
  has fewer shards than parts — every ``n_parts``-th sample of all shards. A shuffle buffer
  (``shuffle_buffer`` samples, seeded per part and epoch, drained at the epoch's end) reorders them.
  Samples failing the stage's scene filter (static/dynamic, read from ``meta.json``) are dropped
  before decoding;
* a mixture: each output sample's dataset is drawn with probability proportional to
  ``stage.mixture[ds]`` (or the dataset's sample count when no mixture is set) x ``data.repeat[ds]``;
* per sample: ``T`` frames at a random stride (<= ``max_frame_stride``) and start, decoded, centre-cropped
  to a square and resized to the stage resolution (intrinsics follow exactly), the world re-expressed
  in the first camera's frame, ``tracks_per_sample`` tracks drawn; all randomness seeded by
  (seed, stage, part, sample number), so a sample never depends on where a run was resumed.

The position is (stage index, batches consumed in the stage). Resuming replays the raw sample
sequence without decoding (cost: reading the skipped bytes of the current stage).
"""
from __future__ import annotations

import glob
import inspect
import io
import json
import os
import tarfile
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline.clip import Clip
from training.config import DataConfig, StageConfig

# --- the one place where the sample format is chosen --------------------------------------------
try:  # the real shard format (pipeline/sample_format.py)
    from pipeline.sample_format import decode_sample as _decode
    from pipeline.sample_format import encode_clip as ENCODE
except ImportError:  # pragma: no cover - only before the format landed
    _decode = ENCODE = None

_DECODE_TAKES_FRAMES = _decode is not None and "frames" in inspect.signature(_decode).parameters


def DECODE(sample: dict, frames: list[int] | None = None) -> Clip:
    """Raw WebDataset sample -> Clip (optionally only ``frames``)."""
    if _DECODE_TAKES_FRAMES:
        return _decode(sample, frames=frames)
    clip = _decode(sample)
    if frames is None:
        return clip
    from dataclasses import replace
    sel = lambda a: None if a is None else a[frames]  # noqa: E731
    return replace(clip, rgb=clip.rgb[frames], intrinsics=clip.intrinsics[frames], c2w=clip.c2w[frames],
                   depth=sel(clip.depth), depth_valid=sel(clip.depth_valid), tracks=sel(clip.tracks),
                   track_visible=sel(clip.track_visible))


# --- shard discovery ------------------------------------------------------------------------------
def _expand(pattern: str) -> list[str]:
    if any(c in pattern for c in "*?[") and "://" not in pattern:
        return sorted(glob.glob(pattern, recursive=True))
    if any(c in pattern for c in "*?["):
        import fsspec
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        proto = pattern.split("://", 1)[0]
        return sorted(f"{proto}://{p}" for p in paths)
    return [pattern]


def resolve_shards(cfg: DataConfig) -> tuple[dict[str, list[str]], dict[str, int], dict[str, str]]:
    """-> (dataset -> shard URLs, dataset -> sample count, key -> dataset (may be empty))."""
    if cfg.root:
        root = cfg.root.rstrip("/")
        index = f"{root}/index.parquet"
        import fsspec
        fs, _, _ = fsspec.get_fs_token_paths(index)
        if fs.exists(index):
            import pyarrow.parquet as pq
            with fsspec.open(index, "rb") as f:
                tab = pq.read_table(f).to_pylist()
            shards: dict[str, list[str]] = {}
            counts: dict[str, int] = {}
            keys = {}
            for r in tab:
                # index.parquet schema: manifests/schemas.py INDEX_SCHEMA (shard_path relative to the output)
                rel = r["shard_path"]
                url = rel if "://" in rel or os.path.isabs(rel) else f"{root}/{rel}"
                lst = shards.setdefault(r["dataset"], [])
                if url not in lst:
                    lst.append(url)
                counts[r["dataset"]] = counts.get(r["dataset"], 0) + 1
                keys[r["key"]] = r["dataset"]
            return {k: sorted(v) for k, v in sorted(shards.items())}, counts, keys
        found = _expand(f"{root}/shards/**/*.tar")
        if not found:
            raise FileNotFoundError(f"no shards under {root}/shards and no {index}")
        return {"all": found}, {"all": len(found)}, {}
    found = sorted({p for pat in cfg.shards for p in _expand(pat)})
    if not found:
        raise FileNotFoundError(f"no shards match {cfg.shards}")
    return {"all": found}, {"all": len(found)}, {}


class ShardChecksumError(ValueError):
    """A shard's bytes are not the ones its build recorded: the loader refuses to use it."""


def shard_checksums(cfg: DataConfig) -> dict[str, str]:
    """Shard URL -> the sha256 its build recorded, for ``data.root`` outputs: from
    ``index.parquet`` (``shard_sha256``), else from the ledger's ``done`` events. Empty for
    ``data.shards`` lists, which have no record to check against."""
    if not cfg.root:
        return {}
    import fsspec
    import pyarrow.parquet as pq

    root = cfg.root.rstrip("/")
    url_of = lambda rel: rel if "://" in rel or os.path.isabs(rel) else f"{root}/{rel}"  # noqa: E731
    index = f"{root}/index.parquet"
    fs, _, _ = fsspec.get_fs_token_paths(index)
    if fs.exists(index):
        with fsspec.open(index, "rb") as f:
            tab = pq.read_table(f)
        if "shard_sha256" in tab.column_names:
            return {url_of(r["shard_path"]): r["shard_sha256"]
                    for r in tab.select(["shard_path", "shard_sha256"]).to_pylist() if r["shard_sha256"]}
    from manifests.store import ManifestStore
    from pipeline.storage import Store

    ms = ManifestStore(Store(root))
    if not ms.has_plan():
        return {}
    ledger = ms.ledger()
    return {url_of(sh["path"]): ledger[sh["shard_id"]]["sha256"] for sh in ms.shards()
            if ledger.get(sh["shard_id"], {}).get("state") == "done" and ledger[sh["shard_id"]].get("sha256")}


SPOOL_IN_MEMORY = 512 << 20  # a checked shard is held in memory up to this size, beyond on local disk


def _checked_copy(url: str, expected_sha256: str):
    """The shard's bytes in a local spool, read once and hashed on the way (before any sample is
    used); raises :class:`ShardChecksumError` when they are not the recorded ones."""
    import hashlib
    import tempfile

    import fsspec

    h = hashlib.sha256()
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    with fsspec.open(url, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
            spool.write(chunk)
    if h.hexdigest() != expected_sha256:
        spool.close()
        raise ShardChecksumError(f"{url}: sha256 {h.hexdigest()} is not the {expected_sha256} its build recorded "
                                 f"(changed after publication); refusing it - run `d4s verify` and `d4s resume` on the output")
    spool.seek(0)
    return spool


def iter_tar(url: str, expected_sha256: str | None = None) -> Iterator[dict]:
    """Raw WebDataset samples of one tar: consecutive members grouped by key (name up to the first dot).
    With ``expected_sha256`` the whole shard is checked first, and refused on a mismatch."""
    import contextlib

    import fsspec

    with contextlib.ExitStack() as stack:
        f = stack.enter_context(_checked_copy(url, expected_sha256) if expected_sha256 else fsspec.open(url, "rb"))
        tar = stack.enter_context(tarfile.open(fileobj=f, mode="r|*"))
        cur: dict | None = None
        for m in tar:
            if not m.isfile():
                continue
            base = m.name
            d = os.path.dirname(base)
            name = os.path.basename(base)
            if "." not in name:
                continue
            key, suffix = name.split(".", 1)
            key = f"{d}/{key}" if d else key
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    yield cur
                cur = {"__key__": key, "__url__": url}
            cur[suffix] = tar.extractfile(m).read()
        if cur is not None:
            yield cur


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def _ds_id(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") ^ len(name)


class DatasetStream:
    """Endless raw-sample stream of one dataset for one part (see module docs)."""

    def __init__(self, name: str, shards: list[str], part: int, n_parts: int, seed: int, shuffle_buffer: int,
                 accept: Callable[[dict], bool], keys: dict[str, str], checksums: dict[str, str] | None = None):
        self.name, self.shards, self.part, self.n_parts = name, shards, part, n_parts
        self.seed, self.buf_size, self.accept, self.keys = seed, shuffle_buffer, accept, keys
        self.checksums = checksums or {}  # shard URL -> recorded sha256, checked before the shard is used

    def _epoch(self, e: int) -> Iterator[dict]:
        order = _rng(self.seed, _ds_id(self.name), e).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        by_shard = len(shards) >= self.n_parts
        mine = shards[self.part::self.n_parts] if by_shard else shards
        n = 0
        for url in mine:
            for s in iter_tar(url, self.checksums.get(url)):
                if self.keys and self.keys.get(s["__key__"], self.name) != self.name:
                    continue
                n += 1
                if not by_shard and (n - 1) % self.n_parts != self.part:
                    continue
                if self.accept(s):
                    yield s

    def __iter__(self) -> Iterator[dict]:
        e = 0
        while True:
            rng = _rng(self.seed, _ds_id(self.name), e, self.part, 7)
            buf: list[dict] = []
            got = False
            for s in self._epoch(e):
                got = True
                buf.append(s)
                if len(buf) >= self.buf_size:
                    yield buf.pop(int(rng.integers(len(buf))))
            while buf:
                yield buf.pop(int(rng.integers(len(buf))))
            if not got:
                return  # nothing in this part passes the filter: the stream ends
            e += 1


def scene_filter(scenes: str) -> Callable[[dict], bool]:
    def accept(s: dict) -> bool:
        if scenes == "any":
            return True
        dyn = bool(json.loads(s["meta.json"]).get("dynamic", False))
        return dyn if scenes == "dynamic" else not dyn
    return accept


# --- per-sample processing ------------------------------------------------------------------------
def choose_frames(t_clip: int, t: int, max_stride: int, rng: np.random.Generator) -> list[int] | None:
    strides = [s for s in range(1, max_stride + 1) if (t - 1) * s + 1 <= t_clip]
    if not strides:
        return None
    s = int(rng.choice(strides))
    start = int(rng.integers(0, t_clip - (t - 1) * s))
    return [start + i * s for i in range(t)]


def crop_resize(clip: Clip, res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Centre square crop then resize to res x res. Returns rgb (T,res,res,3) uint8, intrinsics, depth, valid."""
    t, h, w, _ = clip.rgb.shape
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    sc = res / side
    intr = clip.intrinsics.astype(np.float64).copy()
    intr[:, 2] -= x0
    intr[:, 3] -= y0
    intr *= sc
    rgb = np.stack([np.asarray(Image.fromarray(f[y0:y0 + side, x0:x0 + side]).resize((res, res), Image.BILINEAR))
                    for f in clip.rgb])
    depth = valid = None
    if clip.depth is not None:
        idx = np.clip(((np.arange(res) + 0.5) / sc - 0.5).round().astype(int), 0, side - 1)
        depth = clip.depth[:, y0:y0 + side, x0:x0 + side][:, idx][:, :, idx]
        valid = clip.depth_valid[:, y0:y0 + side, x0:x0 + side][:, idx][:, :, idx]
    return rgb, intr, depth, valid


def process(clip: Clip, frames: list[int] | None, res: int, n_tracks: int, rng: np.random.Generator) -> dict:
    """A decoded (already frame-subsampled) clip -> tensors for the model."""
    rgb, intr, depth, valid = crop_resize(clip, res)
    t = rgb.shape[0]
    w2c0 = np.linalg.inv(clip.c2w[0])
    c2w = w2c0[None] @ clip.c2w  # world := first camera frame
    out = {
        "video": torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0,
        "intrinsics": torch.from_numpy(intr).float(),
        "c2w": torch.from_numpy(c2w).float(),
        "has_depth": torch.tensor(depth is not None),
        "depth": torch.from_numpy(depth).float() if depth is not None else torch.zeros(t, res, res),
        "depth_valid": torch.from_numpy(valid) if valid is not None else torch.zeros(t, res, res, dtype=torch.bool),
    }
    tracks = torch.zeros(t, n_tracks, 3)
    vis = torch.zeros(t, n_tracks, dtype=torch.bool)
    if clip.tracks is not None and n_tracks > 0:
        tv = clip.track_visible
        ok = np.nonzero(tv.any(0))[0]
        pick = np.sort(rng.choice(ok, size=min(n_tracks, len(ok)), replace=False)) if len(ok) else ok
        pts = np.nan_to_num(clip.tracks[:, pick].astype(np.float64))
        pts = pts @ w2c0[:3, :3].T + w2c0[:3, 3]
        tracks[:, :len(pick)] = torch.from_numpy(pts).float()
        vis[:, :len(pick)] = torch.from_numpy(tv[:, pick])
    out["tracks"], out["track_visible"] = tracks, vis
    out["has_tracks"] = torch.tensor(clip.tracks is not None and bool(vis.any()))
    lw = clip.meta.loss_weights or {}
    out["weights"] = torch.tensor([lw.get("photo", 1.0), lw.get("depth", 1.0), lw.get("motion", 1.0)],
                                  dtype=torch.float32)
    out["dynamic"] = torch.tensor(bool(clip.meta.dynamic))
    out["key"] = clip.key
    return out


def collate(items: list[dict]) -> dict:
    return {k: ([it[k] for it in items] if k == "key" else torch.stack([it[k] for it in items])) for k in items[0]}


class ShardStream(torch.utils.data.IterableDataset):
    """Batches for one rank of one curriculum stage, starting after ``start_batches`` consumed batches."""

    def __init__(self, data: DataConfig, stage: StageConfig, stage_index: int, n_tracks: int, batch_size: int,
                 rank: int = 0, world: int = 1, start_batches: int = 0):
        super().__init__()
        self.data, self.stage, self.stage_index, self.n_tracks = data, stage, stage_index, n_tracks
        self.batch_size, self.rank, self.world, self.start_batches = batch_size, rank, world, start_batches
        self.shards, self.counts, self.keys = resolve_shards(data)
        self.checksums = shard_checksums(data)

    def weights(self) -> dict[str, float]:
        out = {}
        for ds in self.shards:
            base = self.stage.mixture.get(ds, 0.0) if self.stage.mixture is not None else float(self.counts[ds])
            out[ds] = base * self.data.repeat.get(ds, 1.0)
        if not any(v > 0 for v in out.values()):
            raise ValueError(f"stage {self.stage.name}: mixture selects no dataset among {list(self.shards)}")
        return out

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        nw, wid = (info.num_workers, info.id) if info else (1, 0)
        part, n_parts = self.rank * nw + wid, self.world * nw
        mine = len(range(wid, self.start_batches, nw))  # batches this worker already produced
        skip = mine * self.batch_size
        seed = self.data.seed * 1000 + self.stage_index
        accept = scene_filter(self.stage.scenes)
        weights = {k: v for k, v in self.weights().items() if v > 0}
        streams = {ds: iter(DatasetStream(ds, self.shards[ds], part, n_parts, seed, self.data.shuffle_buffer,
                                          accept, self.keys, self.checksums)) for ds in weights}
        mix = _rng(seed, part, 11)
        names = sorted(weights)
        n = emitted = 0
        batch: list[dict] = []
        while names:
            p = np.array([weights[k] for k in names])
            ds = names[int(mix.choice(len(names), p=p / p.sum()))]
            try:
                raw = next(streams[ds])
            except StopIteration:
                names.remove(ds)
                continue
            n += 1
            srng = _rng(seed, part, n, 13)  # per-sample randomness, independent of resume point
            meta = json.loads(raw["meta.json"])
            t_clip = len(meta.get("frame_indices", [])) or _num_frames(raw)
            frames = choose_frames(t_clip, self.stage.num_frames, self.stage.max_frame_stride, srng)
            if frames is None:
                continue
            emitted += 1
            if emitted <= skip:
                continue
            clip = DECODE(raw, frames)
            batch.append(process(clip, frames, self.stage.resolution, self.n_tracks, srng))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        raise RuntimeError(f"stage {self.stage.name}: no sample passes the '{self.stage.scenes}' filter "
                           f"for rank {self.rank}")


def _num_frames(raw: dict) -> int:
    return int(np.load(io.BytesIO(raw["intrinsics.npy"])).shape[0])


def make_loader(data: DataConfig, stage: StageConfig, stage_index: int, n_tracks: int, batch_size: int,
                rank: int, world: int, start_batches: int = 0) -> torch.utils.data.DataLoader:
    ds = ShardStream(data, stage, stage_index, n_tracks, batch_size, rank, world, start_batches)
    kw = {}
    if data.num_workers > 0:
        kw = dict(prefetch_factor=2, persistent_workers=False)
    # a private generator: creating the iterator must not consume the global torch RNG (resume determinism)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=data.num_workers,
                                       generator=torch.Generator().manual_seed(data.seed), **kw)
