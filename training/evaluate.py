"""``d4s eval CKPT DATA --out DIR``: a checkpoint measured on held-out clips.

DATA is a build's OUT (its ``val`` split by default: the scenes held out at build time,
``--split train`` for the training scenes) or shard files / URLs / globs (every sample). Each clip's
first ``frames`` frames at ``resolution`` (defaults: the checkpoint's last curriculum stage) go through
:func:`training.validate.measure`, the measurement validation uses during training: renders at the
clip's cameras from its own latents (``reconstruction``) and from latents sampled from its first frame
and cameras (``sampled``; ``--sample-steps 0`` skips it). Writes, through
:class:`pipeline.storage.Store` (local or object store):

* ``DIR/metrics.json``: ``psnr``, ``ssim``, ``lpips`` (null when its weights are absent, with
  ``lpips_note`` saying why), ``depth_abs_rel``, ``depth_delta_1_25``, ``track_epe_m`` (means over the
  clips that have each, of the reconstruction), ``clips``, and ``depth_abs_rel_scaled`` (AbsRel after
  median scaling, a diagnostic of depth shape versus metric scale); ``sampled`` holds the same measures for
  sampled latents; ``per_clip`` every clip's values; ``skipped`` clips too short for ``frames``; and
  what was evaluated (checkpoint, step, data, split, resolution, frames, sample_steps, device).
* ``DIR/eval.html``: self-contained; per clip, rows of frames: ground truth, reconstruction, sampled,
  then the ground-truth depth and both rendered depths (one colour scale per clip, log, metres).
* ``--rrd FILE``: a Rerun recording with, per clip, the ground truth under ``KEY/gt`` and each render
  under ``KEY/recon`` / ``KEY/sample`` (:func:`pipeline.rerun_log.log_clip`: frames, depth, cameras,
  the Gaussians' track points), plus the deformed Gaussians' centres per frame
  (``KEY/recon/gaussians``, the most opaque ``rrd_gaussians``, 20000), on the same ``frame`` timeline;
  the clip's measures are the recording property ``KEY``.
"""

from __future__ import annotations

import html
import json
import math
import os
import posixpath
import shutil
import tempfile
import time

import numpy as np
import torch

from training.media import colourise_depth, depth_range, png_data_uri, strip, to_uint8

MEASURES = ("psnr", "ssim", "lpips", "depth_abs_rel", "depth_delta_1_25", "track_epe_m", "depth_abs_rel_scaled")
GRID_FRAMES = 8
PAGE_FRAME_PX = 128  # frames in eval.html are shrunk to at most this width


class EvalError(ValueError):
    """Bad data or options for ``d4s eval``; one line for the CLI."""


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise EvalError(f"--device {device}: not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise EvalError(f"--device {device}: d4s runs on cpu or cuda (or auto)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: no CUDA device here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EvalError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_out(out: str) -> None:
    """``--out`` is a folder or can become one; refused before any work when a file is in the way,
    or, on an object store, when the store cannot be used (no credentials, no answer: one look at
    the prefix raises, and the CLI says it in one line)."""
    if "://" in out and not out.startswith("file://"):
        from pipeline.storage import Store

        Store(out).exists("")  # no files in the way of a key prefix; the store must answer
        return
    p = os.path.abspath(out.removeprefix("file://"))
    while True:
        if os.path.exists(p):
            if not os.path.isdir(p):
                what = "is a file" if p == os.path.abspath(out.removeprefix("file://")) else f"is under the file {p}"
                raise EvalError(f"--out {out}: {what}, not a folder to write into")
            return
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent


def check_sizes(resolution: int | None, frames: int | None) -> None:
    """``--resolution`` / ``--frames``: None is the checkpoint's last stage's; below 1 is refused."""
    for name, v in (("resolution", resolution), ("frames", frames)):
        if v is not None and v < 1:
            raise EvalError(f"--{name} {v}: must be at least 1 (leave it out for the checkpoint's last stage's)")


def check_shape(cfg, resolution: int, frames: int) -> None:
    """The resolution and frame count a checkpoint's model can take (the curriculum's own rules)."""
    check_sizes(resolution, frames)
    tf = cfg.backbone.vae.temporal_compression_ratio
    if frames < 1 or (frames - 1) % tf:
        raise EvalError(f"frames must be 1 + k*{tf} for this model, got {frames}")
    longest = max(s.num_frames for s in cfg.stages)
    if frames > longest:
        raise EvalError(f"frames {frames}: this model's deformation covers at most {longest} frames")
    grid = (
        2 ** (len(cfg.backbone.vae.block_out_channels) - 1) * cfg.backbone.transformer.patch_size * cfg.ldrm.patch_size
    )
    if resolution % grid:
        raise EvalError(f"resolution {resolution} is not a multiple of this model's latent patch grid ({grid} px)")


def data_clips(data: list[str], split: str, limit: int | None):
    """The clips to evaluate: (RawClips, what DATA is, the split read: ``val`` / ``train`` of a build, ``all``)."""
    import fsspec

    from training.config import DataConfig
    from training.validate import load_clips

    if not data:
        raise EvalError("give DATA: a build's output or shard files")
    if len(data) == 1 and "*" not in data[0] and not data[0].endswith(".tar"):
        root = data[0].rstrip("/")
        fs, _, _ = fsspec.get_fs_token_paths(f"{root}/index.parquet")
        # an output whose driver stopped before writing the index still has its plan and ledger,
        # from which the loader makes the same rows (training/data.py)
        if not fs.exists(f"{root}/index.parquet") and not fs.exists(f"{root}/manifests/shards.parquet"):
            raise EvalError(
                f"{root}: no index.parquet and no recorded plan (not a d4s build output); "
                "give shard files to evaluate every sample"
            )
        try:
            clips = load_clips(DataConfig(root=root), split, limit)
        except (ValueError, OSError) as exc:  # a damaged or changed shard, an unreadable index: named
            msg = str(exc)
            raise EvalError(msg if root in msg else f"{root}: {type(exc).__name__}: {msg}") from None
        if not clips:
            raise EvalError(
                f"{root}: no '{split}' clips in its index"
                + (
                    " (build with datasets.<name>.val_fraction > 0 to hold scenes out, or --split train)"
                    if split == "val"
                    else ""
                )
            )
        return clips, f"build {root}, split {split}", split
    try:
        clips = load_clips(DataConfig(shards=list(data)), "all", limit)
    except (ValueError, OSError) as exc:
        raise EvalError(str(exc)) from None
    return clips, f"shards {', '.join(data)}", "all"


def _summary(rows: list[dict], prefix: str) -> dict:
    out = {}
    for m in MEASURES:
        vals = [r[f"{prefix}_{m}"] for r in rows if f"{prefix}_{m}" in r and np.isfinite(r[f"{prefix}_{m}"])]
        out[m] = float(np.mean(vals)) if vals else None
    return out


def evaluate(
    ckpt: str,
    data: list[str],
    out: str,
    split: str = "val",
    clips: int | None = None,
    resolution: int | None = None,
    frames: int | None = None,
    sample_steps: int = 10,
    lpips_torch_home: str | None = None,
    device: str = "auto",
    rrd: str | None = None,
    rrd_gaussians: int = 20000,
    seed: int = 0,
    config: str | None = None,
) -> dict:
    """Run the evaluation (module docs); returns what ``metrics.json`` holds."""
    from pipeline.storage import Store
    from training.config import load_config
    from training.load import load_model
    from training.metrics import load_lpips
    from training.render_gsplat import get_rasterizer
    from training.validate import measure, prepare

    t0 = time.perf_counter()
    check_out(out)  # before any work: a file in the way was found only when writing the results
    if rrd:
        check_out(posixpath.dirname(rrd.replace(os.sep, "/")) or ".")  # the recording's folder alike
    check_sizes(resolution, frames)
    dev = pick_device(device)
    model, cfg, info = load_model(ckpt, dev, load_config(config) if config else None)
    last = cfg.stages[-1]
    res = last.resolution if resolution is None else resolution
    nf = last.num_frames if frames is None else frames
    check_shape(cfg, res, nf)
    raws, what, split = data_clips(data, split, clips)
    lpips_fn, lpips_note = load_lpips(cfg.loss.lpips_net, lpips_torch_home or cfg.loss.lpips_torch_home, dev)
    rasterize = get_rasterizer(cfg.runtime.renderer if dev.type == "cuda" else "torch")
    autocast = dev.type == "cuda" and cfg.runtime.bf16
    text_encoder = _text_encoder(model, cfg, dev)
    rec, rec_dir = _recording(f"eval-step-{info['step']}") if rrd else (None, None)
    rows, skipped, cards = [], [], []
    for i, raw in enumerate(raws):
        if raw.num_frames < nf:
            skipped.append({"key": raw.key, "reason": f"{raw.num_frames} frames, fewer than {nf}"})
            continue
        batch = prepare(raw, res, nf, cfg.loss.tracks_per_sample, seed + i)
        if text_encoder is not None:
            from training.text import embed_captions

            batch["text"], batch["use_text"] = embed_captions(text_encoder, batch["caption"], 0.0)
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        vals, renders = measure(
            model,
            batch,
            rasterize,
            lpips_fn,
            sample_steps,
            seed * 100_003 + i,
            autocast,
            cfg.ldrm.prune_opacity,
            keep=True,
        )
        rows.append({"key": raw.key, "dataset": raw.dataset, **vals})
        cards.append(_card(raw.key, batch, renders, vals))
        if rec is not None:
            log_eval_clip(rec, raw.key, raw.dataset, batch, renders, cfg.ldrm.prune_opacity, rrd_gaussians, vals)
    if not rows:
        raise EvalError(f"no clip of {what} has {nf} frames ({len(skipped)} skipped): give --frames")
    result = {
        **_summary(rows, "recon"),
        "clips": len(rows),
        "sampled": _summary(rows, "sample") if sample_steps > 0 else None,
        "lpips_note": lpips_note,
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "data": what,
        "split": split,
        "resolution": res,
        "frames": nf,
        "sample_steps": sample_steps,
        "device": str(dev),
        "seconds": round(time.perf_counter() - t0, 3),
        "per_clip": rows,
        "skipped": skipped,
    }
    store = Store(out)
    store.makedirs("")
    store.write_bytes_atomic("metrics.json", (json.dumps(result, indent=1, allow_nan=False) + "\n").encode())
    store.write_bytes_atomic("eval.html", _page(result, cards).encode())
    if rec is not None:
        _save_recording(rec, rec_dir, rrd)
    return result


def _text_encoder(model, cfg, dev):
    d = cfg.backbone.text_encoder_dir
    if not d or not os.path.isdir(d):
        return None  # evaluated with the learned empty prompt
    from training.text import TextEncoder

    tc = model.backbone.transformer.config
    return TextEncoder(d, tc.max_text_seq_length, dev, cache_size=16, expect_dim=tc.text_embed_dim)


# --- the page ---------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _small(img: np.ndarray) -> np.ndarray:
    """Frames (N,H,W,3) shrunk by an integer factor to at most PAGE_FRAME_PX wide (keeps the page small)."""
    k = max(1, -(-img.shape[2] // PAGE_FRAME_PX))
    if k == 1:
        return img
    n, h, w, c = img.shape
    h2, w2 = h // k, w // k
    return img[:, : h2 * k, : w2 * k].reshape(n, h2, k, w2, k, c).mean((2, 4)).round().astype(np.uint8)


def _card(key: str, batch: dict, renders: dict, vals: dict) -> str:
    t = batch["video"].shape[1]
    cols = sorted({round(float(x)) for x in np.linspace(0, t - 1, min(GRID_FRAMES, t))})
    gt = to_uint8(batch["video"][0].permute(0, 2, 3, 1))[cols]
    has_depth = bool(batch["has_depth"][0])
    gd, gv = batch["depth"][0].cpu().numpy(), batch["depth_valid"][0].cpu().numpy()
    lo, hi = depth_range(gd, gv) if has_depth else depth_range(renders["recon"]["depth"].numpy())
    rows = [("ground truth", gt)]
    for tag, name in (("recon", "reconstruction"), ("sample", "sampled")):
        if tag in renders:
            rows.append((name, to_uint8(renders[tag]["rgb"])[cols]))
    if has_depth:
        rows.append(("ground-truth depth", colourise_depth(gd[cols], lo, hi, gv[cols])))
    for tag, name in (("recon", "reconstruction depth"), ("sample", "sampled depth")):
        if tag in renders:
            rows.append((name, colourise_depth(renders[tag]["depth"].numpy()[cols], lo, hi)))
    body = "".join(
        f"<tr><th>{html.escape(n)}</th><td><img src='{png_data_uri(strip(_small(img)))}'></td></tr>" for n, img in rows
    )
    line = " · ".join(f"{html.escape(k)} {_fmt(v)}" for k, v in vals.items())
    return (
        f"<div class='card'><h3>{html.escape(key)}</h3><p class='m'>{line}</p><p class='m'>frames {cols}; depth "
        f"colours log-scaled {lo:.3g}–{hi:.3g} m (near warm), black: no ground-truth depth</p><table>{body}</table></div>"
    )


def _page(result: dict, cards: list[str]) -> str:
    head = ["reconstruction"] + (["sampled"] if result["sampled"] else [])
    rows = "".join(
        f"<tr><td>{m}</td><td>{_fmt(result[m])}</td>"
        + (f"<td>{_fmt(result['sampled'][m])}</td>" if result["sampled"] else "")
        + "</tr>"
        for m in MEASURES
    )
    note = f"<p class='m'>LPIPS: {html.escape(result['lpips_note'])}</p>" if result["lpips_note"] else ""
    css = (
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ddd;"
        "padding:2px 6px;text-align:left;font-size:.85em}.card{margin:1.2em 0}.m{font-size:.8em;color:#444}"
        ".card img{height:96px;image-rendering:pixelated}"
    )
    meta = html.escape(
        f"checkpoint {result['checkpoint']} (step {result['step']}); {result['data']}; "
        f"{result['clips']} clips at {result['resolution']}² × {result['frames']} frames; "
        f"{result['sample_steps']} sampling steps; {result['device']}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>d4s eval</title><style>{css}</style></head><body>"
        f"<h1>d4s eval</h1><p class='m'>{meta}</p><table><tr><th>measure</th>"
        + "".join(f"<th>{h}</th>" for h in head)
        + f"</tr>{rows}</table>{note}{''.join(cards)}</body></html>"
    )


# --- Rerun --------------------------------------------------------------------------------------------------
def _recording(recording_id: str):
    from pipeline.rerun_log import import_rerun

    rr = import_rerun()
    rec = rr.RecordingStream("d4s", recording_id=recording_id, send_properties=True)
    rec.set_log_time_enabled(False)
    tmp = tempfile.mkdtemp(prefix="d4s-eval-rrd-")
    rec.save(os.path.join(tmp, "eval.rrd"))
    return rec, tmp


def _save_recording(rec, tmp: str, rrd: str) -> None:
    """The recording, finished in a temporary file, published at ``rrd`` (a path or URL) in one write."""
    from pipeline.storage import Store

    try:
        rec.flush()
        rec.disconnect()
        with open(os.path.join(tmp, "eval.rrd"), "rb") as f:
            data = f.read()
        parent, name = posixpath.split(rrd.replace(os.sep, "/"))
        dest = Store(parent or ".")
        dest.makedirs("")
        dest.write_bytes_atomic(name, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def log_eval_clip(
    rec, key: str, dataset: str, batch: dict, renders: dict, prune: float, max_gaussians: int, vals: dict | None = None
) -> None:
    """One evaluated clip into the recording: ground truth and renders side by side (module docs)."""
    from pipeline.clip import Clip, ClipMeta
    from pipeline.rerun_log import import_rerun, log_clip
    from training.gaussians import gaussians_at

    rr = import_rerun()
    t = batch["video"].shape[1]
    intr = batch["intrinsics"][0].cpu().numpy().astype(np.float64)
    c2w = batch["c2w"][0].cpu().numpy().astype(np.float64)
    has_d, has_t = bool(batch["has_depth"][0]), bool(batch["has_tracks"][0])
    vis = batch["track_visible"][0].cpu().numpy() if has_t else None

    def clip(rgb, depth, valid, tracks) -> Clip:
        meta = ClipMeta(
            dataset=dataset,
            scene=key,
            clip_id=key,
            frame_indices=list(range(t)),
            dynamic=bool(batch["dynamic"][0]),
            real=False,
        )
        return Clip(
            meta=meta,
            rgb=rgb,
            intrinsics=intr,
            c2w=c2w,
            depth=depth,
            depth_valid=valid,
            tracks=tracks,
            track_visible=vis if tracks is not None else None,
        )

    gt = clip(
        to_uint8(batch["video"][0].permute(0, 2, 3, 1)),
        batch["depth"][0].cpu().numpy() if has_d else None,
        batch["depth_valid"][0].cpu().numpy() if has_d else None,
        batch["tracks"][0].cpu().numpy() if has_t else None,
    )
    log_clip(rec, gt, prefix=f"{key}/gt")
    if vals:  # the clip's measures as a recording property named after it
        rec.send_property(key, rr.AnyValues(**{k: float(v) for k, v in vals.items()}))
    for tag, r in renders.items():
        tracks = r["tracks"].numpy() if (has_t and r["tracks"] is not None) else None
        log_clip(
            rec,
            clip(to_uint8(r["rgb"]), r["depth"].numpy().astype(np.float32), r["alpha"].numpy() > 0.5, tracks),
            prefix=f"{key}/{tag}",
        )
        maps = r["maps"]
        for tau in range(t):
            g = gaussians_at(maps, 0, tau if maps.deform is not None else 0, prune)
            keep = torch.argsort(g.opacities, descending=True)[:max_gaussians]
            rec.set_time("frame", sequence=tau)
            rec.log(
                f"{key}/{tag}/gaussians",
                rr.Points3D(
                    g.means[keep].float().cpu().numpy(),
                    colors=to_uint8(g.colours[keep]),
                    radii=g.scales[keep].float().mean(-1).cpu().numpy(),
                ),
            )
