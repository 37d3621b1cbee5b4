"""Seeded synthetic accuracy benchmark of metric alignment (issue #20): rendered scenes with exact
depth and poses, references with the noise of the real ones, good clips and corrupted ones.

    python bench/align_accuracy.py --trials 100 --out DIR [--doc docs/ALIGNMENT.md]

Writes DIR/align_accuracy.json and DIR/align_accuracy.md; with ``--doc`` the tables also replace
the block between ``<!-- align-accuracy:begin -->`` and ``<!-- align-accuracy:end -->`` in that
file. CPU only (numpy); about 0.5 s per clip on the 2-core development machine.

Scenes (``pipeline/demo/render.py``, ray-cast, 16 frames at 64x48, 90 deg horizontal FOV):

* *room*: the 8 x 3 x 8 m textured room with boxes, depth about 1.5-8 m (RealEstate10K indoors);
* *hall*: a 12 x 6 x 24 m hall seen from one end, depth about 2-24 m, its ceiling replaced by sky
  (no depth); the camera 1.5 m above the floor, pitched up a little so that sky is in view.

Camera paths: ``path_m`` metres along a gently curved line, turning by up to 10 degrees.

The relative prediction (Video Depth Anything-like): ``x = a / d + c`` (``a`` in [1, 4], ``c`` in
[0.1, 0.5]), 0.5 % per-pixel and 1 % smooth multiplicative noise, 2 % of pixels junk; sky is
``x = c`` (zero disparity) with the same noise.

References:

* *MegaSaM-like* (RealEstate10K): depth with 2 % per-pixel and 2 % smooth noise, 5 % of pixels
  junk (x0.5-2), sky at MegaSaM's 100 m ceiling; its trajectory in a world frame of its own,
  1 cm jitter on the camera centres, 0.3 deg on the orientations; a focal length off by up to
  +-3 %, with the translations that focal implies (its depth anchored, baselines shrunk by the
  focal ratio). The clip's poses are up to scale (SfM units: metric times 0.3-3).
* *stereo tracks* (Stereo4D): the rendered 3D tracks (600 per clip) as metric depth with
  disparity noise of 0.5 px on a f = 300 px, 6.3 cm baseline rig (constant in disparity), 2 %
  of track depths junk; metric poses; the dataset's 20 m depth limit.

Corruptions (each should be dropped): MegaSaM trajectory scale inconsistent with its depth
(x0.6-0.85 or x1.18-1.6); claimed-metric poses off by the same factors; a camera that barely
moves (0-3 cm) under 1 cm jitter, whose scale is not observable; MegaSaM's focal off by 20-30 %;
a prediction that fails on a third of the frame (its disparity there x1.6). Reported apart: MegaSaM
whose metric prior is 15 % off while self-consistent (depth and trajectory alike), which no
check of consistency can see.

Figures: AbsRel and delta<1.25 of the aligned depth against the truth (valid output pixels, sky
excluded); how much sky got a depth; pose-scale error ``pose_scale x k_sfm - 1`` (up-to-scale
clips); the scale error of a clip's output: the larger of its pose-scale error and its depth's
median ratio to the truth minus 1 ("wrong scale" above 10 %); QC keep rates. Track lifting:
share of ground tracks kept per depth band on an infinite ground plane (512x288, f = 300 and
1242x375, f = 725), exact and with 2 % per-pixel depth noise.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipMeta
from pipeline.demo.render import SceneSpec, random_scene, render
from stages.align.align_clip import AlignClipOptions, align_clip
from stages.align.fit import AlignmentError, FitOptions
from stages.align.megasam import MegaSaMOutput
from stages.align.references import reference_from_megasam, reference_from_tracks
from stages.tracks.lift import lift_tracks

FRAMES, HEIGHT, WIDTH = 16, 48, 64
STEREO_SIGMA = 0.5 / (300.0 * 0.063)  # disparity noise in 1/m
WRONG_SCALE = 0.10
LIMITS = {"realestate10k": (0.05, 100.0), "stereo4d": (0.05, 20.0)}  # the adapters' defaults
SCENARIOS = {
    # name: (scene, dataset, reference, corruption, good)
    "re10k_megasam_room": ("room", "realestate10k", "megasam", None, True),
    "re10k_megasam_sky": ("hall", "realestate10k", "megasam", None, True),
    "stereo4d_tracks": ("hall", "stereo4d", "tracks", None, True),
    "megasam_trajectory_scale_off": ("room", "realestate10k", "megasam", "trajectory_scale", False),
    "claimed_metric_poses_off": ("hall", "stereo4d", "tracks", "pose_scale", False),
    "near_static_camera": ("room", "realestate10k", "megasam", "static", False),
    "megasam_focal_far_off": ("room", "realestate10k", "megasam", "focal", False),
    "prediction_wrong_on_a_region": ("room", "realestate10k", "megasam", "region", False),
    "megasam_metric_prior_off": ("room", "realestate10k", "megasam", "prior_scale", None),
}


# --------------------------------------------------------------------------------------------
# Scenes


def _path(rng, kind: str, path_m: float) -> np.ndarray:
    s = np.linspace(0.0, 1.0, FRAMES)
    yaw0 = rng.uniform(-0.4, 0.4)
    turn = np.radians(rng.uniform(-10, 10))
    if kind == "room":
        ang = rng.uniform(0, 2 * np.pi)
        start = np.array([2.4 * np.cos(ang), -0.2, 2.4 * np.sin(ang)])
        look = -start / np.linalg.norm(start)
        pitch = 0.15
    else:
        start = np.array([rng.uniform(-1.5, 1.5), 1.5, -10.5])
        look = np.array([0.0, 0.0, 1.0])
        pitch = -0.22  # y points down: negative looks up, sky in the top rows
    side = np.array([look[2], 0.0, -look[0]])
    direction = side * np.cos(yaw0) + look * np.sin(yaw0)
    direction /= np.linalg.norm(direction)
    bend = np.cross(direction, [0.0, 1.0, 0.0])
    eyes = start + path_m * (s[:, None] * direction + 0.1 * np.sin(np.pi * s)[:, None] * bend)
    poses = []
    for i, e in enumerate(eyes):
        a = turn * s[i]
        fwd = np.array([look[0] * np.cos(a) - look[2] * np.sin(a), pitch, look[0] * np.sin(a) + look[2] * np.cos(a)])
        poses.append(geo.look_at_c2w(e, e + fwd))
    return np.stack(poses)


@functools.lru_cache(maxsize=64)
def scene(kind: str, seed: int, path_cm: int):
    """Rendered scene (cached): truth depth with sky = inf, and its sky mask."""
    rng = np.random.default_rng(seed)
    spec = random_scene(
        f"{kind}{seed}",
        seed=seed,
        dynamic=False,
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        num_boxes=4 if kind == "room" else 6,
        num_tracks=600,
    )
    if kind == "hall":
        spec = SceneSpec(**{**spec.__dict__, "room_half": (6.0, 3.0, 12.0)})
        for b in spec.boxes:  # stand the boxes on the hall's floor, spread along it
            b.center = (b.center[0] * 3, 3.0 - b.half_size[1], b.center[2] * 6)
    spec.camera_path = _path(rng, kind, path_cm / 100.0)
    r = render(spec)
    depth = r.depth.astype(np.float64)
    sky = np.zeros(depth.shape, bool)
    if kind == "hall":  # the ceiling (room, y = -3) is sky
        u, v = geo.pixel_grid(HEIGHT, WIDTH)
        for t in range(FRAMES):
            dirs = (
                np.stack(
                    [
                        (u - r.intrinsics[t, 2]) / r.intrinsics[t, 0],
                        (v - r.intrinsics[t, 3]) / r.intrinsics[t, 1],
                        np.ones_like(u),
                    ],
                    -1,
                )
                @ r.c2w[t, :3, :3].T
            )
            y = r.c2w[t, 1, 3] + depth[t] * dirs[..., 1]
            sky[t] = (r.object_id[t] == 0) & (y < -3.0 + 1e-3)
        depth[sky] = np.inf
    tracks = r.tracks_world.copy()
    vis = r.tracks_visible.copy()
    if kind == "hall":
        vis &= ~(tracks[..., 1] < -3.0 + 1e-3)  # no stereo tracks on the sky
    return r, depth, sky, tracks, vis


def _smooth_field(rng, shape, amplitude):
    t, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    field = np.zeros(shape)
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi, size=t)
        field += np.sin(2 * np.pi * (fx * xx + fy * yy)[None] + ph[:, None, None])
    return 1 + amplitude * field / 3


def _prediction(rng, depth, sky):
    a, c = rng.uniform(1, 4), rng.uniform(0.1, 0.5)
    with np.errstate(divide="ignore"):
        inv = 1.0 / depth
    x = (a * np.where(sky, 0.0, inv) + c) * (1 + 0.005 * rng.standard_normal(depth.shape))
    x *= _smooth_field(rng, depth.shape, 0.01)
    junk = rng.random(depth.shape) < 0.02
    return np.where(junk, rng.uniform(0, 2 * x.max(), depth.shape), x)


# --------------------------------------------------------------------------------------------
# One trial


@dataclass
class Trial:
    scenario: str
    seed: int
    clip: Clip
    prediction: np.ndarray
    reference: object
    truth: np.ndarray
    sky: np.ndarray
    k_sfm: float | None  # up-to-scale clips: dataset units = metric x k_sfm
    pose_factor: float  # claimed-metric poses: true scale error of the poses
    limits: tuple[float, float]


def make_trial(scenario: str, seed: int) -> Trial:
    kind, dataset, ref_kind, corruption, _ = SCENARIOS[scenario]
    rng = np.random.default_rng(10_000 + seed)
    path_cm = int(rng.choice([0, 1, 3])) if corruption == "static" else int(rng.choice([40, 70, 100]))
    r, depth, sky, tracks, vis = scene(kind, int(rng.integers(4)), path_cm)
    truth_c2w = r.c2w
    off = float(rng.choice([-1, 1]) * rng.uniform(0.15, 0.4))
    factor = 1 / (1 - off) if off > 0 else 1 + off  # x0.6-0.85 or x1.18-1.67
    up_to_scale = dataset == "realestate10k"
    k_sfm = float(np.exp(rng.uniform(np.log(0.3), np.log(3.0)))) if up_to_scale else None
    c2w = truth_c2w.copy()
    pose_factor = 1.0
    if up_to_scale:
        q = rng.normal(size=4)
        g = geo.make_pose(geo.quat_xyzw_to_matrix(q / np.linalg.norm(q)), rng.normal(size=3))  # SfM's world
        c2w = g @ c2w
        c2w[:, :3, 3] *= k_sfm
    elif corruption == "pose_scale":
        c2w[:, :3, 3] *= factor
        pose_factor = factor
    meta = ClipMeta(
        dataset=dataset,
        scene=f"{kind}",
        clip_id=f"{dataset}/{scenario}/{seed}",
        frame_indices=list(range(FRAMES)),
        dynamic=False,
        real=True,
        extra={} if up_to_scale else {"metric_poses": True},
    )
    clip = Clip(meta=meta, rgb=r.rgb, intrinsics=r.intrinsics.copy(), c2w=c2w)
    lo, hi = LIMITS[dataset]
    pred = _prediction(rng, depth, sky)
    if corruption == "region":  # the model fails on a third of the frame: that part looks 1.6x nearer
        h0, w0 = int(rng.integers(0, HEIGHT // 3)), int(rng.integers(0, WIDTH // 3))
        pred[:, h0 : h0 + 2 * HEIGHT // 3, w0 : w0 + WIDTH // 2] *= 1.6
    if ref_kind == "megasam":
        try:
            ref = _megasam_reference(rng, r, depth, sky, corruption, factor, clip, lo)
        except AlignmentError as e:  # refused already (e.g. its focal length): the clip fails
            ref = e
    else:
        clip.tracks = tracks.astype(np.float32)
        clip.track_visible = vis
        ref = _stereo_reference(rng, tracks, vis, truth_c2w, r.intrinsics, lo)
    return Trial(scenario, seed, clip.validate(), pred, ref, depth, sky, k_sfm, pose_factor, (lo, hi))


def _megasam_reference(rng, r, depth, sky, corruption, factor, clip, lo):
    rho = (
        1 + float(rng.choice([-1, 1]) * rng.uniform(0.2, 0.3))
        if corruption == "focal"
        else 1 + rng.uniform(-0.03, 0.03)
    )
    prior = 1.15 if corruption == "prior_scale" else 1.0
    d = (
        np.where(sky, 100.0, depth)
        * (1 + 0.02 * rng.standard_normal(depth.shape))
        * _smooth_field(rng, depth.shape, 0.02)
    )
    junk = rng.random(depth.shape) < 0.05
    d = np.where(junk, d * rng.uniform(0.5, 2.0, depth.shape), d)
    d = np.where(sky, 100.0, np.clip(d * prior, 1e-3, 100.0)).astype(np.float32)
    g = geo.make_pose(geo.quat_xyzw_to_matrix(np.array([0.2, -0.5, 0.1, 0.8])), np.array([2.0, -1.0, 0.5]))
    c2w = g @ r.c2w
    c2w[:, :3, 3] *= prior / rho
    if corruption == "trajectory_scale":
        c2w[:, :3, 3] *= factor
    c2w[:, :3, 3] += 0.01 * rng.standard_normal((FRAMES, 3))
    for t in range(FRAMES):
        axis = rng.normal(size=3)
        angle = np.radians(0.3) * rng.standard_normal()
        q = np.append(np.sin(angle / 2) * axis / np.linalg.norm(axis), np.cos(angle / 2))
        c2w[t, :3, :3] = geo.quat_xyzw_to_matrix(q) @ c2w[t, :3, :3]
    k = r.intrinsics[0].copy()
    k[:2] *= rho
    out = MegaSaMOutput(images=r.rgb, depths=d, intrinsic=geo.intrinsics_matrix(k), cam_c2w=c2w, path="synthetic")
    return reference_from_megasam(
        out, HEIGHT, WIDTH, expected_frames=FRAMES, min_depth=lo, clip_intrinsics=clip.intrinsics
    )


def _stereo_reference(rng, tracks, vis, c2w, intrinsics, lo):
    tr = tracks.copy()
    tr[~vis] = np.nan
    ref = reference_from_tracks(tr, intrinsics, c2w, HEIGHT, WIDTH, min_depth=lo, max_depth=1e3)
    disp = 1.0 / ref.depth[ref.valid] + STEREO_SIGMA * rng.standard_normal(int(ref.valid.sum()))
    junk = rng.random(disp.size) < 0.02
    disp = np.where(junk, rng.uniform(1 / 30, 1.0, disp.size), disp)
    d = ref.depth.copy()
    d[ref.valid] = np.where(disp > 0, 1.0 / np.maximum(disp, 1e-9), 0.0)
    ref.valid &= d > lo  # released tracks go beyond 20 m; the fit applies the limit (stages/align/fit.py)
    ref.depth = np.where(ref.valid, d, 0.0).astype(np.float32)
    return ref


def run_trial(trial: Trial) -> dict:
    lo, hi = trial.limits
    opts = AlignClipOptions(fit=FitOptions(min_depth=lo, max_depth=hi))
    row = {"scenario": trial.scenario, "seed": trial.seed}
    if isinstance(trial.reference, AlignmentError):
        return {**row, "kept": False, "reason": trial.reference.reason, "failed": True}
    try:
        out = align_clip(trial.clip, trial.prediction, trial.reference, opts)
    except AlignmentError as e:
        return {**row, "kept": False, "reason": e.reason, "failed": True}
    qc = out.meta.qc["align"]
    scored = out.depth_valid & ~trial.sky
    d, t = out.depth[scored].astype(np.float64), trial.truth[scored]
    abs_rel = float(np.mean(np.abs(d - t) / t)) if d.size else float("nan")
    delta = float(np.mean(np.maximum(d / t, t / d) < 1.25)) if d.size else float("nan")
    depth_scale_err = float(np.median(d / t) - 1) if d.size else float("nan")
    pose_err = (qc["pose_scale"] * trial.k_sfm - 1) if trial.k_sfm is not None else trial.pose_factor - 1
    return {
        **row,
        "kept": bool(qc["keep"]),
        "reason": qc["reason"],
        "failed": False,
        "abs_rel": abs_rel,
        "delta_1_25": delta,
        "sky_with_depth": float((out.depth_valid & trial.sky).sum() / max(trial.sky.sum(), 1)),
        "pose_scale_error": float(pose_err),
        "depth_scale_error": depth_scale_err,
        "scale_error": float(max(abs(pose_err), abs(depth_scale_err))),
        "pose_scale_method": qc.get("pose_scale_method"),
    }


# --------------------------------------------------------------------------------------------
# Track lifting on distant ground


def ground_tracks_kept(width: int, height: int, focal: float, noise: float, seed: int = 0) -> dict:
    """Share of visible ground-plane tracks lifted, per depth band (camera 1.5 m up, level)."""
    frames, step = 4, 0.5
    k = np.array([focal, focal, width / 2.0, height / 2.0])
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    c2w[:, 2, 3] = step * np.arange(frames)
    v, _ = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    dy = (v - k[3]) / k[1]
    z = np.where(dy > 1e-9, 1.5 / np.where(dy > 1e-9, dy, 1.0), 0.0)
    rng = np.random.default_rng(seed)
    depth = np.repeat(z[None], frames, 0) * (1 + noise * rng.standard_normal((frames, height, width)))
    depth = np.where(z[None] > 0, depth, 0.0).astype(np.float32)
    n = 6000
    zs = np.exp(rng.uniform(np.log(2.0), np.log(200.0), n)) + step * frames
    pts = np.stack([rng.uniform(-1, 1, n) * 0.45 * zs * width / focal, np.full(n, 1.5), zs], -1)
    uv = np.stack([geo.project(pts, k, c2w[f])[0] for f in range(frames)])
    inside = (uv[..., 0] > 2) & (uv[..., 0] < width - 2) & (uv[..., 1] > height / 2 + 2) & (uv[..., 1] < height - 2)
    _, vis = lift_tracks(uv, inside, depth, depth > 0, np.tile(k, (frames, 1)), c2w)
    out = {}
    for lo_m, hi_m in [(0, 10), (10, 20), (20, 40), (40, 80), (80, 160)]:
        band = inside & ((zs >= lo_m) & (zs < hi_m))[None]
        out[f"{lo_m}-{hi_m} m"] = float((vis & band).sum() / band.sum()) if band.sum() >= 20 else None
    return out


# --------------------------------------------------------------------------------------------
# The whole benchmark


def run(trials: int, seed: int = 0, scenarios=None, lifting: bool = True) -> dict:
    rows = []
    t0 = time.time()
    for name in scenarios or SCENARIOS:
        for i in range(trials):
            rows.append(run_trial(make_trial(name, seed * 100_000 + i)))
    elapsed = time.time() - t0
    summary = summarise(rows)
    lift = (
        {
            f"{w}x{h}, f={f:g}, noise {int(100 * nz)} %": ground_tracks_kept(w, h, f, nz)
            for (w, h, f) in [(512, 288, 300.0), (1242, 375, 725.0)]
            for nz in (0.0, 0.02)
        }
        if lifting
        else {}
    )
    return {
        "trials_per_scenario": trials,
        "seed": seed,
        "seconds": round(elapsed, 1),
        "summary": summary,
        "lifting": lift,
        "rows": rows,
    }


def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else None


def summarise(rows: list[dict]) -> dict:
    per = {}
    for name in dict.fromkeys(r["scenario"] for r in rows):
        rs = [r for r in rows if r["scenario"] == name]
        kept = [r for r in rs if r["kept"]]
        aligned = [r for r in rs if not r["failed"]]
        pose = [r["pose_scale_error"] for r in aligned if SCENARIOS[name][1] == "realestate10k"]
        per[name] = {
            "clips": len(rs),
            "good": SCENARIOS[name][4],
            "kept": len(kept) / len(rs),
            "abs_rel": _mean(aligned, "abs_rel"),
            "delta_1_25": _mean(aligned, "delta_1_25"),
            "sky_with_depth": _mean(aligned, "sky_with_depth"),
            "pose_scale_bias": float(np.mean(pose)) if pose else None,
            "pose_scale_abs_median": float(np.median(np.abs(pose))) if pose else None,
            "wrong_scale": sum(1 for r in aligned if r["scale_error"] > WRONG_SCALE),
            "wrong_scale_kept": sum(1 for r in kept if r["scale_error"] > WRONG_SCALE),
            "reasons": _top_reasons([r for r in rs if not r["kept"]]),
        }
    good = [r for r in rows if SCENARIOS[r["scenario"]][4] is True]
    judged = [r for r in rows if SCENARIOS[r["scenario"]][4] is not None]
    corrupted = [r for r in judged if not SCENARIOS[r["scenario"]][4]]
    wrong = [r for r in judged if not r["failed"] and r["scale_error"] > WRONG_SCALE]
    wrong_dropped = sum(1 for r in wrong if not r["kept"]) + sum(1 for r in corrupted if r["failed"])
    wrong_total = len(wrong) + sum(1 for r in corrupted if r["failed"])
    return {
        "per_scenario": per,
        "good_kept": sum(r["kept"] for r in good) / max(len(good), 1),
        "corrupted_dropped": sum(not r["kept"] for r in corrupted) / max(len(corrupted), 1),
        "wrong_scale_clips": wrong_total,
        "wrong_scale_dropped": wrong_dropped / max(wrong_total, 1),
    }


def _top_reasons(rows, n=2):
    counts = {}
    for r in rows:
        key = (r.get("reason") or "").split(";")[0].split(":")[0].strip()[:60]
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:n]


def _pct(v, digits=1):
    return "—" if v is None else f"{100 * v:.{digits}f} %"


def markdown(res: dict, command: str) -> str:
    s = res["summary"]
    lines = [
        (
            f"Command: `{command}` ({res['trials_per_scenario']} clips per scenario, seed {res['seed']}, "
            f"{res['seconds']:.0f} s on {platform.machine()} with {os.cpu_count()} CPUs)."
        ),
        "",
        (
            f"**Good clips kept: {_pct(s['good_kept'])}** (goal >= 99 %). **Clips with a wrong scale "
            f"(> {int(100 * WRONG_SCALE)} % off) dropped: {_pct(s['wrong_scale_dropped'])}** of "
            f"{s['wrong_scale_clips']} (goal >= 99 %). Corrupted clips dropped: {_pct(s['corrupted_dropped'])}."
        ),
        "",
        "| scenario | good? | kept | AbsRel | δ<1.25 | sky given depth | pose-scale bias | median abs pose-scale error | wrong scale (kept) | main drop reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in s["per_scenario"].items():
        good = {True: "good", False: "corrupted", None: "undetectable"}[p["good"]]
        reason = p["reasons"][0][0] if p["reasons"] else ""
        lines.append(
            f"| {name} | {good} | {_pct(p['kept'])} | {_pct(p['abs_rel'], 2)} | {_pct(p['delta_1_25'])} | "
            f"{_pct(p['sky_with_depth'], 2)} | {_pct(p['pose_scale_bias'], 2)} | "
            f"{_pct(p['pose_scale_abs_median'], 2)} | {p['wrong_scale']} ({p['wrong_scale_kept']}) | {reason} |"
        )
    if not res["lifting"]:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Ground tracks kept by depth band (lifting, `stages/tracks/lift.py`):",
        "",
        "| camera | " + " | ".join(next(iter(res["lifting"].values())).keys()) + " |",
        "|---" * (1 + len(next(iter(res["lifting"].values())))) + "|",
    ]
    for cam, bands in res["lifting"].items():
        lines.append(f"| {cam} | " + " | ".join(_pct(v, 0) for v in bands.values()) + " |")
    return "\n".join(lines) + "\n"


def replace_block(path: str, block: str) -> None:
    begin, end = "<!-- align-accuracy:begin -->", "<!-- align-accuracy:end -->"
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + block + end + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=100, help="clips per scenario")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for align_accuracy.json / .md")
    p.add_argument("--doc", help="a markdown file whose align-accuracy block to replace (docs/ALIGNMENT.md)")
    a = p.parse_args(argv)
    res = run(a.trials, a.seed)
    os.makedirs(a.out, exist_ok=True)
    command = f"python bench/align_accuracy.py --trials {a.trials} --seed {a.seed} --out {a.out}" + (
        f" --doc {a.doc}" if a.doc else ""
    )
    md = markdown(res, command)
    with open(os.path.join(a.out, "align_accuracy.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(a.out, "align_accuracy.md"), "w") as f:
        f.write(md)
    if a.doc:
        replace_block(a.doc, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
