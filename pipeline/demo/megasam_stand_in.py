"""A stand-in for the MegaSaM program, for tests and benchmarks where MegaSaM is not installed.

It speaks MegaSaM's interface as d4s calls it (a frames folder in, an npz with ``images``,
``depths``, ``intrinsic``, ``cam_c2w`` out; see ``stages/align/megasam.py``) and answers with the
rendered truth of a demo scene (``save_truth``) for the frames it was given (their file names
are the source frame indices), expressed in a world frame of its own as MegaSaM would.
``--fail SCENE`` / ``--hang SCENE`` make it crash or hang for one scene so tests can check
error handling; ``--delay`` makes each run take that long. ``--noise`` adds relative per-pixel depth noise and ``--scale-jitter`` one
metric-scale error per run (seeded by the run id), as a real MegaSaM run has: with it, passes
over different frames of one scene disagree about its size. Nothing in a real build uses it: a
real config names the real MegaSaM command in ``stages.align.megasam_command``.

    python -m pipeline.demo.megasam_stand_in --frames DIR --out OUT.npz --clip RUN_ID --truth DIR
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
import time

import numpy as np

# MegaSaM's world is arbitrary: the truth is answered in a rotated, shifted frame.
_WORLD = np.array([[0.0, -1.0, 0.0, 5.0], [1.0, 0.0, 0.0, -2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])


def save_truth(truth_dir, scene_key: str, rendered) -> None:
    """Keep a rendered scene's truth where the stand-in finds it (``scene_key``: the key-safe
    scene id that appears in clip ids)."""
    os.makedirs(truth_dir, exist_ok=True)
    np.savez(
        os.path.join(truth_dir, f"{scene_key}.npz"),
        rgb=rendered.rgb,
        depth=rendered.depth,
        intrinsics=rendered.intrinsics,
        c2w=rendered.c2w,
    )


def command_template(
    truth_dir,
    log=None,
    fail: str = "-",
    hang: str = "-",
    noise: float = 0.0,
    scale_jitter: float = 0.0,
    delay_s: float = 0.0,
) -> str:
    """The ``stages.align.megasam_command`` that runs this stand-in."""
    cmd = (
        f"{shlex.quote(sys.executable)} -m pipeline.demo.megasam_stand_in --frames {{frames_dir}} "
        f"--out {{out_npz}} --clip {{clip_id}} --truth {shlex.quote(str(truth_dir))} --fail {fail} --hang {hang}"
    )
    if noise or scale_jitter:
        cmd += f" --noise {noise:g} --scale-jitter {scale_jitter:g}"
    if delay_s:
        cmd += f" --delay {delay_s:g}"
    return cmd + (f" --log {shlex.quote(str(log))}" if log else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--clip", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--log")
    p.add_argument("--fail", default="-")
    p.add_argument("--hang", default="-")
    p.add_argument("--noise", type=float, default=0.0, help="relative per-pixel depth noise (std)")
    p.add_argument("--scale-jitter", type=float, default=0.0, help="relative std of one scale error per run")
    p.add_argument("--delay", type=float, default=0.0, help="seconds to take before answering (a run's duration)")
    a = p.parse_args(argv)
    if a.log:
        with open(a.log, "a") as f:
            f.write(a.clip + "\n")
    _dataset, scene, _start = a.clip.split("__")
    if scene == a.fail:
        print("stand-in: simulated MegaSaM crash", file=sys.stderr)
        return 3
    if scene == a.hang:
        time.sleep(600)
    time.sleep(a.delay)
    names = sorted(os.listdir(a.frames))
    idx = [int(os.path.splitext(n)[0]) for n in names]  # d4s names frames by their source index
    with np.load(os.path.join(a.truth, scene + ".npz"), allow_pickle=False) as truth:
        k = truth["intrinsics"][0]
        intrinsic = np.array([[k[0], 0, k[2]], [0, k[1], k[3]], [0, 0, 1.0]])
        depth = truth["depth"][idx].astype(np.float64)
        c2w = _WORLD @ truth["c2w"][idx]
        rgb = truth["rgb"][idx]
    rng = np.random.default_rng(int(hashlib.sha256(a.clip.encode()).hexdigest()[:8], 16))
    s = float(np.exp(rng.normal(0.0, a.scale_jitter))) if a.scale_jitter else 1.0
    if a.noise:
        depth = depth * np.exp(rng.normal(0.0, a.noise, depth.shape))
    c2w[:, :3, 3] *= s
    np.savez(a.out, images=rgb, depths=(depth * s).astype(np.float32), intrinsic=intrinsic, cam_c2w=c2w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
