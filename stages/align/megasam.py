"""Running MegaSaM (an external program with its own environment), reading its output, caching it.

d4s does not import MegaSaM: it runs it as a command per scene (or per segment of a long scene,
or per clip with ``stages.scene.granularity: clip``) and reads the ``.npz`` it writes
(``images`` (T,H,W,3) uint8, ``depths`` (T,H,W) float32, ``intrinsic`` (3,3) pixels, ``cam_c2w``
(T,4,4) OpenCV camera-to-world; see ``FORMATS.md``, "MegaSaM outputs").

:class:`MegaSaMRunner` takes a command template with the placeholders ``{frames_dir}``,
``{out_npz}`` and ``{clip_id}`` (the run id: ``dataset__scene__first-frame``). Safety: the
*template* is split with :func:`shlex.split` once, then each argument is formatted on its own,
so a value (an id with spaces, quotes or ``;``) always stays inside one argv element; no shell
is involved. A run id starting with ``-`` is refused (it could be read as an option). The
command must write the npz to ``{out_npz}`` (a wrapper script can rename MegaSaM's
``<name>_sgd_cvd_hr.npz``). Frames are written as ``<source frame index>.png`` (zero-padded, so
name order is frame order).

:class:`MegaSaMCache` keeps results in the output store (a local path or ``s3://``...), keyed
by content (the frames' pixels, the command template, ``megasam_version``, the cache format), so
a resume, another node or a second build reuses them; :func:`run_cached` is lookup, run, store.
A cached result is compact and bounded: depth as the shard format's 16-bit log code
(``pipeline/sample_format.py``, relative error <= 9.3e-5) at most ``max_side`` pixels on its long
side, plus poses and K: at most ``2 * h * w + 136`` bytes per frame before compression. What a
run returns is always the cached form, so a fresh run and a cache hit give the same bytes.

Errors: a missing executable or a bad template is a configuration error
(:class:`MegaSaMConfigError`, *not* a :class:`ClipError`: the run should stop, not skip every
clip). A failing command, a timeout or an unreadable output is an :class:`AlignmentError`
naming the run, the exit code and the log file.
"""

from __future__ import annotations

import hashlib
import io
import logging
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
from pipeline.private_tmp import private_temp_dir
from stages.align.fit import AlignmentError

log = logging.getLogger("d4s")

PLACEHOLDERS = ("frames_dir", "out_npz", "clip_id")


class MegaSaMConfigError(RuntimeError):
    """MegaSaM is not usable as configured (missing executable, bad template). Stops the run."""


@dataclass
class MegaSaMOutput:
    """A validated MegaSaM result. ``intrinsics`` is (T,4) fx fy cx cy for the depth's size."""

    images: np.ndarray | None  # (T,H,W,3) uint8; None for a cached result (d4s has the frames)
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
        raise AlignmentError(
            f"{where}MegaSaM images {images.shape[1:3]} and depths {depths.shape[1:3]} differ", str(path)
        )
    return MegaSaMOutput(
        images=images.astype(np.uint8, copy=False),
        depths=depths.astype(np.float32, copy=False),
        intrinsic=intr.astype(np.float64),
        cam_c2w=c2w.astype(np.float64),
        path=str(path),
    )


def _safe_name(clip_id: str) -> str:
    """A file name for a clip id: readable prefix plus a hash so distinct ids never collide."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", clip_id).strip("._")[:80] or "clip"
    return f"{stem}-{hashlib.sha1(clip_id.encode()).hexdigest()[:10]}"


class MegaSaMRunner:
    """Run MegaSaM through ``command_template`` on a sequence of frames (no caching here).

    ``work_dir`` holds the temporary frame folders (and default logs); ``timeout_s`` bounds one
    attempt; ``retries`` extra attempts follow a failure or a timeout.
    """

    def __init__(
        self,
        command_template: str,
        work_dir: str | os.PathLike | None = None,
        timeout_s: float = 3600.0,
        retries: int = 1,
    ):
        if timeout_s <= 0 or retries < 0:
            raise MegaSaMConfigError(f"timeout_s must be > 0 and retries >= 0, got {timeout_s}, {retries}")
        self.command_template = command_template
        # default: this user's own 0700 folder (a fixed shared name could be planted by another user)
        self.work_dir = Path(work_dir) if work_dir is not None else private_temp_dir("d4s-megasam")
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
                    raise MegaSaMConfigError(
                        f"unknown placeholder {{{name}}} in MegaSaM template; "
                        f"allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
                    )
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
            raise MegaSaMConfigError(
                f"MegaSaM executable {exe!r} not found or not executable (command template {self.command_template!r})"
            )
        return found

    def log_path(self, run_id: str) -> Path:
        return self.work_dir / "logs" / f"{_safe_name(run_id)}.log"

    def argv(self, frames_dir: str, out_npz: str, run_id: str) -> list[str]:
        """The argument vector: each template token formatted separately (values never re-split)."""
        values = {"frames_dir": str(frames_dir), "out_npz": str(out_npz), "clip_id": run_id}
        return [self.executable] + [a.format(**values) for a in self._argv_template[1:]]

    def run(
        self,
        run_id: str,
        frames: np.ndarray,
        *,
        frame_ids=None,
        env: dict | None = None,
        log: str | os.PathLike | None = None,
    ) -> MegaSaMOutput:
        """MegaSaM's result for ``frames`` (T,H,W,3) uint8 (``frame_ids``: their source indices,
        the frame files' names). ``env``: the command's environment (default: this process's)."""
        if not run_id or run_id.startswith("-"):
            raise AlignmentError(f"refusing run id {run_id!r} for MegaSaM (empty or starts with '-')")
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise AlignmentError(f"run {run_id}: frames must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
        ids = list(range(len(frames))) if frame_ids is None else [int(i) for i in frame_ids]
        if len(ids) != len(frames) or len(set(ids)) != len(ids) or ids != sorted(ids):
            raise AlignmentError(f"run {run_id}: frame ids must be {len(frames)} increasing indices")
        log = Path(log) if log is not None else self.log_path(run_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        attempts = self.retries + 1
        last = ""
        with tempfile.TemporaryDirectory(prefix="megasam-", dir=self.work_dir) as tmp:
            frames_dir = Path(tmp) / "frames"
            frames_dir.mkdir()
            for i, f in zip(ids, frames):
                png = frames_dir / f"{i:06d}.png"
                try:
                    Image.fromarray(f).save(png)
                except OSError as exc:  # a full scratch disk: name it (the node's fault, transient)
                    raise OSError(exc.errno, exc.strerror or str(exc), str(png)) from exc
            partial = Path(tmp) / "out.npz"
            for attempt in range(1, attempts + 1):
                partial.unlink(missing_ok=True)
                argv = self.argv(str(frames_dir), str(partial), run_id)
                rc, timed_out = self._run_once(argv, log, attempt, attempts, env)
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
                    return load_megasam_npz(partial, expected_frames=frames.shape[0], clip_id=run_id)
                except AlignmentError as e:
                    last = f"exit code 0 but bad output: {e.reason} (attempt {attempt}/{attempts})"
                    continue
        raise AlignmentError(f"MegaSaM failed (run {run_id}): {last}; log: {log}", str(log))

    def _run_once(
        self, argv: list[str], log: Path, attempt: int, attempts: int, env: dict | None
    ) -> tuple[int | None, bool]:
        self.invocations += 1
        with open(log, "ab") as lf:
            lf.write(
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempt}/{attempts}: "
                f"{shlex.join(argv)}\n".encode()
            )
            if env is not None and "CUDA_VISIBLE_DEVICES" in env:
                lf.write(f"=== CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}\n".encode())
            lf.flush()
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True, env=env
                )
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
    try:
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:  # stuck in the kernel (a GPU driver call): not ours to wait for
        log.error("MegaSaM process %d did not end %g s after SIGKILL; left to the OS", proc.pid, KILL_WAIT_S)


KILL_WAIT_S = 30.0


# ------------------------------------------------------------------------------------------
# The cache in the output store

CACHE_FORMAT = 1
CACHE_BYTES_PER_PIXEL = 2  # 16-bit log depth code
CACHE_BYTES_PER_FRAME = 136  # c2w (128) + frame index (8); K (72) once per entry


def cache_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The depth grid a cached result keeps for MegaSaM output of ``height x width``."""
    long = max(height, width)
    if not max_side or long <= max_side:
        return height, width
    f = max_side / long
    return max(1, round(height * f)), max(1, round(width * f))


def cache_entry_bytes(num_frames: int, height: int, width: int, max_side: int) -> int:
    """Upper bound of one cached result's bytes (before zlib): what ``d4s plan`` counts."""
    h, w = cache_size(height, width, max_side)
    return num_frames * (CACHE_BYTES_PER_PIXEL * h * w + CACHE_BYTES_PER_FRAME) + 72 + 1024  # K, npz headers


def compact(out: MegaSaMOutput, max_side: int) -> MegaSaMOutput:
    """The cached form of a result: depth at most ``max_side`` on its long side (nearest, K
    scaled), quantised to the 16-bit log code and decoded again; no images."""
    from pipeline.sample_format import decode_depth, encode_depth

    h, w = cache_size(*out.depths.shape[1:], max_side)
    depth, k = out.resized(h, w)
    depth = np.asarray(depth, np.float32)
    code = encode_depth(depth, np.isfinite(depth) & (depth > 0))
    dec, ok = decode_depth(code)
    return MegaSaMOutput(
        images=None,
        depths=np.where(ok, dec, 0.0).astype(np.float32),
        intrinsic=geo.intrinsics_matrix(k[0]),
        cam_c2w=np.asarray(out.cam_c2w, np.float64),
        path=out.path,
        cached=out.cached,
    )


class MegaSaMCache:
    """MegaSaM results under ``url`` (``<key[:2]>/<key>.npz``, logs under ``logs/``), any store."""

    def __init__(self, url: str, max_side: int = 256):
        from pipeline.storage import Store

        self.store = Store(url)
        self.max_side = int(max_side)

    def key(self, frames: np.ndarray, command: str, version: str) -> str:
        """Content key: the frames' pixels and shape, the command template, the version, the format."""
        h = hashlib.sha256()
        h.update(f"d4s-megasam-cache/{CACHE_FORMAT}\0{command}\0{version}\0{self.max_side}\0{frames.shape}\0".encode())
        h.update(np.ascontiguousarray(frames).data)
        return h.hexdigest()

    @staticmethod
    def rel(key: str) -> str:
        return f"{key[:2]}/{key}.npz"

    @staticmethod
    def log_rel(run_id: str, key: str) -> str:
        return f"logs/{_safe_name(run_id)}-{key[:12]}.log"

    def get(self, key: str, expected_frames: int) -> MegaSaMOutput | None:
        """The cached result, or None (absent, or damaged: read whole but not a valid entry, then
        it is removed and recomputed). A store error reading it propagates: the entry may well
        be good, and the scene pass counts such errors transient (its shard is retried)."""
        from pipeline.sample_format import decode_depth

        rel = self.rel(key)
        try:
            data = self.store.read_bytes(rel)
        except FileNotFoundError:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                code, k, c2w = z["depth_code"], z["intrinsic"], z["cam_c2w"]
            if code.ndim != 3 or code.shape[0] != expected_frames or c2w.shape != (expected_frames, 4, 4):
                raise ValueError(f"holds {code.shape[0]} frames, expected {expected_frames}")
            dec, ok = decode_depth(code)
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
            self._remove_if_still(rel, data)
            return None
        return MegaSaMOutput(
            images=None,
            depths=np.where(ok, dec, 0.0).astype(np.float32),
            intrinsic=k,
            cam_c2w=c2w,
            path=self.store.display(rel),
            cached=True,
        )

    def _remove_if_still(self, rel: str, damaged: bytes) -> None:
        """Remove a damaged entry unless another worker has rewritten it since it was read."""
        try:
            if self.store.read_bytes(rel) == damaged:
                self.store.remove(rel)
        except FileNotFoundError:
            pass

    def put(self, key: str, out: MegaSaMOutput) -> int:
        """Store a compact result (atomically); returns its bytes."""
        from pipeline.sample_format import encode_depth

        buf = io.BytesIO()
        d = out.depths
        np.savez_compressed(
            buf, depth_code=encode_depth(d, np.isfinite(d) & (d > 0)), intrinsic=out.intrinsic, cam_c2w=out.cam_c2w
        )
        data = buf.getvalue()
        self.store.write_bytes_atomic(self.rel(key), data)
        return len(data)


@dataclass
class CachedRun:
    output: MegaSaMOutput
    cached: bool
    key: str
    bytes: int = 0


def run_cached(
    runner: MegaSaMRunner,
    cache: MegaSaMCache,
    run_id: str,
    frames: np.ndarray,
    *,
    frame_ids=None,
    version: str = "",
    env: dict | None = None,
) -> CachedRun:
    """The cached result for ``frames``, else run MegaSaM, store the compact result and return it.

    The run's log goes to the cache store (``logs/``) whether it succeeded or not, so the reason
    of a failure names a log that any node can read.
    """
    key = cache.key(frames, runner.command_template, version)
    hit = cache.get(key, len(frames))
    if hit is not None:
        return CachedRun(hit, True, key)
    log_rel = cache.log_rel(run_id, key)
    local_log = runner.log_path(f"{run_id}-{key[:12]}")
    local_log.unlink(missing_ok=True)
    try:
        out = runner.run(run_id, frames, frame_ids=frame_ids, env=env, log=local_log)
    except AlignmentError as e:
        where = _publish_log(cache, local_log, log_rel)
        raise AlignmentError(e.reason.split("; log: ")[0] + f"; log: {where}", where) from None
    _publish_log(cache, local_log, log_rel)
    small = compact(out, cache.max_side)  # what a later cache hit returns: the same bytes downstream
    try:
        n = cache.put(key, small)
    except OSError as exc:  # the cache is optional: a full or read-only store must not waste the run
        log.warning(
            "MegaSaM result of %s could not be cached at %s (%s); used uncached, the next run stores it",
            run_id,
            cache.store.display(cache.rel(key)),
            exc.strerror or exc,
        )
        n = 0
    small.path = cache.store.display(cache.rel(key))
    return CachedRun(small, False, key, n)


def _publish_log(cache: MegaSaMCache, local: Path, rel: str) -> str:
    try:
        cache.store.write_bytes_atomic(rel, local.read_bytes() if local.exists() else b"")
        local.unlink(missing_ok=True)
        return cache.store.display(rel)
    except OSError:
        return str(local)
