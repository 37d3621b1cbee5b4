"""Validation: held-out clips measured with the model as it is used (training/metrics.py's measures).

Which clips: ``validation.clips`` clips of the held-out scenes (the ``val`` split of ``data.root``'s
``index.parquet``, chosen at build time: pipeline/split.py), or of ``validation.root`` / every sample of
``validation.shards``. They are chosen once, deterministically (datasets in turn, keys in order), and
their raw bytes kept; every validation decodes the first ``num_frames`` frames of each at the current
stage's resolution (the training crop and resize, the world in the first camera's frame), so the clips,
frames and tracks are the same at every validation of a stage. A clip shorter than the stage's frames
is left out of that stage's validations.

What is measured per clip (each a ``(sum, count)`` over clips that have it):

* ``recon_*``: the Gaussians the LDRM decodes from the clip's own latents (the VAE encoding of every
  frame), rendered at the clip's cameras at every frame's time (deformation applied);
* ``sample_*``: the same from latents that the flow samples from the first frame and the cameras only
  (``validation.sample_steps`` Euler steps; 0 leaves these out), which is what generation does;
* for both: PSNR, SSIM, LPIPS (when its weights are there) of all frames, depth AbsRel / delta < 1.25
  where the clip's depth is valid (and AbsRel after median scaling, a diagnostic), and the end-point error of the Gaussians tied to the clip's tracks.

Ranks split the clips (clip i on rank i mod world) and all-reduce one fixed-length vector of sums and
counts, as training metrics are reduced. Every rank runs the same number of forwards (a rank with fewer
clips repeats one and discards it), because under FSDP each forward is a collective. The RNG is forked
and seeded per clip, so a validation neither depends on nor disturbs the training stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from training import metrics as M
from training.config import VALIDATION_MEASURES, DataConfig, StageConfig, TrainConfig
from training.gaussians import GaussianMaps, gaussians_at, track_positions


@dataclass
class RawClip:
    """One validation clip as its shard holds it (raw WebDataset entries) and where it came from."""

    key: str
    dataset: str
    sample: dict
    num_frames: int


def validation_source(cfg: TrainConfig) -> tuple[DataConfig, str]:
    """(where validation clips come from, which split of it)."""
    v = cfg.validation
    if v.shards:
        return DataConfig(shards=list(v.shards)), "all"
    return DataConfig(root=v.root or cfg.data.root), "val"


def load_clips(source: DataConfig, split: str, limit: int | None) -> list[RawClip]:
    """The first ``limit`` clips of ``source`` (its ``split``; ``all``: every sample of its shards), datasets
    in turn and keys in order within each, read by seeking to them when the index gives offsets."""
    import json

    from training.data import ShardReadError, iter_tar, iter_tar_runs, resolve_catalog, shard_checksums

    if split == "all":
        out = []
        for url in resolve_catalog(source).shards["all"]:
            for s in iter_tar(url):
                out.append(RawClip(s["__key__"], "all", s, _frames(s)))
                if limit is not None and len(out) >= limit:
                    return out
        return out
    if source.root is None:
        return []
    cat = resolve_catalog(source, split=split)
    if not cat.keys:
        return []
    sums = shard_checksums(source, cat)  # each shard checked against its recorded sha256 before use
    where = {r.key: (url, r) for url, refs in (cat.samples or {}).items() for r in refs if r.key in cat.keys}
    by_ds: dict[str, list[str]] = {}
    for key in sorted(cat.keys):
        by_ds.setdefault(cat.keys[key], []).append(key)
    order = [k for group in _round_robin(list(by_ds.values())) for k in group]
    if limit is not None:
        order = order[:limit]
    out = []
    for key in order:
        if key in where:
            url, ref = where[key]
            got = list(iter_tar_runs(url, [(ref.offset, 1)], sums.get(url), (cat.fingerprints or {}).get(url)))
            if not got:
                raise ShardReadError(f"{url}: no sample at byte {ref.offset}, where index.parquet puts {key!r}")
            (s,) = got
        else:  # an index without offsets: scan the dataset's shards
            s = next(
                x for url in cat.shards[cat.keys[key]] for x in iter_tar(url, sums.get(url)) if x["__key__"] == key
            )
        if s["__key__"] != key:
            raise ValueError(f"{s.get('__url__')}: found sample {s['__key__']!r} where index.parquet puts {key!r}")
        meta = json.loads(s["meta.json"])
        out.append(RawClip(key, cat.keys[key], s, len(meta.get("frame_indices", [])) or _frames(s)))
    return out


def _round_robin(groups: list[list[str]]) -> list[list[str]]:
    rounds = []
    for i in range(max((len(g) for g in groups), default=0)):
        rounds.append([g[i] for g in groups if i < len(g)])
    return rounds


def _frames(sample: dict) -> int:
    from training.data import _num_frames

    return _num_frames(sample)


def prepare(raw: RawClip, resolution: int, num_frames: int, n_tracks: int, seed: int) -> dict:
    """A batch of one: the clip's first ``num_frames`` frames as the loader prepares a training sample."""
    from training.data import DECODE, collate, process

    frames = list(range(num_frames))
    clip = DECODE(raw.sample, frames)
    item = process(clip, frames, resolution, n_tracks, np.random.default_rng([seed, 17]))
    import json

    item["caption"] = str(json.loads(raw.sample["meta.json"]).get("caption") or "")
    return collate([item])


def render_maps(
    maps: GaussianMaps,
    b: int,
    rasterize,
    intrinsics: torch.Tensor,
    c2w: torch.Tensor,
    width: int,
    height: int,
    times: list[int],
    prune: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render sample ``b``'s Gaussians deformed to ``times[i]`` from camera i: (T,H,W,3), depth, alpha."""
    from training.model import _kmat

    out = []
    for i, tau in enumerate(times):
        g = gaussians_at(maps, b, tau if maps.deform is not None else 0, prune)
        vm = torch.linalg.inv(c2w[i])[None]
        out.append(
            rasterize(g.means, g.quats, g.scales, g.opacities, g.colours, vm, _kmat(intrinsics[i][None]), width, height)
        )
    rgb, dep, alp = (torch.cat(x) for x in zip(*out))
    return rgb.clamp(0, 1), dep, alp


@torch.no_grad()
def measure(
    model,
    batch: dict,
    rasterize,
    lpips_fn,
    sample_steps: int,
    seed: int,
    autocast: bool,
    prune: float,
    keep: bool = False,
) -> tuple[dict[str, float], dict]:
    """Measures of one clip (a batch of one) -> ({measure: value}, renders when ``keep``).

    Measures absent for this clip (no depth, no tracks, no LPIPS, no sampling) are not in the dict.
    ``renders``: ``{how: {"rgb", "depth", "alpha", "maps", "tracks"}}`` on the CPU, for reports.
    """
    video = batch["video"]
    t, h, w = video.shape[1], video.shape[-2], video.shape[-1]
    target = video[0].permute(0, 2, 3, 1)
    intr, c2w = batch["intrinsics"][0], batch["c2w"][0]
    out: dict[str, float] = {}
    renders: dict = {}
    hows = ["reconstruct"] + (["sample"] if sample_steps > 0 else [])
    for how in hows:
        tag = "recon" if how == "reconstruct" else "sample"
        devices = [video.device] if video.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if video.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            maps = model(batch, predict=how, sample_steps=sample_steps, seed=seed, autocast=autocast)
        rgb, dep, alp = render_maps(maps, 0, rasterize, intr, c2w, w, h, list(range(t)), prune)
        out[f"{tag}_psnr"] = float(M.psnr(rgb, target).mean())
        out[f"{tag}_ssim"] = float(M.ssim(rgb, target).mean())
        if lpips_fn is not None:
            out[f"{tag}_lpips"] = float(lpips_fn(rgb, target))
        exp_depth = dep / alp.clamp_min(1e-4)
        if bool(batch["has_depth"][0]):
            abs_rel, delta, scaled, n = M.depth_errors(exp_depth, batch["depth"][0], batch["depth_valid"][0])
            if n:
                out[f"{tag}_depth_abs_rel"], out[f"{tag}_depth_delta_1_25"] = abs_rel, delta
                out[f"{tag}_depth_abs_rel_scaled"] = scaled
        pred_tracks = None
        if bool(batch["has_tracks"][0]):
            pred_tracks, mask = track_positions(maps, 0, batch["tracks"][0], batch["track_visible"][0])
            epe, n = M.track_epe(pred_tracks, batch["tracks"][0], mask)
            if n:
                out[f"{tag}_track_epe_m"] = epe
        if keep:
            renders[tag] = {
                "rgb": rgb.float().cpu(),
                "depth": exp_depth.float().cpu(),
                "alpha": alp.float().cpu(),
                "maps": maps,
                "tracks": None if pred_tracks is None else pred_tracks.float().cpu(),
            }
    return out, renders


class Validator:
    """Validation during training for one rank (module docs). ``clips`` is empty when there is nothing
    held out; then :meth:`run` is never due and the trainer says so once."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device, lpips_fn=None, text_encoder=None):
        self.cfg, self.v, self.rank, self.world, self.device = cfg, cfg.validation, rank, world, device
        self.lpips_fn, self.text_encoder = lpips_fn, text_encoder
        self.clips: list[RawClip] = []
        if self.v.every > 0:
            source, split = validation_source(cfg)
            self.clips = load_clips(source, split, self.v.clips)

    @property
    def enabled(self) -> bool:
        return bool(self.clips)

    def due(self, step: int, end_of_stage: bool, last_step: bool) -> bool:
        if not self.enabled:
            return False
        return step % self.v.every == 0 or (self.v.at_stage_end and (end_of_stage or last_step))

    def run(self, model, stage: StageConfig, rasterize, autocast: bool) -> dict[str, float]:
        """Every rank calls this at the same step; returns the rank-reduced means (``clips``: how many)."""
        from training.text import embed_captions

        usable = [i for i, c in enumerate(self.clips) if c.num_frames >= stage.num_frames]
        was_training = model.training
        model.eval()
        sums = {k: [0.0, 0] for k in VALIDATION_MEASURES}
        n_mine = 0
        rounds = -(-len(usable) // self.world) if usable else 0
        try:
            for j in range(rounds):
                pos = self.rank + j * self.world
                real = pos < len(usable)
                idx = usable[pos] if real else usable[0]  # a stand-in keeps FSDP's collectives in step
                batch = prepare(self.clips[idx], stage.resolution, stage.num_frames, self.v.tracks, self.v.seed + idx)
                if self.text_encoder is not None:
                    batch["text"], batch["use_text"] = embed_captions(self.text_encoder, batch["caption"], 0.0)
                batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                vals, _ = measure(
                    model,
                    batch,
                    rasterize,
                    self.lpips_fn,
                    self.v.sample_steps,
                    self.v.seed * 100_003 + idx,
                    autocast,
                    self.cfg.ldrm.prune_opacity,
                )
                if real:
                    n_mine += 1
                    for k, val in vals.items():
                        if np.isfinite(val):
                            sums[k][0] += val
                            sums[k][1] += 1
        finally:
            model.train(was_training)
            model.backbone.vae.eval()
        return reduce_sums(sums, n_mine, self.device)


def reduce_sums(sums: dict[str, list], n_clips: int, device: torch.device) -> dict[str, float]:
    """{measure: [sum, count]} of this rank -> means over all ranks' counted clips (+ ``clips``)."""
    names = list(VALIDATION_MEASURES)
    vec = torch.tensor([sums[k][0] for k in names] + [sums[k][1] for k in names] + [n_clips], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        on_gpu = device.type == "cuda" and dist.get_backend() == "nccl"
        vec = vec.to(device) if on_gpu else vec
        dist.all_reduce(vec)
        vec = vec.cpu()
    n = len(names)
    out = {k: float(vec[i] / vec[n + i]) for i, k in enumerate(names) if vec[n + i] > 0}
    out["clips"] = int(vec[2 * n])
    return out


class BestCheckpoint:
    """``ckpt/best.pt`` (weights, config, step, the measure) kept whenever ``validation.best_metric`` improves.

    ``ckpt/best.json`` records the step and value, so a resumed run keeps comparing with the best so far.
    Every rank holds the same state (the reduced measures are equal on all ranks), so all take the same
    decision, which the FSDP state gathering needs (a collective).
    """

    def __init__(self, workdir: str, metric: str):
        from training.metrics import HIGHER_IS_BETTER
        from training.trainer import _fs, _join

        self.workdir, self.metric = workdir, metric
        self.higher = HIGHER_IS_BETTER[metric.split("_", 1)[1]]
        self.value: float | None = None
        self.step: int | None = None
        fs, path = _fs(_join(workdir, "ckpt", "best.json"))
        if fs.exists(path):
            import json

            with fs.open(path, "rb") as f:
                rec = json.loads(f.read())
            if rec.get("metric") == metric:
                self.value, self.step = float(rec["value"]), int(rec["step"])

    def improves(self, measures: dict[str, float]) -> bool:
        v = measures.get(self.metric)
        if v is None or not np.isfinite(v):
            return False
        return self.value is None or (v > self.value if self.higher else v < self.value)

    def save(self, state: dict, value: float) -> str:
        """Write ``best.pt`` then ``best.json`` (each atomically); ``state`` holds ``model``, ``config``, ``step``."""
        import io
        import json

        from training.trainer import _join, write_atomic

        buf = io.BytesIO()
        torch.save({**state, "metric": self.metric, "value": value}, buf)
        write_atomic(_join(self.workdir, "ckpt", "best.pt"), buf.getvalue())
        write_atomic(
            _join(self.workdir, "ckpt", "best.json"),
            json.dumps({"metric": self.metric, "value": value, "step": state["step"]}).encode(),
        )
        self.value, self.step = value, state["step"]
        return _join(self.workdir, "ckpt", "best.pt")
