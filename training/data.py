"""Streaming training data from WebDataset shards: deterministic, resumable, mixture-weighted.

Shards are tar files (local paths or any fsspec URL). With ``data.root`` = a build's OUT, the shard
list, each shard's dataset and every sample's byte offset, frame count and static/dynamic flag come
from ``OUT/index.parquet`` (without one: the same rows made from the ledger and the plan,
``manifests/index_rows.py``); otherwise ``data.shards`` (paths, URLs or globs) are read as one
dataset named ``all`` with nothing known before reading.

A stage *accepts* a clip that passes its scene filter (static / dynamic / any) and has at least
``num_frames`` frames. With the index this is decided before any shard is opened: a dataset with no
accepted clip is left out, and the default mixture weight of a dataset is its number of accepted
clips (not of all its clips: a mostly-dynamic dataset's few static clips would otherwise dominate the
static stages). A stage where no dataset has an accepted clip is a ``ValueError`` naming the counts.
Without the index, ``meta.json`` is read before decoding; a stream whose epoch yields no accepted clip
ends, and a stage whose streams all end is a ``RuntimeError`` (never an endless loop).

The stream of one *part* (= one DataLoader worker of one rank; ``n_parts = world * workers``):

* per dataset, an endless sequence of epochs. Epoch ``e`` permutes the dataset's shards with
  ``seed``; parts take every ``n_parts``-th shard (split by node, then by worker). When a dataset has
  fewer shards (holding accepted clips) than parts, the accepted samples in the catalog's order (the same every epoch) are cut
  into ``n_parts`` ranges of ceil(N / n_parts) consecutive samples (wrapping around; part p reads
  only its range, seeking to the samples' byte offsets), which walk on by all of them every epoch:
  the dataset is read about once per epoch in total, not once per part, and every sample alike
  over epochs (equally long ranges: every part emits at the same rate). Without an index that case
  cuts the same ranges, after one read of every shard to learn which samples the stage accepts
  (``meta.json``); each epoch a part then reads the shards holding its range, up to its last
  sample there. With as many shards as parts, a part whose shards of an epoch hold no accepted
  sample (no index) takes every ``n_parts``-th accepted sample of all shards (the first, when
  there are fewer), so its stream ends only when no shard has one. A shuffle buffer
  (``shuffle_buffer`` samples, seeded per part and epoch, drained at the epoch's end) reorders them;
* a mixture: each output sample's dataset is drawn with probability proportional to
  ``stage.mixture[ds]`` (or the dataset's accepted-clip count when no mixture is set) x its repeat
  weight: ``data.repeat[ds]``, else the build's ``datasets.<ds>.repeat_weight`` (its recorded config), else 1;
* per sample: ``T`` frames at a random stride (<= ``max_frame_stride``) and start, decoded, centre-cropped
  to a square and resized to the stage resolution (intrinsics follow exactly), the world re-expressed
  in the first camera's frame, ``tracks_per_sample`` tracks drawn, the ``caption`` of ``meta.json``
  (empty when absent); all randomness seeded by (seed, stage, part, sample number), so a sample never
  depends on where a run was resumed.

Every shard of a ``data.root`` output is checked against the sha256 its build recorded
(``index.parquet``'s ``shard_sha256``, else the ledger) before any of its samples is used, and
refused with :class:`ShardChecksumError` when it changed (e.g. a zombie write attempt published
after the ledger committed): a process reads a shard whole once to check it, into a local spool
the samples are then read from, and afterwards compares only the stored object's fingerprint
(size and ETag, or size, mtime and inode), hashing it again when that changed.

The position is (stage index, batches consumed in the stage). The DataLoader takes batch i from
worker i mod W; a resumed loader's worker w therefore plays the part of worker (w + consumed) mod W,
so the resumed stream equals the uninterrupted one with any number of workers. Resuming replays the
raw sample sequence without decoding (cost: reading the skipped bytes of the current stage).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image

from pipeline.clip import Clip
from pipeline.sample_format import decode_sample as DECODE  # the shard format: DECODE reads a sample
from pipeline.sample_format import encode_clip as ENCODE  # noqa: F401 - ENCODE writes one (training/synthetic.py)
from training.config import DataConfig, StageConfig


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


@dataclass(frozen=True)
class SampleRef:
    """One sample as ``index.parquet`` lists it."""

    key: str
    offset: int  # byte offset of its first tar member header
    num_frames: int
    dynamic: bool


class Catalog(NamedTuple):
    shards: dict[str, list[str]]  # dataset -> shard URLs (sorted)
    counts: dict[str, int]  # dataset -> samples (shards when nothing is known about samples)
    keys: dict[str, str]  # key -> dataset (empty without an index)
    samples: dict[str, list[SampleRef]] | None  # shard URL -> its samples in file order (None: no index)
    # shard URL -> the sha256 its build recorded (index.parquet's shard_sha256; None: the index has
    # no such column, or there is no index: see shard_checksums)
    checksums: dict[str, str] | None = None
    # dataset -> the build's ``datasets.<name>.repeat_weight`` (its recorded config; empty without one)
    repeat: dict[str, float] = {}
    # shard URL -> the stored object's fingerprint when its build published it (index.parquet's
    # shard_fingerprint; None: the index has no such column): a shard still showing it is trusted
    fingerprints: dict[str, str] | None = None


def resolve_catalog(cfg: DataConfig, split: str = "train") -> Catalog:
    """Shards per dataset and, from a build's ``index.parquet``, what is in them.

    ``split``: the index's ``split`` column selects ``train`` samples (for training: held-out scenes are
    never read) or ``val`` ones (validation, ``d4s eval``); an index without the column is all ``train``.
    A build output without an index (its driver stopped before writing it) gets the same rows from
    its ledger and plan (:mod:`manifests.index_rows`), split by its recorded ``val_fraction``. A
    folder of shards with no plan, or ``data.shards``, has no split: every shard is ``train`` and
    ``val`` is empty.
    """
    if cfg.root:
        root = cfg.root.rstrip("/")
        index = f"{root}/index.parquet"
        import fsspec

        fs, _, _ = fsspec.get_fs_token_paths(index)
        if fs.exists(index):
            import pyarrow.parquet as pq

            with fsspec.open(index, "rb") as f:
                cat = _catalog_of_rows(pq.read_table(f).to_pylist(), root, index, split)
            return cat._replace(repeat=_repeat_weights(root))
        rows = _rows_of_output(root)
        if rows is not None:
            if not rows and split == "train":
                raise FileNotFoundError(f"no shards recorded done under {root}/shards and no {index}")
            cat = _catalog_of_rows(rows, root, f"{root}/manifests/shards.parquet", split)
            return cat._replace(repeat=_repeat_weights(root))
        found = _expand(f"{root}/shards/**/*.tar")  # no plan recorded: a folder of shards, read as data.shards
        if split != "train":
            return Catalog({}, {}, {}, None)
        if not found:
            raise FileNotFoundError(f"no shards recorded done under {root}/shards and no {index}")
        return Catalog({"all": found}, {"all": len(found)}, {}, None)
    found = sorted({p for pat in cfg.shards for p in _expand(pat)})
    if split != "train":
        return Catalog({}, {}, {}, None)
    if not found:
        raise FileNotFoundError(f"no shards match {cfg.shards}")
    return Catalog({"all": found}, {"all": len(found)}, {}, None)


def _catalog_of_rows(tab: list[dict], root: str, source: str, split: str) -> Catalog:
    """The catalog of ``split`` from index rows (``manifests/schemas.py`` INDEX_SCHEMA, shard_path
    relative to the output; ``source`` names where they come from in errors)."""
    shards: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    keys = {}
    samples: dict[str, list[SampleRef]] | None = {}
    sums: dict[str, str] | None = {} if tab and "shard_sha256" in tab[0] else None
    prints: dict[str, str] | None = {} if tab and "shard_fingerprint" in tab[0] else None
    for r in tab:
        url = shard_url(root, r["shard_path"], source)
        if sums is not None and r.get("shard_sha256"):
            sums[url] = r["shard_sha256"]
        if prints is not None and r.get("shard_fingerprint"):
            prints[url] = r["shard_fingerprint"]
        if (r.get("split") or "train") != split:
            # kept in ``samples`` (the shard's layout: runs of consecutive samples are read in one
            # go), but not in ``keys``, so no stream ever yields it
            if samples is not None and r.get("offset") is not None:
                samples.setdefault(url, []).append(
                    SampleRef(r["key"], int(r["offset"]), int(r["num_frames"] or 0), bool(r["dynamic"]))
                )
            continue
        shards.setdefault(r["dataset"], set()).add(url)  # a set: a list's `in` made start-up quadratic
        counts[r["dataset"]] = counts.get(r["dataset"], 0) + 1
        keys[r["key"]] = r["dataset"]
        if samples is not None and all(r.get(c) is not None for c in ("offset", "num_frames", "dynamic")):
            samples.setdefault(url, []).append(
                SampleRef(r["key"], int(r["offset"]), int(r["num_frames"]), bool(r["dynamic"]))
            )
        else:
            samples = None  # an index without per-sample columns: read shards to learn
    if samples is not None:
        samples = {u: sorted(v, key=lambda x: x.offset) for u, v in samples.items()}
    return Catalog({k: sorted(v) for k, v in sorted(shards.items())}, counts, keys, samples, sums, {}, prints)


def _repeat_weights(root: str) -> dict[str, float]:
    """Each dataset's ``repeat_weight`` as the build at ``root`` resolved it (the adapter's default
    when its config set none; docs/DATASETS.md says why per dataset); empty when the output has no
    recorded config (a folder of shards written by other means)."""
    from pipeline.config import OUTPUT_CONFIG_NAME, load_output_config
    from pipeline.storage import Store

    if not Store(root).exists(OUTPUT_CONFIG_NAME):
        return {}
    resolved = load_output_config(root).resolved()
    return {name: float(ds.repeat_weight) for name, ds in resolved.datasets.items() if ds.repeat_weight is not None}


def _rows_of_output(root: str) -> list[dict] | None:
    """The index rows of the build output at ``root`` from its ledger and plan, split by its
    recorded config's ``val_fraction`` (None when no plan is recorded there). Only done shards are
    listed: a tar under ``shards/`` may be one whose build is still running or was never committed."""
    from manifests.index_rows import output_index_rows
    from manifests.store import ManifestStore
    from pipeline.config import load_output_config
    from pipeline.storage import Store

    ms = ManifestStore(Store(root))
    if not ms.has_plan():
        return None
    recorded = load_output_config(root)
    return output_index_rows(ms, {name: ds.val_fraction for name, ds in recorded.datasets.items()})


def shard_url(root: str, rel: str, source: str) -> str:
    """A shard's URL from its path relative to the output, as the index and the plan record it.
    A path leaving the output ('..', absolute, another URL) is refused naming ``source``: the
    loader never reads outside the output it was pointed at, whatever a manifest says."""
    from pipeline.storage import PathEscapeError, safe_join

    try:
        if not isinstance(rel, str) or "://" in rel:
            raise PathEscapeError(rel)
        return safe_join(root, rel)
    except PathEscapeError:
        raise ValueError(f"{source} lists shard_path {rel!r} outside the output {root}") from None


def resolve_shards(cfg: DataConfig) -> tuple[dict[str, list[str]], dict[str, int], dict[str, str]]:
    """-> (dataset -> shard URLs, dataset -> sample count, key -> dataset (may be empty))."""
    c = resolve_catalog(cfg)
    return c.shards, c.counts, c.keys


class ShardChecksumError(ValueError):
    """A shard's bytes are not the ones its build recorded: the loader refuses to use it."""


def shard_checksums(cfg: DataConfig, catalog: Catalog | None = None) -> dict[str, str]:
    """Shard URL -> the sha256 its build recorded, for ``data.root`` outputs: from
    ``index.parquet`` (``shard_sha256``; ``catalog``'s when given), else from the ledger's ``done``
    events. Empty for ``data.shards`` lists, which have no record to check against."""
    if not cfg.root:
        return {}
    if catalog is not None and catalog.checksums is not None:
        return catalog.checksums
    import fsspec
    import pyarrow.parquet as pq

    root = cfg.root.rstrip("/")
    index = f"{root}/index.parquet"
    url_of = lambda rel: shard_url(root, rel, index)  # noqa: E731
    fs, _, _ = fsspec.get_fs_token_paths(index)
    if fs.exists(index):
        with fsspec.open(index, "rb") as f:
            tab = pq.read_table(f)
        if "shard_sha256" in tab.column_names:
            return {
                url_of(r["shard_path"]): r["shard_sha256"]
                for r in tab.select(["shard_path", "shard_sha256"]).to_pylist()
                if r["shard_sha256"]
            }
    from manifests.store import ManifestStore
    from pipeline.storage import Store

    ms = ManifestStore(Store(root))
    if not ms.has_plan():
        return {}
    ledger = ms.ledger(columns=("sha256",))
    plan = f"{root}/manifests/shards.parquet"
    return {
        shard_url(root, sh["path"], plan): ledger[sh["shard_id"]]["sha256"]
        for sh in ms.shards()
        if ledger.get(sh["shard_id"], {}).get("state") == "done" and ledger[sh["shard_id"]].get("sha256")
    }


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
        raise ShardChecksumError(
            f"{url}: sha256 {h.hexdigest()} is not the {expected_sha256} its build recorded "
            f"(changed after publication); refusing it - run `d4s verify` and `d4s resume` on the output"
        )
    spool.seek(0)
    return spool


def _fingerprint(url: str) -> str | None:
    """The stored object's identity (size and ETag, or size, mtime and inode); None if unknown."""
    import fsspec

    from pipeline.storage import Store

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return Store.fingerprint(fs.info(path))
    except Exception:  # noqa: BLE001 - no identity: the shard is hashed again
        return None


# shard URL -> fingerprint of the stored object this process has hashed and found intact: a later
# read (the next epoch, another run of samples) compares the fingerprint, one metadata request,
# and hashes the shard again only when it changed
_VERIFIED: dict[str, str] = {}


# What a read of a shard by seeking fetches beyond what it asks, on an object store: s3fs's default
# (50 MiB) fetched 11.5x a 4.5 MB sample read at its offset in a 73 MB shard
SEEK_READ_AHEAD = 1 << 20


@contextlib.contextmanager
def _open_shard(url: str, expected_sha256: str | None = None, seeking: bool = False, published: str | None = None):
    """An open shard. With ``expected_sha256``: checked before any sample is used. A shard whose
    stored object still has the fingerprint ``published`` (the one its build recorded when it
    published the shard, after hashing it) is trusted as ``d4s resume`` trusts it, one metadata
    request; otherwise the first time this process reads it, it is read whole into a local spool
    (hashed on the way, then read from the spool), and later only its fingerprint is compared
    with the one it had when checked. ``seeking``: the reader jumps to samples' offsets, so a
    small read-ahead."""
    import fsspec

    if expected_sha256:
        fp = _fingerprint(url)
        if fp is not None and published is not None and fp == published:
            _VERIFIED[url] = fp
        if fp is None or _VERIFIED.get(url) != fp:
            spool = _checked_copy(url, expected_sha256)
            try:
                if fp is not None and _fingerprint(url) == fp:
                    _VERIFIED[url] = fp
                yield spool
            finally:
                spool.close()
            return
    if seeking:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb", block_size=SEEK_READ_AHEAD) as f:
            yield f
        return
    with fsspec.open(url, "rb") as f:
        yield f


def iter_tar(url: str, expected_sha256: str | None = None, published: str | None = None) -> Iterator[dict]:
    """Raw WebDataset samples of one tar: consecutive members grouped by key (name up to the first dot).
    With ``expected_sha256`` the shard is checked first (:func:`_open_shard`; ``published``: its
    fingerprint at publication), and refused on a mismatch."""
    with _open_shard(url, expected_sha256, published=published) as f:
        yield from _samples(f, url)


def iter_tar_runs(
    url: str, runs: list[tuple[int, int]], expected_sha256: str | None = None, published: str | None = None
) -> Iterator[dict]:
    """The samples of ``runs`` = [(byte offset of a sample's first member, number of consecutive samples)]
    of one tar, seeking to each run: only those samples' bytes are read (with ``expected_sha256``, the
    whole shard once per process, to check it, unless it is the object its build published:
    :func:`_open_shard`)."""
    with _open_shard(url, expected_sha256, seeking=True, published=published) as f:
        for offset, n in runs:
            f.seek(offset)
            for i, s in enumerate(_samples(f, url)):
                yield s
                if i + 1 == n:
                    break


class ShardReadError(ValueError):
    """A shard that is not a readable tar (damaged, cut short, another file); the message names it."""


def _samples(f, url: str) -> Iterator[dict]:
    """Samples from the current position of an open tar file (stream mode: reads forward only); a
    damaged or cut-short tar is a :class:`ShardReadError` naming the shard."""
    import zlib

    try:
        yield from _tar_samples(f, url)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ShardReadError(f"{url}: not a readable tar shard ({type(exc).__name__}: {exc})") from None


def _tar_samples(f, url: str) -> Iterator[dict]:
    with tarfile.open(fileobj=f, mode="r|*") as tar:
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
    """Endless raw-sample stream of one dataset for one part (see module docs).

    ``samples`` (shard URL -> SampleRef list, from the index) and ``accept_ref`` (the stage's filter on
    them) enable the index path: only accepted samples are read, by seeking to them.
    """

    def __init__(
        self,
        name: str,
        shards: list[str],
        part: int,
        n_parts: int,
        seed: int,
        shuffle_buffer: int,
        accept: Callable[[dict], bool],
        keys: dict[str, str],
        samples: dict[str, list[SampleRef]] | None = None,
        accept_ref: Callable[[SampleRef], bool] | None = None,
        checksums: dict[str, str] | None = None,
        fingerprints: dict[str, str] | None = None,
    ):
        self.name, self.shards, self.part, self.n_parts = name, shards, part, n_parts
        self.seed, self.buf_size, self.accept, self.keys = seed, shuffle_buffer, accept, keys
        self.samples, self.accept_ref = samples, accept_ref or (lambda r: True)
        self.checksums = checksums or {}  # shard URL -> recorded sha256, checked before the shard is used
        self.fingerprints = fingerprints or {}  # shard URL -> the object's fingerprint when published
        self._accepted: list[tuple[str, int]] | None = None  # no index: (shard, position) of accepted samples

    def _epoch(self, e: int) -> Iterator[dict]:
        order = _rng(self.seed, _ds_id(self.name), e).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        if self.samples is not None:
            yield from self._epoch_indexed(shards, e)
            return
        if len(shards) < self.n_parts:
            yield from self._epoch_ranged(e)
            return
        got = 0
        for url in shards[self.part :: self.n_parts]:
            for s in self._listed(url):
                if self.accept(s):
                    got += 1
                    yield s
        if not got:
            # None of this part's samples of the epoch is accepted (a stage filter), others may
            # be: take every n_parts-th accepted sample of all shards (or the first, when
            # there are fewer), so the stream ends only when no shard has one.
            k, first = 0, None
            for url in shards:
                for s in self._listed(url):
                    if not self.accept(s):
                        continue
                    first = s if first is None else first
                    if k % self.n_parts == self.part:
                        got += 1
                        yield s
                    k += 1
            if not got and first is not None:
                yield first

    def _epoch_ranged(self, e: int) -> Iterator[dict]:
        """No index, fewer shards than parts: this part's range of the accepted samples, cut as
        :meth:`_epoch_indexed` cuts them (equally long, walking on every epoch, over the same order
        every epoch). Which samples are accepted is learnt once, reading every shard (``meta.json``);
        each epoch then reads the shards that hold its range, up to its last sample there."""
        if self._accepted is None:
            self._accepted = [(u, i) for u in self.shards for i, s in enumerate(self._listed(u)) if self.accept(s)]
        flat = self._accepted
        n = len(flat)
        if n == 0:
            return  # nothing passes the stage's filter anywhere: the stream ends
        length = -(-n // self.n_parts)
        start = (e * length * self.n_parts + self.part * length) % n
        picked = {flat[(start + j) % n] for j in range(length)}
        for url in dict.fromkeys(u for u, _ in flat):
            last = max((i for u, i in picked if u == url), default=-1)
            for i, s in enumerate(self._listed(url)):
                if i > last:
                    break
                if (url, i) in picked:
                    yield s

    def _listed(self, url: str) -> Iterator[dict]:
        """The shard's samples; with an index, only those it lists for this dataset and split."""
        for s in iter_tar(url, self.checksums.get(url), self.fingerprints.get(url)):
            if self.keys and self.keys.get(s["__key__"]) != self.name:
                continue
            yield s

    def _epoch_indexed(self, shards: list[str], e: int = 0) -> Iterator[dict]:
        """This part's accepted samples of the epoch, read by seeking (module docs: how parts split)."""
        wanted = {
            u: [
                (i, r)
                for i, r in enumerate(self.samples.get(u, []))
                if self.keys.get(r.key) == self.name and self.accept_ref(r)
            ]
            for u in shards
        }
        shards = [u for u in shards if wanted[u]]
        if len(shards) >= self.n_parts:
            mine = [(u, wanted[u]) for u in shards[self.part :: self.n_parts]]
        else:
            # the samples in the catalog's order, the same every epoch: a walk over the epoch's
            # shard permutation instead read some samples more often than others, drifting apart
            # like a random walk over epochs (the shuffle buffer does the mixing)
            flat = [(u, ir) for u in self.shards if u in wanted for ir in wanted[u]]
            n = len(flat)
            if n == 0:
                return
            # Equally long ranges (every part emits at the same rate, so a shorter range would
            # draw its samples more often), ceil(n / parts) each, walking on by all of them every
            # epoch: over epochs every sample is read alike (within one), whatever n and parts.
            length = -(-n // self.n_parts)
            start = (e * length * self.n_parts + self.part * length) % n
            picked = [flat[(start + j) % n] for j in range(length)]
            mine = []
            for u, ir in picked:
                if not mine or mine[-1][0] != u:
                    mine.append((u, []))
                mine[-1][1].append(ir)
        for url, items in mine:
            runs: list[tuple[int, int]] = []
            prev = None
            for i, r in items:  # consecutive samples of the shard are read as one run
                if prev is not None and i == prev + 1:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((r.offset, 1))
                prev = i
            keys = {r.key for _, r in items}
            for s in iter_tar_runs(url, runs, self.checksums.get(url), self.fingerprints.get(url)):
                if s["__key__"] not in keys:
                    raise ValueError(
                        f"{url}: sample {s['__key__']!r} at an offset index.parquet gives to "
                        f"another sample; the index does not match the shard"
                    )
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


def scene_filter(scenes: str, min_frames: int = 1) -> Callable[[dict], bool]:
    """The stage's filter on a raw sample (reads ``meta.json``): scene kind and at least ``min_frames``."""

    def accept(s: dict) -> bool:
        meta = json.loads(s["meta.json"])
        if (len(meta.get("frame_indices", [])) or _num_frames(s)) < min_frames:
            return False
        if scenes == "any":
            return True
        dyn = bool(meta.get("dynamic", False))
        return dyn if scenes == "dynamic" else not dyn

    return accept


def ref_filter(scenes: str, min_frames: int) -> Callable[[SampleRef], bool]:
    """The same filter on an index entry."""

    def accept(r: SampleRef) -> bool:
        return r.num_frames >= min_frames and (scenes == "any" or r.dynamic == (scenes == "dynamic"))

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
    rgb = np.stack(
        [
            np.asarray(Image.fromarray(f[y0 : y0 + side, x0 : x0 + side]).resize((res, res), Image.BILINEAR))
            for f in clip.rgb
        ]
    )
    depth = valid = None
    if clip.depth is not None:
        idx = np.clip(((np.arange(res) + 0.5) / sc - 0.5).round().astype(int), 0, side - 1)
        rows, cols = y0 + idx[:, None], x0 + idx[None, :]  # nearest pixels, one gather per array
        depth, valid = clip.depth[:, rows, cols], clip.depth_valid[:, rows, cols]
    return rgb, intr, depth, valid


def process(
    clip: Clip, frames: list[int] | None, res: int, n_tracks: int, rng: np.random.Generator, video_uint8: bool = False
) -> dict:
    """A decoded (already frame-subsampled) clip -> tensors for the model.

    ``video`` is (T,3,H,W) float in [0, 1], or with ``video_uint8`` the same frames as uint8 (the training
    loader: a quarter of the bytes through the workers' shared memory and the host-to-GPU copy, and
    no float conversion on the CPU; the trainer divides by 255 on the GPU, which gives the same values).
    """
    rgb, intr, depth, valid = crop_resize(clip, res)
    t = rgb.shape[0]
    w2c0 = np.linalg.inv(clip.c2w[0])
    c2w = w2c0[None] @ clip.c2w  # world := first camera frame
    video = torch.from_numpy(rgb).permute(0, 3, 1, 2)
    out = {
        "video": video if video_uint8 else video.float() / 255.0,
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
        tracks[:, : len(pick)] = torch.from_numpy(pts).float()
        vis[:, : len(pick)] = torch.from_numpy(tv[:, pick])
    out["tracks"], out["track_visible"] = tracks, vis
    out["has_tracks"] = torch.tensor(clip.tracks is not None and bool(vis.any()))
    lw = clip.meta.loss_weights or {}
    out["weights"] = torch.tensor(
        [lw.get("photo", 1.0), lw.get("depth", 1.0), lw.get("motion", 1.0)], dtype=torch.float32
    )
    out["dynamic"] = torch.tensor(bool(clip.meta.dynamic))
    out["key"] = clip.key
    return out


def collate(items: list[dict]) -> dict:
    return {
        k: ([it[k] for it in items] if k in ("key", "caption") else torch.stack([it[k] for it in items]))
        for k in items[0]
    }


class ShardStream(torch.utils.data.IterableDataset):
    """Batches for one rank of one curriculum stage, starting after ``start_batches`` consumed batches."""

    def __init__(
        self,
        data: DataConfig,
        stage: StageConfig,
        stage_index: int,
        n_tracks: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        start_batches: int = 0,
    ):
        super().__init__()
        self.data, self.stage, self.stage_index, self.n_tracks = data, stage, stage_index, n_tracks
        self.batch_size, self.rank, self.world, self.start_batches = batch_size, rank, world, start_batches
        self.catalog = resolve_catalog(data)
        self.shards, self.counts, self.keys = self.catalog.shards, self.catalog.counts, self.catalog.keys
        self.accept_ref = ref_filter(stage.scenes, stage.num_frames)
        self.checksums = shard_checksums(data, self.catalog)

    def accepted(self) -> dict[str, int] | None:
        """Per dataset, the clips the stage accepts (from the index; None without one)."""
        if self.catalog.samples is None:
            return None
        return {
            ds: sum(
                self.accept_ref(r) for u in urls for r in self.catalog.samples.get(u, []) if self.keys.get(r.key) == ds
            )
            for ds, urls in self.shards.items()
        }

    def weights(self) -> dict[str, float]:
        """Mixture weight per dataset (module docs); datasets with no accepted clip get 0."""
        for what, names in (("its mixture", self.stage.mixture or {}), ("data.repeat", self.data.repeat)):
            unknown = sorted(set(names) - set(self.shards))
            if unknown:  # a typo would silently weigh that dataset 0 (or 1)
                raise ValueError(
                    f"stage {self.stage.name}: {what} names datasets the data does not hold: {unknown} "
                    f"(it holds {sorted(self.shards)})"
                )
        accepted = self.accepted()
        out = {}
        for ds in self.shards:
            if self.stage.mixture is not None:
                base = self.stage.mixture.get(ds, 0.0)
            else:
                base = float(accepted[ds] if accepted is not None else self.counts[ds])
            if accepted is not None and accepted[ds] == 0:
                base = 0.0
            # data.repeat[ds] replaces the build's repeat_weight of ds
            out[ds] = base * self.data.repeat.get(ds, self.catalog.repeat.get(ds, 1.0))
        if not any(v > 0 for v in out.values()):
            what = f"'{self.stage.scenes}' clips of at least {self.stage.num_frames} frames"
            if accepted is not None:
                raise ValueError(
                    f"stage {self.stage.name}: no dataset has {what} among those its mixture selects "
                    f"(accepted per dataset: {accepted}; mixture: {self.stage.mixture or 'by size'})"
                )
            raise ValueError(f"stage {self.stage.name}: mixture selects no dataset among {list(self.shards)}")
        return {k: v for k, v in out.items() if v > 0}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        nw, wid = (info.num_workers, info.id) if info else (1, 0)
        # The DataLoader takes batch i from worker i mod nw, starting again at worker 0 when resumed: so
        # this worker continues the stream of worker (wid + start_batches) mod nw of the first run.
        wid = (wid + self.start_batches) % nw
        part, n_parts = self.rank * nw + wid, self.world * nw
        mine = len(range(wid, self.start_batches, nw))  # batches this (logical) worker already produced
        skip = mine * self.batch_size
        seed = self.data.seed * 1000 + self.stage_index
        accept = scene_filter(self.stage.scenes, self.stage.num_frames)
        weights = self.weights()
        streams = {
            ds: iter(
                DatasetStream(
                    ds,
                    self.shards[ds],
                    part,
                    n_parts,
                    seed,
                    self.data.shuffle_buffer,
                    accept,
                    self.keys,
                    self.catalog.samples,
                    self.accept_ref,
                    self.checksums,
                    self.catalog.fingerprints,
                )
            )
            for ds in weights
        }
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
            if frames is None:  # the filters accept only clips long enough
                raise RuntimeError(
                    f"{raw.get('__url__')}: sample {raw['__key__']} has {t_clip} frames, fewer than "
                    f"stage {self.stage.name}'s {self.stage.num_frames}, yet passed the filter"
                )
            emitted += 1
            if emitted <= skip:
                continue
            clip = DECODE(raw, frames)
            item = process(clip, frames, self.stage.resolution, self.n_tracks, srng, video_uint8=True)
            item["caption"] = str(meta.get("caption") or "")
            batch.append(item)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        raise RuntimeError(
            f"stage {self.stage.name}: no sample of the datasets {sorted(weights)} passes the "
            f"stage's filter ('{self.stage.scenes}' clips of at least {self.stage.num_frames} frames) "
            f"for rank {self.rank}, worker {wid}"
        )


def _num_frames(raw: dict) -> int:
    return int(np.load(io.BytesIO(raw["intrinsics.npy"]), allow_pickle=False).shape[0])


def make_loader(
    data: DataConfig,
    stage: StageConfig,
    stage_index: int,
    n_tracks: int,
    batch_size: int,
    rank: int,
    world: int,
    start_batches: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """``pin_memory`` (on a GPU): batches in page-locked memory, so their copy to the device is queued
    without the host waiting for it."""
    ds = ShardStream(data, stage, stage_index, n_tracks, batch_size, rank, world, start_batches)
    kw = {"pin_memory": pin_memory}
    if data.num_workers > 0:
        kw.update(prefetch_factor=2, persistent_workers=False)
    # a private generator: creating the iterator must not consume the global torch RNG (resume determinism)
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=data.num_workers, generator=torch.Generator().manual_seed(data.seed), **kw
    )
