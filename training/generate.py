"""``d4s generate CKPT --image IMG --trajectory T --out DIR``: one image + a camera path -> a 4D scene.

Steps (what Diff4Splat does at inference): the image is encoded to its first latent; the backbone
samples the video latents along the camera path by Euler integration of the flow (``--steps``,
seeded); with ``ldrm.clean_first_latent`` latent frame 0 is the image's own latent; the LDRM decodes
deformable Gaussians (pruned at opacity tau = ``ldrm.prune_opacity``, 0.005), which are rendered at
every camera of the path at its own time, and along a second, novel path (the camera swinging
+-``NOVEL_SWING_DEG`` about the point at the scene's median depth, while the scene plays). ``--prompt``
needs a T5 encoder (``--text-encoder`` or the checkpoint's ``backbone.text_encoder_dir``); without one
the learned empty prompt is used.

The image must be ``resolution`` x ``resolution`` (the checkpoint's last stage, or ``--resolution``);
``--resize`` centre-crops and resizes another size (its intrinsics follow). Trajectories:
:mod:`training.trajectory`. Outputs in ``DIR`` (through :class:`pipeline.storage.Store`):

* ``rgb.mp4``, ``depth.mp4`` (log-coloured metres, near warm): the renders along the trajectory;
  ``novel_rgb.mp4``, ``novel_depth.mp4``: along the novel path;
* ``ply/frame_NNN.ply``: the Gaussians deformed to each frame's time, 3DGS layout (:mod:`training.ply`);
* ``cameras.json``: both paths (pixel intrinsics, c2w in the first camera's frame) and the image size;
* ``timings.json``: seconds per phase (``encode``, ``sample``, ``ldrm``, ``render``; ``scene_s`` = image
  to rendered trajectory, the figure comparable to the paper's ~30 s; ``load_s``; ``write_s``;
  ``total_s``), the Gaussian counts, the device and the settings.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch

from pipeline import geometry as geo
from training import trajectory as tj
from training.media import colourise_depth, depth_range, to_uint8, write_mp4

NOVEL_SWING_DEG = 20.0


class GenerateError(ValueError):
    """Bad input for ``d4s generate``; one line for the CLI."""


def load_image(path: str, resolution: int, resize: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """(the image at ``resolution``² as uint8 (H,W,3), its original (width, height))."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise GenerateError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None
    h, w = img.shape[:2]
    if (w, h) == (resolution, resolution):
        return img, (w, h)
    if not resize:
        raise GenerateError(
            f"{path}: the image is {w}x{h}; this model generates {resolution}x{resolution} "
            f"(give a {resolution}x{resolution} image, --resize to centre-crop and resize, or "
            "--resolution)"
        )
    side = min(w, h)
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(img[y0 : y0 + side, x0 : x0 + side]).resize((resolution, resolution), Image.BILINEAR)
    return np.asarray(crop), (w, h)


def novel_path(frames: int, centre_depth: float, intr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cameras swinging +-NOVEL_SWING_DEG about the point ``centre_depth`` ahead of the first camera."""
    centre = np.array([0.0, 0.0, centre_depth])
    c2w = np.stack(
        [
            geo.look_at_c2w(centre + centre_depth * np.array([-math.sin(a), 0.0, -math.cos(a)]), centre)
            for a in np.deg2rad(NOVEL_SWING_DEG) * np.sin(np.linspace(0, 2 * math.pi, frames))
        ]
    )
    return np.repeat(intr[:1], frames, 0), c2w


def generate(
    ckpt: str, image: str, trajectory: str, out: str, device: str = "auto", config: str | None = None, **options
) -> dict:
    """Generate (module docs): load the checkpoint, then :func:`run_generation` with ``options`` (its
    keyword arguments: prompt, steps, seed, frames, resolution, ...); returns what ``timings.json`` holds."""
    from training.config import load_config
    from training.evaluate import check_out, pick_device
    from training.load import load_model

    t_start = time.perf_counter()
    check_out(out)  # before any work: a file in the way was found only when writing the results
    check_options(options.get("resolution"), options.get("frames"), options.get("fov_deg", 60.0))
    dev = pick_device(device)
    model, cfg, info = load_model(ckpt, dev, load_config(config) if config else None)
    return run_generation(model, cfg, info, image, trajectory, out, **options, load_s=time.perf_counter() - t_start)


def check_options(resolution: int | None, frames: int | None, fov_deg: float) -> None:
    """The sizes (None: the checkpoint's last stage's) and the field of view, before any work."""
    from training.evaluate import EvalError, check_sizes

    try:
        check_sizes(resolution, frames)
    except EvalError as exc:
        raise GenerateError(str(exc)) from None
    if not 0 < fov_deg < 180:  # NaN too
        raise GenerateError(f"--fov {fov_deg:g}: the field of view must be between 0 and 180 degrees")


def run_generation(
    model,
    cfg,
    info: dict,
    image: str,
    trajectory: str,
    out: str,
    prompt: str | None = None,
    steps: int = 25,
    seed: int = 0,
    frames: int | None = None,
    resolution: int | None = None,
    resize: bool = False,
    fov_deg: float = 60.0,
    clip: str | None = None,
    text_encoder: str | None = None,
    write_ply: bool = True,
    fps: int = 8,
    load_s: float = 0.0,
) -> dict:
    """:func:`generate` with a model already loaded (on its device; benchmarks time repeated runs)."""
    from pipeline.storage import Store
    from training.evaluate import check_shape
    from training.ply import ply_bytes
    from training.render_gsplat import get_rasterizer
    from training.validate import render_maps

    t_start = time.perf_counter()
    check_options(resolution, frames, fov_deg)
    dev = next(model.parameters()).device
    last = cfg.stages[-1]
    res = last.resolution if resolution is None else resolution
    nf = last.num_frames if frames is None else frames
    check_shape(cfg, res, nf)
    img, size = load_image(image, res, resize)
    try:
        traj = tj.load(trajectory, nf, size, res, fov_deg, clip)
    except tj.TrajectoryError as exc:
        raise GenerateError(str(exc)) from None
    intr = traj.intrinsics if traj.size == (res, res) else tj.crop_resize_intrinsics(traj.intrinsics, traj.size, res)
    batch = {
        "video": torch.from_numpy(img.copy()).permute(2, 0, 1)[None, None].float().div(255).to(dev),
        "intrinsics": torch.from_numpy(intr).float()[None].to(dev),
        "c2w": torch.from_numpy(traj.c2w).float()[None].to(dev),
    }
    if prompt:
        batch["text"], batch["use_text"] = _embed_prompt(model, cfg, prompt, text_encoder, dev)
    rasterize = get_rasterizer(cfg.runtime.renderer if dev.type == "cuda" else "torch")
    timings: dict[str, float] = {}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        maps = model(
            batch,
            predict="sample",
            sample_steps=steps,
            seed=seed,
            autocast=dev.type == "cuda" and cfg.runtime.bf16,
            timings=timings,
        )
    prune = cfg.ldrm.prune_opacity
    t0 = _sync(dev)
    rgb, dep, alp = render_maps(
        maps, 0, rasterize, batch["intrinsics"][0], batch["c2w"][0], res, res, list(range(nf)), prune
    )
    timings["render"] = _sync(dev) - t0
    scene_s = sum(timings.values())
    centre = float(maps.depth[0, 0].median())
    n_intr, n_c2w = novel_path(nf, centre, intr)
    t0 = _sync(dev)
    n_rgb, n_dep, n_alp = render_maps(
        maps,
        0,
        rasterize,
        torch.from_numpy(n_intr).float().to(dev),
        torch.from_numpy(n_c2w).float().to(dev),
        res,
        res,
        list(range(nf)),
        prune,
    )
    timings["novel_render"] = _sync(dev) - t0
    n_dep = n_dep / n_alp.clamp_min(1e-4)
    from training.gaussians import gaussians_at

    counts = []
    t0 = time.perf_counter()
    store = Store(out)
    store.makedirs("")
    exp_depth = (dep / alp.clamp_min(1e-4)).float().cpu().numpy()
    lo, hi = depth_range(exp_depth, alp.float().cpu().numpy() > 0.5)
    for name, frames_u8 in (
        ("rgb.mp4", to_uint8(rgb)),
        ("depth.mp4", colourise_depth(exp_depth, lo, hi)),
        ("novel_rgb.mp4", to_uint8(n_rgb)),
        ("novel_depth.mp4", colourise_depth(n_dep.float().cpu().numpy(), lo, hi)),
    ):
        store.write_bytes_atomic(name, _mp4_bytes(frames_u8, fps))
    for tau in range(nf):
        g = gaussians_at(maps, 0, tau, prune)
        counts.append(len(g))
        if write_ply:
            store.write_bytes_atomic(f"ply/frame_{tau:03d}.ply", ply_bytes(g))
    cams = {
        "width": res,
        "height": res,
        "source": traj.source,
        "trajectory": {"intrinsics": intr.tolist(), "c2w": traj.c2w.tolist()},
        "novel": {"intrinsics": n_intr.tolist(), "c2w": n_c2w.tolist()},
    }
    store.write_bytes_atomic("cameras.json", json.dumps(cams).encode())
    timings["write"] = time.perf_counter() - t0
    total = maps.depth[0].numel()
    result = {
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "resolution": res,
        "frames": nf,
        "steps": steps,
        "seed": seed,
        "prompt": prompt,
        "trajectory": traj.source,
        **{f"{k}_s": round(v, 4) for k, v in timings.items()},
        "scene_s": round(scene_s, 4),
        "load_s": round(load_s, 4),
        "gaussians_born": int(total),
        "gaussians_per_frame": round(float(np.mean(counts))),
        "ply": write_ply,
    }
    result["total_s"] = round(time.perf_counter() - t_start + load_s, 4)
    store.write_bytes_atomic("timings.json", (json.dumps(result, indent=1) + "\n").encode())
    return result


def _sync(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def _mp4_bytes(frames: np.ndarray, fps: int) -> bytes:
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="d4s-mp4-") as d:
        path = os.path.join(d, "v.mp4")
        write_mp4(path, frames, fps)
        with open(path, "rb") as f:
            return f.read()


def _embed_prompt(model, cfg, prompt: str, text_encoder: str | None, dev):
    d = text_encoder or cfg.backbone.text_encoder_dir
    if not d:
        raise GenerateError(
            "--prompt needs a T5 text encoder: give --text-encoder DIR (a CogVideoX checkpoint's "
            "text_encoder/ and tokenizer/); this checkpoint was trained without one"
        )
    from training.text import TextEncoder, embed_captions

    tc = model.backbone.transformer.config
    enc = TextEncoder(d, tc.max_text_seq_length, dev, cache_size=1, expect_dim=tc.text_embed_dim)
    return embed_captions(enc, [prompt], 0.0)
