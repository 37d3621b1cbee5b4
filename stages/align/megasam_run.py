"""Run the public MegaSaM code on a folder of frames and write the npz d4s reads.

Usable as ``stages.align.megasam_command`` (see :func:`command_template`)::

    python -m stages.align.megasam_run --megasam-root /opt/mega-sam \\
        --python /opt/conda/envs/mega_sam/bin/python {frames_dir} {out_npz}

MegaSaM (github.com/mega-sam/mega-sam) has no single entry point; its README runs four steps
per video through shell scripts that loop over hard-coded sequences. This wrapper runs the
same programs with the same flags, for one frames folder (paths are relative to the MegaSaM
root; the shell script each line comes from is named):

1. monocular depth priors (``mono_depth_scripts/run_mono-depth_demo.sh``):
   ``Depth-Anything/run_videos.py --encoder vitl --load-from CKPT --img-path FRAMES --outdir
   MONO/SCENE`` and, with ``UniDepth`` on ``PYTHONPATH``,
   ``UniDepth/scripts/demo_mega-sam.py --scene-name SCENE --img-path FRAMES --outdir UNI``;
2. camera tracking (``tools/evaluate_demo.sh``): ``camera_tracking_scripts/test_demo.py
   --datapath=FRAMES --weights=CKPT --scene_name SCENE --mono_depth_path MONO
   --metric_depth_path UNI --disable_vis`` (this script always optimises the focal length,
   ``_opt_intr=True``; the README's ``--opt_focal`` belongs to the Sintel/DyCheck scripts);
3. optical flow (``cvd_opt/cvd_opt_demo.sh``): ``cvd_opt/preprocess_flow.py --datapath=FRAMES
   --model=CKPT --scene_name SCENE --mixed_precision``;
4. consistent video depth (same script): ``cvd_opt/cvd_opt.py --scene_name SCENE --w_grad 2.0
   --w_normal 5.0 --output_dir OUT`` -> ``OUT/SCENE_sgd_cvd_hr.npz``.

The scripts read and write paths relative to the working directory (``base/droid_slam`` and
``cvd_opt/core`` on ``sys.path``; ``reconstructions/``, ``outputs/`` and ``cache_flow/``
written), so two videos in one MegaSaM checkout would overwrite each other. Each run gets a
private working directory instead, holding symbolic links to the checkout's entries and its
own output folders; it is removed afterwards (``--keep-workdir`` keeps it).

Step 5, the conversion: MegaSaM works on frames resized to about 384x512 pixels of area and
cropped to multiples of 8 at the bottom/right (``image_stream`` in test_demo.py and
``preprocess_flow.py``: ``h1 = int(h0 * sqrt(384*512 / (h0*w0)))``, crop to ``h1 - h1 % 8``).
Scaling its output back to the frame size would misregister it by the crop (about 1 %), so
the depth is resampled to the input frames' grid through that resize (nearest neighbour at
pixel centres; pixels in the cropped-off strip have no depth, 0), and the intrinsics are
scaled by ``w0/w1``, ``h0/h1``. The npz written to ``{out_npz}`` has ``images`` (the input
frames), ``depths`` (float32, metres, 0 = none; MegaSaM clips to [1e-3, 100] m),
``intrinsic`` (3x3) and ``cam_c2w`` (T,4,4), as ``stages/align/megasam.py`` reads it.

The GPU is whatever the caller gives (``CUDA_VISIBLE_DEVICES`` is passed through, never set:
the scripts' ``CUDA_VISIBLE_DEVICES=0`` would defeat Ray's assignment). UniDepth loads its
weights with ``from_pretrained`` from the Hugging Face hub and Depth-Anything builds DINOv2
through ``torch.hub``: on machines without internet point ``--hf-home``/``--torch-home`` at
caches that hold them (``--offline`` sets ``HF_HUB_OFFLINE=1``), or use ``--localhub``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# The README's checkpoint locations, relative to the MegaSaM root.
DEFAULT_DEPTH_ANYTHING_CKPT = "Depth-Anything/checkpoints/depth_anything_vitl14.pth"
DEFAULT_RAFT_CKPT = "cvd_opt/raft-things.pth"
DEFAULT_MEGASAM_CKPT = "checkpoints/megasam_final.pth"  # tools/evaluate_demo.sh CKPT_PATH
# Folders the scripts write relative to their working directory: never linked to the checkout.
WRITTEN_DIRS = ("reconstructions", "outputs", "outputs_cvd", "cache_flow")
# MegaSaM's working resolution: about this many pixels, then cropped to multiples of 8.
MEGASAM_AREA = 384 * 512
SCENE = "d4s_scene"


class MegaSaMRunError(RuntimeError):
    """A MegaSaM step failed or its output is not what this wrapper expects."""


def command_template(
    megasam_root: str,
    python: str = "python",
    *,
    depth_anything_ckpt: str | None = None,
    raft_ckpt: str | None = None,
    megasam_ckpt: str | None = None,
    extra: list[str] | None = None,
) -> str:
    """A ``stages.align.megasam_command`` running this wrapper with the current interpreter."""
    args = [sys.executable, "-m", "stages.align.megasam_run", "--megasam-root", str(megasam_root), "--python", python]
    for flag, value in (
        ("--depth-anything-ckpt", depth_anything_ckpt),
        ("--raft-ckpt", raft_ckpt),
        ("--megasam-ckpt", megasam_ckpt),
    ):
        if value:
            args += [flag, str(value)]
    args += list(extra or [])
    return shlex.join(args) + " {frames_dir} {out_npz}"


def frame_files(frames_dir: str) -> list[str]:
    """The frames in MegaSaM's order: its scripts glob ``*.jpg`` then ``*.png`` (test_demo.py,
    demo_mega-sam.py) or the reverse (run_videos.py, preprocess_flow.py), each sorted; mixing
    both would make them disagree, so it is refused."""
    base = glob.escape(frames_dir)  # the folder taken literally: a name like job[42] is no pattern
    jpg = sorted(glob.glob(os.path.join(base, "*.jpg")))
    png = sorted(glob.glob(os.path.join(base, "*.png")))
    if jpg and png:
        raise MegaSaMRunError(f"{frames_dir}: both .jpg and .png frames; MegaSaM's scripts order them differently")
    if len(jpg) + len(png) < 2:
        raise MegaSaMRunError(
            f"{frames_dir}: MegaSaM needs at least 2 frames (.png or .jpg), found {len(jpg) + len(png)}"
        )
    return jpg or png


def working_size(h0: int, w0: int) -> tuple[int, int, int, int]:
    """(h1, w1, hc, wc): MegaSaM's resized size and its crop to multiples of 8."""
    f = np.sqrt(MEGASAM_AREA / (h0 * w0))
    h1, w1 = int(h0 * f), int(w0 * f)
    return h1, w1, h1 - h1 % 8, w1 - w1 % 8


def to_frame_grid(depths: np.ndarray, intrinsic: np.ndarray, h0: int, w0: int) -> tuple[np.ndarray, np.ndarray]:
    """MegaSaM's (T,hc,wc) depth and 3x3 K on its cropped working grid -> the (h0,w0) frame grid."""
    h1, w1, hc, wc = working_size(h0, w0)
    if depths.shape[1:] != (hc, wc):
        raise MegaSaMRunError(
            f"MegaSaM depth is {depths.shape[1:]}, expected {(hc, wc)} for {h0}x{w0} frames "
            f"(resized to {h1}x{w1}, cropped to multiples of 8)"
        )
    rows = np.floor((np.arange(h0) + 0.5) * h1 / h0).astype(int)
    cols = np.floor((np.arange(w0) + 0.5) * w1 / w0).astype(int)
    nr, nc = int((rows < hc).sum()), int((cols < wc).sum())  # rows/cols increase: the rest were cropped
    out = np.zeros((depths.shape[0], h0, w0), np.float32)
    out[:, :nr, :nc] = depths[:, rows[:nr]][:, :, cols[:nc]]
    k = np.asarray(intrinsic, np.float64).copy()
    k[0, :] *= w0 / w1
    k[1, :] *= h0 / h1
    k[2, :] = (0.0, 0.0, 1.0)
    return out, k


def _link_checkout(root: Path, work: Path) -> None:
    """A working directory that looks like the MegaSaM checkout for reading, private for writing."""
    for entry in root.iterdir():
        if entry.name in WRITTEN_DIRS:
            continue
        (work / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    for name in WRITTEN_DIRS:
        (work / name).mkdir()


def _run(step: str, argv: list[str], cwd: Path, env: dict) -> None:
    print(f"[megasam_run] {step}: {shlex.join(argv)}", flush=True)
    rc = subprocess.call(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise MegaSaMRunError(f"MegaSaM step '{step}' exited with code {rc}")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MegaSaMRunError(f"{what} not found: {path}")
    return path


def run(
    frames_dir: str,
    out_npz: str,
    *,
    megasam_root: str,
    python: str = "python",
    depth_anything_ckpt: str | None = None,
    raft_ckpt: str | None = None,
    megasam_ckpt: str | None = None,
    w_grad: float = 2.0,
    w_normal: float = 5.0,
    localhub: bool = False,
    hf_home: str | None = None,
    torch_home: str | None = None,
    offline: bool = False,
    workdir: str | None = None,
    keep_workdir: bool = False,
) -> None:
    """MegaSaM's four steps on ``frames_dir``, then its result on the frames' grid at ``out_npz``."""
    root = _require(Path(megasam_root).resolve(), "MegaSaM root")
    exe = shutil.which(python)
    if exe is None:
        raise MegaSaMRunError(f"MegaSaM's python {python!r} not found")
    da_ckpt = _require(Path(depth_anything_ckpt or root / DEFAULT_DEPTH_ANYTHING_CKPT), "Depth-Anything checkpoint")
    raft = _require(Path(raft_ckpt or root / DEFAULT_RAFT_CKPT), "RAFT checkpoint")
    ms_ckpt = _require(Path(megasam_ckpt or root / DEFAULT_MEGASAM_CKPT), "MegaSaM checkpoint")
    frames = frame_files(frames_dir)
    frames_dir = str(Path(frames_dir).resolve())

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(root / "UniDepth")) if p)
    if hf_home:
        env["HF_HOME"] = hf_home
    if torch_home:
        env["TORCH_HOME"] = torch_home
    if offline:
        env["HF_HUB_OFFLINE"] = "1"

    parent = Path(workdir) if workdir else Path(out_npz).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="megasam-work-", dir=parent))
    try:
        _link_checkout(root, work)
        mono, uni, cvd_out = work / "mono_depth", work / "metric_depth", work / "outputs_cvd"
        da = [
            exe,
            str(root / "Depth-Anything/run_videos.py"),
            "--encoder",
            "vitl",
            "--load-from",
            str(da_ckpt),
            "--img-path",
            frames_dir,
            "--outdir",
            str(mono / SCENE),
        ] + (["--localhub"] if localhub else [])
        _run("mono depth (Depth-Anything)", da, work, env)
        _run(
            "metric depth (UniDepth)",
            [
                exe,
                str(root / "UniDepth/scripts/demo_mega-sam.py"),
                "--scene-name",
                SCENE,
                "--img-path",
                frames_dir,
                "--outdir",
                str(uni),
            ],
            work,
            env,
        )
        _run(
            "camera tracking",
            [
                exe,
                str(root / "camera_tracking_scripts/test_demo.py"),
                f"--datapath={frames_dir}",
                f"--weights={ms_ckpt}",
                "--scene_name",
                SCENE,
                "--mono_depth_path",
                str(mono),
                "--metric_depth_path",
                str(uni),
                "--disable_vis",
            ],
            work,
            env,
        )
        _run(
            "optical flow",
            [
                exe,
                str(root / "cvd_opt/preprocess_flow.py"),
                f"--datapath={frames_dir}",
                f"--model={raft}",
                "--scene_name",
                SCENE,
                "--mixed_precision",
            ],
            work,
            env,
        )
        _run(
            "consistent video depth",
            [
                exe,
                str(root / "cvd_opt/cvd_opt.py"),
                "--scene_name",
                SCENE,
                "--w_grad",
                f"{w_grad:g}",
                "--w_normal",
                f"{w_normal:g}",
                "--output_dir",
                str(cvd_out),
            ],
            work,
            env,
        )
        result = cvd_out / f"{SCENE}_sgd_cvd_hr.npz"
        convert(result, frames, out_npz)
    finally:
        if not keep_workdir:
            shutil.rmtree(work, ignore_errors=True)


def convert(result_npz: str | os.PathLike, frames: list[str], out_npz: str | os.PathLike) -> None:
    """MegaSaM's ``*_sgd_cvd_hr.npz`` -> ``out_npz`` on the frames' grid (module docstring, step 5)."""
    if not Path(result_npz).exists():
        raise MegaSaMRunError(f"MegaSaM finished without its result {result_npz}")
    with np.load(result_npz, allow_pickle=False) as z:
        missing = [k for k in ("depths", "intrinsic", "cam_c2w") if k not in z.files]
        if missing:
            raise MegaSaMRunError(f"{result_npz} lacks {missing}")
        depths, intrinsic, c2w = (np.asarray(z[k]) for k in ("depths", "intrinsic", "cam_c2w"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in frames])
    if depths.shape[0] != len(frames) or c2w.shape != (len(frames), 4, 4):
        raise MegaSaMRunError(
            f"MegaSaM returned {depths.shape[0]} depths / {c2w.shape[0]} poses for {len(frames)} frames"
        )
    h0, w0 = images.shape[1:3]
    depth, k = to_frame_grid(depths.astype(np.float32), intrinsic, h0, w0)
    out = Path(out_npz)
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, images=images, depths=depth, intrinsic=k, cam_c2w=c2w.astype(np.float64))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("frames_dir", help="folder of the video's frames (.png or .jpg, in name order)")
    p.add_argument("out_npz", help="where to write the result (d4s's {out_npz})")
    p.add_argument(
        "--megasam-root", required=True, help="a checkout of github.com/mega-sam/mega-sam, set up per its README"
    )
    p.add_argument("--python", default="python", help="the interpreter of MegaSaM's environment")
    p.add_argument("--depth-anything-ckpt", help=f"default: ROOT/{DEFAULT_DEPTH_ANYTHING_CKPT}")
    p.add_argument("--raft-ckpt", help=f"default: ROOT/{DEFAULT_RAFT_CKPT}")
    p.add_argument("--megasam-ckpt", help=f"default: ROOT/{DEFAULT_MEGASAM_CKPT}")
    p.add_argument("--w-grad", type=float, default=2.0, help="cvd_opt.py --w_grad (cvd_opt_demo.sh: 2.0)")
    p.add_argument("--w-normal", type=float, default=5.0, help="cvd_opt.py --w_normal (cvd_opt_demo.sh: 5.0)")
    p.add_argument("--localhub", action="store_true", help="run_videos.py --localhub: DINOv2 from ROOT/torchhub")
    p.add_argument("--hf-home", help="HF_HOME holding UniDepth's weights")
    p.add_argument("--torch-home", help="TORCH_HOME holding torch.hub's DINOv2")
    p.add_argument("--offline", action="store_true", help="HF_HUB_OFFLINE=1")
    p.add_argument("--workdir", help="where the private working directory goes (default: beside out_npz)")
    p.add_argument("--keep-workdir", action="store_true")
    a = p.parse_args(argv)
    try:
        run(
            a.frames_dir,
            a.out_npz,
            megasam_root=a.megasam_root,
            python=a.python,
            depth_anything_ckpt=a.depth_anything_ckpt,
            raft_ckpt=a.raft_ckpt,
            megasam_ckpt=a.megasam_ckpt,
            w_grad=a.w_grad,
            w_normal=a.w_normal,
            localhub=a.localhub,
            hf_home=a.hf_home,
            torch_home=a.torch_home,
            offline=a.offline,
            workdir=a.workdir,
            keep_workdir=a.keep_workdir,
        )
    except MegaSaMRunError as e:
        print(f"[megasam_run] error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
