"""Learning check (issue #16 item 6) and the ``d4s generate`` timing, in one command on one GPU.

    python bench/bench_learning.py --out DIR                      # GPU: ~7 minutes on one H200
    python bench/bench_learning.py --out DIR --preset tiny --resolution 32 --frames 5 \\
        --train-seconds 60 --clips 12 --val-clips 4 --no-generate  # CPU smoke

1. ``d4s generate`` timing first (so it is recorded whatever happens later): the ``full`` preset with
   random weights (the paper-sized model: CogVideoX-2B-shaped backbone, 16-block LDRM), one 512x512
   image, an orbit path of 13 frames, 25 flow steps, bf16, gsplat; a warm-up run without .ply files,
   then a timed run writing everything (``scene_s`` = image to rendered trajectory, the paper's ~30 s).
   The warm-up also pays gsplat's one-time CUDA compilation (~85 s on a fresh machine).
2. A synthetic set whose answer is known (training/synthetic.py: rendered scenes with exact depth,
   cameras and 3D tracks; half static, half with moving objects), ``--clips`` scenes for training and
   ``--val-clips`` held out (index.parquet split ``val``), at ``--resolution``.
3. The ``mid`` preset through its three curriculum stages (static: photo + geo, deformation frozen;
   dynamic: all four losses), every stage at ``--resolution`` (the data's own size), batch
   ``--batch``, ``ldrm.clean_latent_prob`` ``--clean-latent-prob`` (0.5; the preset's 0 lets the LDRM see
   only x0-predictions of a backbone that starts random, while the goal is about reconstructions from
   the clip's own latents), validation every ``--val-every`` steps on the held-out scenes (reconstruction PSNR /
   SSIM / depth AbsRel / track EPE, and the same from sampled latents). The step count is set by time:
   a first call trains ``--probe-steps`` steps, its seconds per step size the three stages
   (``--stage-split`` of the steps left in ``--train-seconds``), and a second call resumes to the end.
4. ``d4s eval`` of the best checkpoint on the held-out scenes (all ``--val-clips``).

Writes to DIR (at most 5 files): ``bench_learning.json`` (everything), ``bench_learning.md`` (the
tables), ``training.png`` and ``validation.png`` (curves, as in the training report) and
``eval.html`` (renders of the held-out scenes). Workdirs, shards and the generated scene go to
``--work`` (a temporary directory by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

GOALS = {"recon_psnr": 25.0, "recon_depth_abs_rel": 0.1}


def _dump(out: str, res: dict) -> None:
    with open(os.path.join(out, "bench_learning.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)


def time_generate(work: str, resolution: int, steps: int, cuda: bool, preset: str) -> dict:
    """The full preset (random weights) generating one scene, twice (warm-up without .ply, then timed)."""
    from PIL import Image

    from training.config import make_config
    from training.generate import run_generation
    from training.model import Diff4Splat

    t0 = time.perf_counter()
    cfg = make_config(preset)
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    with torch.device(dev):
        model = Diff4Splat(cfg)
    model.eval()
    init_s = time.perf_counter() - t0
    img = os.path.join(work, "gen_image.png")
    from training.synthetic import make_clip

    clip = make_clip(0, t=1, size=resolution, device="cuda" if cuda else "cpu")
    Image.fromarray(clip.rgb[0]).save(img)
    info = {"checkpoint": f"random weights ({preset} preset)", "step": 0}
    runs = []
    for i, ply in enumerate((False, True)):
        r = run_generation(
            model,
            cfg,
            info,
            img,
            "orbit:1.0",
            os.path.join(work, f"generate{i}"),
            steps=steps,
            resolution=resolution,
            write_ply=ply,
        )
        runs.append(r)
        print(
            f"[bench_learning] generate run {i} (ply {ply}): scene {r['scene_s']:.2f} s, total {r['total_s']:.2f} s",
            flush=True,
        )
    params = sum(p.numel() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    del model
    if cuda:
        torch.cuda.empty_cache()
    return {
        "preset": preset,
        "parameters_m": params / 1e6,
        "init_s": init_s,
        "warmup": runs[0],
        "timed": runs[1],
        "peak_mem_gb": peak,
    }


def stage_list(preset: str, steps: list[int], resolution: int, frames: int) -> list[dict]:
    from training.config import PRESETS

    out = []
    for s, n in zip(PRESETS[preset]["stages"], steps):
        out.append({**s, "steps": int(n), "resolution": resolution, "num_frames": frames, "max_frame_stride": 1})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work")
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--clip-frames", type=int, default=9)
    ap.add_argument("--clips", type=int, default=48, help="training scenes")
    ap.add_argument("--val-clips", type=int, default=8, help="held-out scenes")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None, help="default: the preset's")
    ap.add_argument(
        "--clean-latent-prob",
        type=float,
        default=0.5,
        help="ldrm.clean_latent_prob (the preset's is 0): how often the LDRM decodes the clip's own "
        "latents rather than the x0-prediction of a still-random backbone",
    )
    ap.add_argument("--train-seconds", type=float, default=200.0)
    ap.add_argument("--probe-steps", type=int, default=40)
    ap.add_argument("--stage-split", default="0.4,0.3,0.3")
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--generate-preset", default="full")
    ap.add_argument("--generate-resolution", type=int, default=512)
    ap.add_argument("--generate-steps", type=int, default=25)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    work = a.work or tempfile.mkdtemp(prefix="bench_learning_")
    os.makedirs(work, exist_ok=True)
    cuda = torch.cuda.is_available()
    t_all = time.perf_counter()
    res: dict = {
        "host": platform.node(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "args": vars(a),
        "goals": GOALS,
    }

    if not a.no_generate:
        res["generate"] = time_generate(work, a.generate_resolution, a.generate_steps, cuda, a.generate_preset)
        _dump(a.out, res)

    # --- the synthetic set ------------------------------------------------------------------------
    from training.synthetic import write_shards

    t0 = time.perf_counter()
    data = os.path.join(work, "data")
    shutil.rmtree(data, ignore_errors=True)
    n = a.clips + a.val_clips
    write_shards(
        data,
        n_clips=n,
        per_shard=8,
        t=a.clip_frames,
        size=a.resolution,
        datasets=("synth_static", "synth_dynamic"),
        val=lambda ds, i: i >= a.clips,
        device="cuda" if cuda else "cpu",
    )
    res["data"] = {
        "train_clips": a.clips,
        "val_clips": a.val_clips,
        "frames": a.clip_frames,
        "resolution": a.resolution,
        "seconds": time.perf_counter() - t0,
    }
    print(f"[bench_learning] data: {n} clips in {res['data']['seconds']:.1f} s", flush=True)

    # --- training, sized by time -------------------------------------------------------------------
    from training.config import make_config
    from training.report import figures, read_metrics
    from training.trainer import train

    wd = os.path.join(work, "train")
    shutil.rmtree(wd, ignore_errors=True)
    split = [float(x) for x in a.stage_split.split(",")]

    def cfg_for(steps: list[int], max_steps: int):
        over = dict(
            data={"root": data, "num_workers": 4 if cuda else 0, "shuffle_buffer": 16},
            workdir=wd,
            stages=stage_list(a.preset, steps, a.resolution, a.frames),
            max_steps=max_steps,
            validation={"every": a.val_every, "clips": a.val_clips, "sample_steps": a.sample_steps},
            runtime={
                "launcher": "local",
                "num_workers": 1,
                "use_gpu": cuda,
                "batch_size": a.batch,
                "ckpt_every": 10**9,
                "log_every": 20,
                "tensorboard": False,
                "keep_ckpts": 1,
            },
            loss={"lpips_enabled": False},
            ldrm={"clean_latent_prob": a.clean_latent_prob},
        )
        if a.lr is not None:
            over["optim"] = {"lr": a.lr}
        return make_config(a.preset, **over)

    t0 = time.perf_counter()
    probe_total = [max(a.probe_steps * 4, 1000)] * 3  # long stages: the probe stays in stage 1
    train(cfg_for(probe_total, a.probe_steps))
    probe_s = time.perf_counter() - t0
    rows, _ = read_metrics(wd)
    times = [r["time"] for r in rows]
    s_per_step = (times[-1] - times[min(5, len(times) - 2)]) / max(len(times) - 1 - min(5, len(times) - 2), 1)
    left = a.train_seconds - probe_s
    # validations cost time too: about (clips x (1 + sample steps) forwards) each; budget 15 % for them
    total = a.probe_steps + max(int(0.85 * left / s_per_step), 3)
    steps = [max(int(total * f), 1) for f in split]
    steps[0] = max(steps[0], a.probe_steps + 1)
    res["training"] = {
        "probe_steps": a.probe_steps,
        "probe_s": probe_s,
        "s_per_step_probe": s_per_step,
        "stage_steps": steps,
        "total_steps": sum(steps),
        "batch": a.batch,
    }
    print(f"[bench_learning] probe: {s_per_step:.3f} s/step; stages {steps}", flush=True)
    _dump(a.out, res)
    t1 = time.perf_counter()
    train(cfg_for(steps, sum(steps)))
    res["training"]["seconds"] = probe_s + time.perf_counter() - t1
    train_rows, val_rows = read_metrics(wd)
    res["training"]["curves"] = {
        "train": [
            {
                k: r[k]
                for k in ("step", "stage", "loss", "photo", "geo", "fm", "motion", "psnr", "psnr_first", "time")
                if k in r
            }
            for r in train_rows
        ],
        "val": val_rows,
    }
    best_json = os.path.join(wd, "ckpt", "best.json")
    best = None
    if os.path.exists(best_json):
        with open(best_json) as fh:
            best = json.load(fh)
    res["training"]["best"] = best
    res["training"]["final_val"] = val_rows[-1] if val_rows else None
    for name, fig in figures(train_rows, val_rows):
        fig.savefig(os.path.join(a.out, f"{name}.png"), dpi=90, bbox_inches="tight")
    _dump(a.out, res)

    # --- d4s eval of the best checkpoint --------------------------------------------------------------
    from training.evaluate import evaluate

    ev_dir = os.path.join(work, "eval")
    ev = evaluate(wd, [data], ev_dir, split="val", sample_steps=a.sample_steps)
    res["eval"] = {k: v for k, v in ev.items() if k != "per_clip"}
    res["eval"]["per_clip"] = ev["per_clip"]
    shutil.copy(os.path.join(ev_dir, "eval.html"), os.path.join(a.out, "eval.html"))
    res["seconds"] = time.perf_counter() - t_all
    res["goals_met"] = {
        "recon_psnr": (ev["psnr"] or 0) >= GOALS["recon_psnr"],
        "recon_depth_abs_rel": (ev["depth_abs_rel"] or 9) <= GOALS["recon_depth_abs_rel"],
    }
    _dump(a.out, res)
    md = render_md(res)
    with open(os.path.join(a.out, "bench_learning.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    return 0


def render_md(res: dict) -> str:
    f = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    tr = res["training"]
    lines = [f"# bench_learning ({res['device']}, torch {res['torch']}, {res['seconds']:.0f} s)", ""]
    if "generate" in res:
        g = res["generate"]
        t = g["timed"]
        lines += [
            "## d4s generate",
            "",
            f"{g['preset']} preset ({g['parameters_m']:.0f}M parameters, random weights), {t['resolution']}², "
            f"{t['frames']} frames, {t['steps']} steps, peak {f(g['peak_mem_gb'])} GB",
            "",
            "| run | encode | sample | ldrm | render | scene_s | novel render | write | Gaussians/frame |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ("warmup", "timed"):
            r = g[name]
            lines.append(
                f"| {name}{' (+ply)' if r['ply'] else ''} | {f(r.get('encode_s'))} | {f(r.get('sample_s'))} | "
                f"{f(r.get('ldrm_s'))} | {f(r.get('render_s'))} | **{f(r['scene_s'])}** | "
                f"{f(r.get('novel_render_s'))} | {f(r.get('write_s'))} | {r['gaussians_per_frame']} |"
            )
        lines.append("")
    lines += [
        "## Learning check",
        "",
        f"{res['data']['train_clips']} training + {res['data']['val_clips']} held-out synthetic scenes at "
        f"{res['data']['resolution']}², {res['args']['preset']} preset, batch {tr['batch']}, "
        f"ldrm.clean_latent_prob {res['args']['clean_latent_prob']}, stages "
        f"{tr['stage_steps']} steps ({tr['total_steps']} in all, {tr['s_per_step_probe']:.3f} s/step probed), "
        f"{tr.get('seconds', 0):.0f} s of training.",
        "",
        "| step | stage | recon PSNR | recon SSIM | recon depth AbsRel | median-scaled | recon δ<1.25 | recon EPE (m) "
        "| sample PSNR | sample AbsRel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tr["curves"]["val"]:
        lines.append(
            f"| {r['step']} | {r['stage']} | {f(r.get('recon_psnr'))} | {f(r.get('recon_ssim'))} | "
            f"{f(r.get('recon_depth_abs_rel'))} | {f(r.get('recon_depth_abs_rel_scaled'))} | "
            f"{f(r.get('recon_depth_delta_1_25'))} | "
            f"{f(r.get('recon_track_epe_m'))} | {f(r.get('sample_psnr'))} | {f(r.get('sample_depth_abs_rel'))} |"
        )
    ev = res["eval"]
    lines += [
        "",
        f"d4s eval of the best checkpoint ({f((tr['best'] or {}).get('metric'))} at step "
        f"{f((tr['best'] or {}).get('step'))}), {ev['clips']} held-out clips:",
        "",
        "| | PSNR | SSIM | depth AbsRel | median-scaled | δ<1.25 | track EPE (m) |",
        "|---|---|---|---|---|---|---|",
        f"| reconstruction | {f(ev['psnr'])} | {f(ev['ssim'])} | {f(ev['depth_abs_rel'])} | "
        f"{f(ev['depth_abs_rel_scaled'])} | "
        f"{f(ev['depth_delta_1_25'])} | {f(ev['track_epe_m'])} |",
    ]
    if ev.get("sampled"):
        s = ev["sampled"]
        lines.append(
            f"| sampled latents | {f(s['psnr'])} | {f(s['ssim'])} | {f(s['depth_abs_rel'])} | "
            f"{f(s['depth_abs_rel_scaled'])} | "
            f"{f(s['depth_delta_1_25'])} | {f(s['track_epe_m'])} |"
        )
    lines += ["", f"Goals (PSNR ≥ {GOALS['recon_psnr']}, AbsRel ≤ {GOALS['recon_depth_abs_rel']}): {res['goals_met']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
