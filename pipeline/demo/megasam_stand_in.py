"""A stand-in for the MegaSaM program, for tests and benchmarks where MegaSaM is not installed.

It speaks MegaSaM's interface as d4s calls it (a frames folder in, an npz with ``images``,
``depths``, ``intrinsic``, ``cam_c2w`` out; see ``stages/align/megasam.py``) and answers with the
rendered truth of a demo scene (``save_truth``), expressed in a world frame of its own as MegaSaM
would. ``--fail SCENE`` / ``--hang SCENE`` make it crash or hang for one scene so tests can
check per-clip error handling. Nothing in a real build uses it: a real config names the real
MegaSaM command in ``stages.align.megasam_command``.

    python -m pipeline.demo.megasam_stand_in --frames DIR --out OUT.npz --clip CLIP_ID --truth DIR
"""
from __future__ import annotations

import argparse
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
    np.savez(os.path.join(truth_dir, f"{scene_key}.npz"), rgb=rendered.rgb, depth=rendered.depth,
             intrinsics=rendered.intrinsics, c2w=rendered.c2w)


def command_template(truth_dir, log=None, fail: str = "-", hang: str = "-") -> str:
    """The ``stages.align.megasam_command`` that runs this stand-in."""
    cmd = (f"{shlex.quote(sys.executable)} -m pipeline.demo.megasam_stand_in --frames {{frames_dir}} "
           f"--out {{out_npz}} --clip {{clip_id}} --truth {shlex.quote(str(truth_dir))} --fail {fail} --hang {hang}")
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
    a = p.parse_args(argv)
    if a.log:
        with open(a.log, "a") as f:
            f.write(a.clip + "\n")
    _dataset, scene, start = a.clip.split("__")
    if scene == a.fail:
        print("stand-in: simulated MegaSaM crash", file=sys.stderr)
        return 3
    if scene == a.hang:
        time.sleep(600)
    with np.load(os.path.join(a.truth, scene + ".npz"), allow_pickle=False) as truth:
        n = len(os.listdir(a.frames))
        sl = slice(int(start), int(start) + n)
        k = truth["intrinsics"][0]
        intrinsic = np.array([[k[0], 0, k[2]], [0, k[1], k[3]], [0, 0, 1.0]])
        np.savez(a.out, images=truth["rgb"][sl], depths=truth["depth"][sl].astype(np.float32), intrinsic=intrinsic,
                 cam_c2w=_WORLD @ truth["c2w"][sl])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
