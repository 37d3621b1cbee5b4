"""Running MegaSaM (an external program with its own environment) and reading its output.

d4s does not import MegaSaM: it runs it as a command per clip and reads the ``.npz`` it writes
(``images`` (T,H,W,3) uint8, ``depths`` (T,H,W) float32, ``intrinsic`` (3,3) pixels, ``cam_c2w``
(T,4,4) OpenCV camera-to-world; see ``FORMATS.md``, "MegaSaM outputs").

:class:`MegaSaMRunner` takes a command template with the placeholders ``{frames_dir}``,
``{out_npz}`` and ``{clip_id}``. Safety: the *template* is split with :func:`shlex.split` once,
then each argument is formatted on its own, so a value (a clip id with spaces, quotes or ``;``)
always stays inside one argv element; no shell is involved. A clip id starting with ``-`` is
refused (it could be read as an option). The command must write the npz to ``{out_npz}``
(a wrapper script can rename MegaSaM's ``<name>_sgd_cvd_hr.npz``).

Errors: a missing executable or a bad template is a configuration error
(:class:`MegaSaMConfigError`, *not* a :class:`ClipError`: the run should stop, not skip every
clip). A failing command, a timeout or an unreadable output is an :class:`AlignmentError` for
that clip naming the clip, the exit code and the log file.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import geometry as geo
from stages.align.fit import AlignmentError

PLACEHOLDERS = ("frames_dir", "out_npz", "clip_id")


class MegaSaMConfigError(RuntimeError):
    """MegaSaM is not usable as configured (missing executable, bad template). Stops the run."""


@dataclass
class MegaSaMOutput:
    """A validated MegaSaM result. ``intrinsics`` is (T,4) fx fy cx cy for the depth's size."""

    images: np.ndarray  # (T,H,W,3) uint8
    depths: np.ndarray  # (T,H,W) float32, metres (metric-ish)
    intrinsic: np.ndarray  # (3,3)
    cam_c2w: np.ndarray  # (T,4,4)
    path: str = ""
    cached: bool = False

    @property
    def num_frames(self) -> int:
        return int(self.depths.shape[0])

    @property
    def intrinsics(self) -> np.ndarray:
        return np.tile(geo.intrinsics_vector(self.intrinsic), (self.num_frames, 1))

    def resized(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Depth (T,height,width) and intrinsics (T,4) for another image size.

        Depth is resampled by nearest neighbour at pixel centres (never mixes a foreground and a
        background depth into a floating value); intrinsics scale by the size ratio, which is
        exact under the pixel-centre convention (u = j + 0.5).
        """
        _, h0, w0 = self.depths.shape
        k = self.intrinsics.copy()
        if (h0, w0) == (height, width):
            return self.depths, k
        sx, sy = width / w0, height / h0
        k[:, 0] *= sx
        k[:, 2] *= sx
        k[:, 1] *= sy
        k[:, 3] *= sy
        return resize_nearest(self.depths, height, width), k


def resize_nearest(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resampling of (T,h,w[,...]) maps to (T,height,width[,...]) at pixel centres."""
    _, h0, w0 = maps.shape[:3]
    rows = np.clip(np.floor((np.arange(height) + 0.5) * h0 / height).astype(int), 0, h0 - 1)
    cols = np.clip(np.floor((np.arange(width) + 0.5) * w0 / width).astype(int), 0, w0 - 1)
    return maps[:, rows][:, :, cols]


def load_megasam_npz(path: str | os.PathLike, expected_frames: int | None = None, clip_id: str = "") -> MegaSaMOutput:
    """Read and validate a MegaSaM ``.npz`` (no pickles). Raises :class:`AlignmentError`."""
    where = f"clip {clip_id}: " if clip_id else ""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("images", "depths", "intrinsic", "cam_c2w") if k not in z.files]
            if missing:
                raise AlignmentError(f"{where}MegaSaM output lacks {missing} (has {sorted(z.files)})", str(path))
            images, depths, intr, c2w = (np.asarray(z[k]) for k in ("images", "depths", "intrinsic", "cam_c2w"))
    except AlignmentError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is this clip's failure
        raise AlignmentError(f"{where}cannot read MegaSaM output: {type(e).__name__}: {e}", str(path)) from e
    t = depths.shape[0] if depths.ndim == 3 else -1
    if depths.ndim != 3:
        raise AlignmentError(f"{where}MegaSaM depths must be (T,H,W), got {depths.shape}", str(path))
    if images.ndim != 4 or images.shape[0] != t or images.shape[-1] != 3:
        raise AlignmentError(f"{where}MegaSaM images must be ({t},H,W,3), got {images.shape}", str(path))
    if intr.shape != (3, 3) or not np.all(np.isfinite(intr)) or intr[0, 0] <= 0 or intr[1, 1] <= 0:
        raise AlignmentError(f"{where}MegaSaM intrinsic must be a finite (3,3) K, got {intr.shape}", str(path))
    if c2w.shape != (t, 4, 4) or not np.all(np.isfinite(c2w)):
        raise AlignmentError(f"{where}MegaSaM cam_c2w must be finite ({t},4,4), got {c2w.shape}", str(path))
    if expected_frames is not None and t != expected_frames:
        raise AlignmentError(f"{where}MegaSaM returned {t} frames for {expected_frames}", str(path))
    if images.shape[1:3] != depths.shape[1:3]:
        # K belongs to the depth grid; FORMATS.md has both at one size. Refuse rather than guess.
        raise AlignmentError(f"{where}MegaSaM images {images.shape[1:3]} and depths {depths.shape[1:3]} differ", str(path))
    return MegaSaMOutput(images=images.astype(np.uint8, copy=False), depths=depths.astype(np.float32, copy=False),
                         intrinsic=intr.astype(np.float64), cam_c2w=c2w.astype(np.float64), path=str(path))


def _safe_name(clip_id: str) -> str:
    """A file name for a clip id: readable prefix plus a hash so distinct ids never collide."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", clip_id).strip("._")[:80] or "clip"
    return f"{stem}-{hashlib.sha1(clip_id.encode()).hexdigest()[:10]}"


class MegaSaMRunner:
    """Run MegaSaM per clip through ``command_template``; cache results by clip id.

    ``cache_dir`` holds ``<safe id>.npz`` (the result) and ``logs/<safe id>.log`` (stdout and
    stderr of every attempt). ``timeout_s`` bounds one attempt; ``retries`` extra attempts follow
    a failure or a timeout. A cached, readable npz is returned without running anything.
    """

    def __init__(self, command_template: str, cache_dir: str | os.PathLike, timeout_s: float = 3600.0,
                 retries: int = 1):
        if timeout_s <= 0 or retries < 0:
            raise MegaSaMConfigError(f"timeout_s must be > 0 and retries >= 0, got {timeout_s}, {retries}")
        self.command_template = command_template
        self.cache_dir = Path(cache_dir)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        try:
            self._argv_template = shlex.split(command_template)
        except ValueError as e:
            raise MegaSaMConfigError(f"cannot parse MegaSaM command template {command_template!r}: {e}") from e
        if not self._argv_template:
            raise MegaSaMConfigError("MegaSaM command template is empty")
        for arg in self._argv_template:
            for _, name, _, _ in string.Formatter().parse(arg):
                if name is not None and name not in PLACEHOLDERS:
                    raise MegaSaMConfigError(f"unknown placeholder {{{name}}} in MegaSaM template; "
                                             f"allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        if "{out_npz}" not in command_template:
            raise MegaSaMConfigError("MegaSaM template must contain {out_npz} (where the command writes its npz)")
        self.executable = self._resolve_executable()
        self.invocations = 0

    def _resolve_executable(self) -> str:
        exe = self._argv_template[0]
        if any(p in exe for p in ("{frames_dir}", "{out_npz}", "{clip_id}")):
            raise MegaSaMConfigError(f"the executable {exe!r} must not depend on a placeholder")
        found = shutil.which(exe)
        if found is None:
            raise MegaSaMConfigError(f"MegaSaM executable {exe!r} not found or not executable "
                                     f"(command template {self.command_template!r})")
        return found

    def cache_path(self, clip_id: str) -> Path:
        return self.cache_dir / f"{_safe_name(clip_id)}.npz"

    def log_path(self, clip_id: str) -> Path:
        return self.cache_dir / "logs" / f"{_safe_name(clip_id)}.log"

    def argv(self, frames_dir: str, out_npz: str, clip_id: str) -> list[str]:
        """The argument vector: each template token formatted separately (values never re-split)."""
        values = {"frames_dir": str(frames_dir), "out_npz": str(out_npz), "clip_id": clip_id}
        return [self.executable] + [a.format(**values) for a in self._argv_template[1:]]

    def run(self, clip_id: str, frames: np.ndarray) -> MegaSaMOutput:
        """MegaSaM's result for ``frames`` (T,H,W,3) uint8 of clip ``clip_id`` (cached)."""
        if not clip_id or clip_id.startswith("-"):
            raise AlignmentError(f"refusing clip id {clip_id!r} for MegaSaM (empty or starts with '-')")
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise AlignmentError(f"clip {clip_id}: frames must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
        out = self.cache_path(clip_id)
        if out.exists():
            try:
                res = load_megasam_npz(out, expected_frames=frames.shape[0], clip_id=clip_id)
                res.cached = True
                return res
            except AlignmentError:
                out.unlink(missing_ok=True)  # a broken cache entry is recomputed
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path(clip_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        attempts = self.retries + 1
        last = ""
        with tempfile.TemporaryDirectory(prefix="megasam-", dir=self.cache_dir) as tmp:
            frames_dir = Path(tmp) / "frames"
            frames_dir.mkdir()
            for i, f in enumerate(frames):
                Image.fromarray(f).save(frames_dir / f"{i:06d}.png")
            partial = Path(tmp) / "out.npz"
            for attempt in range(1, attempts + 1):
                partial.unlink(missing_ok=True)
                argv = self.argv(str(frames_dir), str(partial), clip_id)
                rc, timed_out = self._run_once(argv, log, attempt, attempts)
                if timed_out:
                    last = f"timed out after {self.timeout_s:g} s (attempt {attempt}/{attempts})"
                    continue
                if rc != 0:
                    last = f"exit code {rc} (attempt {attempt}/{attempts})"
                    continue
                if not partial.exists():
                    last = f"exit code 0 but no output at {{out_npz}} (attempt {attempt}/{attempts})"
                    continue
                try:
                    res = load_megasam_npz(partial, expected_frames=frames.shape[0], clip_id=clip_id)
                except AlignmentError as e:
                    last = f"exit code 0 but bad output: {e.reason} (attempt {attempt}/{attempts})"
                    continue
                os.replace(partial, out)  # atomic: the cache never holds a half-written file
                res.path = str(out)
                return res
        raise AlignmentError(f"MegaSaM failed for clip {clip_id}: {last}; log: {log}", str(log))

    def run_many(self, items: dict[str, np.ndarray]) -> dict[str, "MegaSaMOutput | AlignmentError"]:
        """Run several clips; a clip's failure is its entry (an :class:`AlignmentError`), not a raise."""
        results: dict[str, MegaSaMOutput | AlignmentError] = {}
        for clip_id, frames in items.items():
            try:
                results[clip_id] = self.run(clip_id, frames)
            except AlignmentError as e:
                results[clip_id] = e
        return results

    def _run_once(self, argv: list[str], log: Path, attempt: int, attempts: int) -> tuple[int | None, bool]:
        self.invocations += 1
        with open(log, "ab") as lf:
            lf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempt}/{attempts}: "
                     f"{shlex.join(argv)}\n".encode())
            lf.flush()
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            except (FileNotFoundError, PermissionError) as e:
                raise MegaSaMConfigError(f"cannot start MegaSaM executable {argv[0]!r}: {e}") from e
            try:
                rc = proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                lf.write(f"=== killed after {self.timeout_s:g} s timeout\n".encode())
                return None, True
            lf.write(f"=== exit code {rc}\n".encode())
            return rc, False


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the process group this runner started for one attempt (the command and its children)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()
