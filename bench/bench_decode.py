"""Video decode at scale (issue 15, item 4): CPU cores vs NVDEC, and decoding's share of a clip's CPU time.

One command on the GPU machine (repo root; wheels in .whl/, see bench/RESULTS.md section
"Video decoding" for the exact command):

    python3 bench/bench_decode.py OUT_DIR

It makes its own H.264 test videos with PyAV/libx264 (textured, moving content): 360p and 720p
(640x360, 1280x720, 29.97 fps, 300 frames, keyframe every 60) and a 4K side-by-side VR180 stream
(3840x1920, 120 frames), plus a 60-second 720p "downloaded YouTube video" for the seek test. Then,
each in a fresh process:

- full sequential decode to RGB, frames/s and CPU seconds per frame (process CPU time, all
  threads), for: PyAV on all cores; PyAV on one thread (what one 1-CPU Ray task gets); PyAV with
  FFmpeg's NVDEC hwaccel (frames back in host memory); torchcodec on the CPU; torchcodec with
  NVDEC (frames stay on the GPU);
- d4s's timestamp reader on the 60 s video (a 150-frame RealEstate10K sequence 40 s in): time
  and frames decoded, vs decoding up to there;
- the VR180 rectification alone, CPU vs CUDA, and d4s's Stereo4D raw path per frame;
- CPU seconds per 16-frame clip of the CPU side of a build (the ingest adapter, then the sample
  encoder: JPEG frames, 16-bit depth PNGs, arrays), for a Stereo4D raw 4K clip and a
  RealEstate10K 720p clip, with decoding on the CPU ("before") and on NVDEC ("after"), and
  decoding's share of it. Model stages run on the GPU and are not counted.

torchcodec: the GPU image has no torchcodec, and perhaps no FFmpeg shared libraries. The script installs
each ``.whl/torchcodec-*.whl`` into its own folder and points torchcodec at the FFmpeg 8 that the
PyAV wheel bundles (soname links in a temporary folder on LD_LIBRARY_PATH); it uses the first
version that decodes on CUDA (and one that decodes on the CPU), and reports each version's error.
Writes OUT_DIR/decode.json and OUT_DIR/decode.md. ``--quick`` shrinks everything (CPU check).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RATE = Fraction(30000, 1001)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- test videos ------------------------------------------------------------------------------------


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(6):
            fx, fy, ph = rng.uniform(0.002, 0.05), rng.uniform(0.002, 0.05), rng.uniform(0, 6.3)
            img[..., c] += np.sin(x * fx + y * fy + ph)
    img += ((x // 48 + y // 48) % 2)[..., None] * 1.5
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def make_video(path: Path, h: int, w: int, n: int, gop: int, seed: int = 0) -> dict:
    """Textured frames panning 3 px/frame with a little noise, libx264 veryfast crf 23."""
    import av

    tex = _texture(h, w + 3 * n, seed)
    rng = np.random.default_rng(seed + 1)
    t0 = time.time()
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=RATE)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "23", "preset": "veryfast", "g": str(gop), "keyint_min": str(gop)}
        for i in range(n):
            frame = tex[:, 3 * i : 3 * i + w].copy()
            frame[::7, ::5] = rng.integers(0, 255, frame[::7, ::5].shape, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return {
        "path": str(path),
        "height": h,
        "width": w,
        "frames": n,
        "gop": gop,
        "mbit_s": round(path.stat().st_size * 8 / (n / float(RATE)) / 1e6, 2),
        "encode_s": round(time.time() - t0, 1),
    }


# -- torchcodec setup ------------------------------------------------------------------------------------


def ffmpeg_shim(tmp: Path) -> Path:
    """Soname links to the FFmpeg libraries bundled in the PyAV wheel (libavutil.so.60 -> ...)."""
    import av

    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    shim = tmp / "ffmpeg-shim"
    shim.mkdir(exist_ok=True)
    for f in libs.glob("lib*.so*"):
        m = re.match(r"(lib(?:av\w+|sw\w+))-[0-9a-f]{8}\.so\.(\d+)", f.name)
        if m:
            link = shim / f"{m.group(1)}.so.{m.group(2)}"
            if not link.exists():
                link.symlink_to(f)
    return shim


def cuda_lib_dirs() -> list[str]:
    try:
        import torch

        base = Path(torch.__file__).resolve().parent.parent / "nvidia"
        return sorted(str(p) for p in base.glob("**/lib") if p.is_dir())
    except Exception:
        return []


def torchcodec_candidates(tmp: Path) -> list[dict]:
    """Each .whl/torchcodec-*.whl installed in its own folder (newest first), after any folders
    named in D4S_BENCH_TORCHCODEC (colon-separated, for a check run elsewhere)."""
    out = [
        {"version": f"dir:{p}", "path": p, "install_error": ""}
        for p in os.environ.get("D4S_BENCH_TORCHCODEC", "").split(":")
        if p
    ]
    wheels = sorted(
        glob.glob(str(REPO / ".whl" / "torchcodec-*.whl")),
        key=lambda p: [int(x) for x in re.findall(r"torchcodec-(\d+)\.(\d+)\.(\d+)", p)[0]],
        reverse=True,
    )
    for whl in wheels:
        ver = re.findall(r"torchcodec-([\d.]+)-", whl)[0]
        target = tmp / f"tc-{ver}"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--target",
                str(target),
                whl,
            ],
            capture_output=True,
            text=True,
        )
        out.append({"version": ver, "path": str(target), "install_error": r.stderr[-500:] if r.returncode else ""})
    return out


def child_env(tc_path: str | None, shim: Path | None) -> dict:
    env = dict(os.environ)
    paths = [str(REPO)] + ([tc_path] if tc_path else []) + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(paths)
    if shim is not None:
        env["LD_LIBRARY_PATH"] = ":".join(
            [str(shim)] + cuda_lib_dirs() + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        )
    return env


def run_child(task: dict, env: dict, timeout: int = 300) -> dict:
    try:
        r = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(task)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (r.stderr or r.stdout)[-1500:]}


# -- child tasks ---------------------------------------------------------------------------------------


def probe_torchcodec(video: str) -> dict:
    import torch
    import torchcodec
    from torchcodec.decoders import VideoDecoder

    out = {"version": torchcodec.__version__, "torch": torch.__version__}
    try:
        VideoDecoder(video, device="cpu")[0]
        out["cpu"] = True
    except Exception as exc:
        out["cpu"] = False
        out["cpu_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if torch.cuda.is_available():
        try:
            f = VideoDecoder(video, device="cuda")[0]
            out["cuda"] = f.device.type == "cuda"
        except Exception as exc:
            out["cuda"] = False
            out["cuda_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def decode_all(video: str, how: str) -> dict:
    """Sequential decode of every frame to RGB; frames/s and CPU s/frame after a warm-up open."""
    n = 0
    if how.startswith("pyav"):
        import av

        kw = {}
        if how == "pyav-nvdec":
            from av.codec.hwaccel import HWAccel

            kw["hwaccel"] = HWAccel(device_type="cuda", allow_software_fallback=False)
        c0, t0 = cpu_s(), time.perf_counter()
        with av.open(video, **kw) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            if how == "pyav-1thread":
                s.thread_type = "NONE"
                s.codec_context.thread_count = 1
            for frame in c.decode(s):
                frame.to_ndarray(format="rgb24")
                n += 1
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    else:
        import torch
        from torchcodec.decoders import VideoDecoder

        device = "cuda" if how == "torchcodec-cuda" else "cpu"
        VideoDecoder(video, device=device)[0]  # warm-up: CUDA context, NVDEC session
        if device == "cuda":
            torch.cuda.synchronize()
        c0, t0 = cpu_s(), time.perf_counter()
        dec = VideoDecoder(video, device=device, num_ffmpeg_threads=0, seek_mode="approximate")
        total = len(dec)
        for s in range(0, total, 32):
            batch = dec.get_frames_in_range(s, min(s + 32, total))
            n += int(batch.data.shape[0])
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    return {
        "frames": n,
        "wall_s": round(wall, 3),
        "fps": round(n / wall, 1),
        "cpu_ms_per_frame": round(1e3 * cpu / n, 2),
    }


def seek_test(video: str, first: int, count: int, how: str) -> dict:
    from stages.ingest.video_decoders import open_decoder
    from stages.ingest.video_times import frames_at_times

    period = 1e6 / float(RATE)
    times = [round((first + i) * period) for i in range(count)]
    backend, device = {
        "pyav": ("pyav", "cpu"),
        "torchcodec-cpu": ("torchcodec", "cpu"),
        "torchcodec-cuda": ("torchcodec", "cuda"),
    }[how]
    with open_decoder(video, video, backend=backend, device=device) as dec:  # warm-up: imports, CUDA context
        frames_at_times(dec, times[:1], as_tensor=(device == "cuda"))
    c0, t0 = cpu_s(), time.perf_counter()
    with open_decoder(video, video, backend=backend, device=device) as dec:
        got = frames_at_times(dec, times, as_tensor=(device == "cuda"))
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    err = float(np.abs(np.asarray(got.frame_times_us) - np.asarray(times)).max())
    return {
        "wanted": count,
        "decoded": got.decoded,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "max_time_error_us": round(err, 2),
    }


def rectify_test(video: str, device: str, frames: int) -> dict:
    import torch

    from stages.ingest.video import read_video
    from stages.ingest.vr180 import Rectifier, RectifySpec

    sbs = read_video(video, video, frames=list(range(frames)), decoder="pyav", device="cpu")
    h = sbs.shape[1]
    r = np.deg2rad([2.0, -1.0, 0.5])
    rot = np.array([[np.cos(r[0]), 0, np.sin(r[0])], [0, 1, 0], [-np.sin(r[0]), 0, np.cos(r[0])]])
    spec = RectifySpec((h, h), tuple(rot.reshape(-1)), (-90.0, 90.0, -90.0, 90.0), 512, 60.0)
    t0 = time.perf_counter()
    rect = Rectifier(spec, device)
    maps_s = time.perf_counter() - t0
    src = torch.as_tensor(sbs).to(device)
    rect(src[:1])
    if device == "cuda":
        torch.cuda.synchronize()
    c0, t0 = cpu_s(), time.perf_counter()
    for i in range(frames):
        rect(src[i : i + 1])
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    return {
        "frames": frames,
        "maps_s": round(maps_s, 3),
        "fps": round(frames / wall, 1),
        "cpu_ms_per_frame": round(1e3 * cpu / frames, 2),
    }


def clip_cpu(clip_kind: str, root: str, decoder: str, device: str) -> dict:
    """CPU seconds of one 16-frame clip through the CPU side of a build, split by phase."""
    import torch  # noqa: F401 - imported before timing, as in a worker

    from pipeline.clip import ClipMeta
    from pipeline.sample_format import encode_clip
    from stages.ingest import get_adapter

    kind = clip_kind
    name = "stereo4d" if kind == "stereo4d" else "realestate10k"
    opts = {"decoder": decoder, "device": device}
    if kind == "stereo4d":
        opts.update(source="raw", min_vr180_height=0)
    adapter = get_adapter(name, root, opts)
    (scene,) = adapter.discover()
    frames = list(range(16))
    adapter.load_clip(scene, frames[:2], ClipMeta(name, scene.scene, "bench", frames[:2], kind == "stereo4d", True))
    # (that was a warm-up: imports, sampling maps, CUDA context)
    # decode only (the adapter's decoder on the same timestamps)
    from stages.ingest.video_decoders import open_decoder
    from stages.ingest.video_times import frames_at_times

    video = next(Path(root).rglob("*.mp4"))
    times = (
        adapter.read_annotations(scene)["timestamps"][frames]
        if kind == "stereo4d"
        else adapter.read_cameras(scene).timestamps[frames]
    )
    c0 = cpu_s()
    with open_decoder(str(video), str(video), backend=decoder, device=device) as dec:
        frames_at_times(dec, times, as_tensor=(device == "cuda" and decoder == "torchcodec"))
        decoded_on = f"{dec.info.backend}/{dec.info.device}"  # PyAV falls back to the CPU without NVDEC
    decode = cpu_s() - c0
    c0, t0 = cpu_s(), time.perf_counter()
    clip = adapter.load_clip(scene, frames, ClipMeta(name, scene.scene, "bench", frames, kind == "stereo4d", True))
    ingest, ingest_wall = cpu_s() - c0, time.perf_counter() - t0
    t, h, w = clip.rgb.shape[:3]
    clip.depth = np.random.default_rng(0).uniform(0.5, 20.0, (t, h, w)).astype(np.float32)  # as a later stage adds
    clip.depth_valid = np.ones((t, h, w), bool)
    c0 = cpu_s()
    sample = encode_clip(clip, 95)
    encode = cpu_s() - c0
    return {
        "clip": kind,
        "decoder": decoder,
        "device": device,
        "decoded_on": decoded_on,
        "frame_hw": [h, w],
        "ingest_cpu_s": round(ingest, 3),
        "ingest_wall_s": round(ingest_wall, 3),
        "decode_cpu_s": round(decode, 3),
        "encode_cpu_s": round(encode, 3),
        "sample_bytes": sum(len(v) for v in sample.values() if isinstance(v, bytes)),
        "decode_share": round(decode / (ingest + encode), 3),
    }


def child(task: dict) -> dict:
    import av  # noqa: F401 - first: loads the FFmpeg libraries that the shim's soname links point at

    kind = task.pop("kind")
    return {
        "probe": probe_torchcodec,
        "decode": decode_all,
        "seek": seek_test,
        "rectify": rectify_test,
        "clip": clip_cpu,
    }[kind](**task)


# -- fixtures for the clip test --------------------------------------------------------------------------


def clip_fixtures(tmp: Path, quick: bool) -> dict:
    """A Stereo4D raw clip (npz + 4K VR180 video) and a RealEstate10K clip (camera file + 720p
    video 45 s long). The annotations come from small renders; the videos are the textured test
    content at full size with the same frame count and rate (ray-casting 4K eyes would take minutes)."""
    from pipeline.demo.render import random_scene, render
    from pipeline.demo.writers import realestate10k as re10k
    from pipeline.demo.writers import stereo4d as s4d

    n = 16
    spec = random_scene("bench_s4d", seed=1, dynamic=True, num_frames=n, height=32, width=32)
    spec.fov_x_deg = 60.0
    s4d_root = tmp / "s4d"
    ws = s4d.write_raw(render(spec), s4d_root, eye_size=32)
    (video,) = (s4d_root / "raw").glob("*.mp4")
    eye = 480 if quick else 1920
    make_video(video, eye, 2 * eye, s4d.RAW_FIRST_FRAME + n + 8, 30, seed=3)
    spec = random_scene("bench_re10k", seed=2, dynamic=False, num_frames=n, height=36, width=64)
    spec.fov_x_deg = 90.0
    re_root = tmp / "re10k"
    re10k.write(render(spec), re_root, re10k.default_scene_id(0), with_frames=False, with_youtube_video=True)
    (video,) = (re_root / "videos").glob("*.mp4")
    make_video(
        video,
        360 if quick else 720,
        640 if quick else 1280,
        re10k.FIRST_FRAME + n + re10k.TAIL_FRAMES,
        re10k.GOP,
        seed=4,
    )
    return {"stereo4d": str(s4d_root), "realestate10k": str(re_root), "stereo4d_scene": ws.scene_id}


# -- driver ------------------------------------------------------------------------------------------------


def main(out_dir: str, quick: bool) -> None:
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="d4s-decode-"))
    t_start = time.time()
    res: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "av": __import__("av").__version__,
            "quick": quick,
        }
    }
    n = 60 if quick else 300
    videos = {
        "360p": make_video(tmp / "360p.mp4", 360, 640, n, 60),
        "720p": make_video(tmp / "720p.mp4", 720, 1280, n, 60),
        "vr180_4k": make_video(
            tmp / "vr180.mp4", 480 if quick else 1920, 960 if quick else 3840, 20 if quick else 120, 30
        ),
        "720p_60s": make_video(tmp / "720p_60s.mp4", 720, 1280, 300 if quick else 1800, 60),
    }
    res["videos"] = {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in videos.items()}
    print("videos made", round(time.time() - t_start), "s", flush=True)

    shim = ffmpeg_shim(tmp)
    tc_cpu = tc_cuda = None
    res["torchcodec"] = []
    try:
        import torchcodec  # noqa: F401 - already installed here: try it first

        cands = [{"version": "installed", "path": None, "install_error": ""}]
    except Exception:
        cands = []
    for cand in cands + torchcodec_candidates(tmp):
        probe = (
            run_child({"kind": "probe", "video": videos["360p"]["path"]}, child_env(cand["path"], shim), 120)
            if not cand["install_error"]
            else {"error": cand["install_error"]}
        )
        res["torchcodec"].append({"candidate": cand["version"], **probe})
        if probe.get("cpu") and tc_cpu is None:
            tc_cpu = cand
        if probe.get("cuda") and tc_cuda is None:
            tc_cuda = cand
    print("torchcodec:", res["torchcodec"], flush=True)

    configs = [("pyav-cpu", None), ("pyav-1thread", None)]
    if torch.cuda.is_available():
        configs.append(("pyav-nvdec", None))
    if tc_cpu:
        configs.append(("torchcodec-cpu", tc_cpu))
    if tc_cuda:
        configs.append(("torchcodec-cuda", tc_cuda))
    res["decode"] = {}
    for how, cand in configs:
        env = child_env(cand["path"] if cand else None, shim)
        for key in ("360p", "720p", "vr180_4k"):
            r = run_child(
                {"kind": "decode", "video": videos[key]["path"], "how": how if how != "pyav-cpu" else "pyav"}, env
            )
            res["decode"].setdefault(key, {})[how] = r
            print(how, key, r, flush=True)

    first, count = (150, 60) if quick else (1200, 150)
    res["seek"] = {"first_frame": first, "count": count, "video_frames": videos["720p_60s"]["frames"]}
    res["seek"]["decode_everything_up_to_the_end"] = run_child(
        {"kind": "decode", "video": videos["720p_60s"]["path"], "how": "pyav"}, child_env(None, shim)
    )
    seek_cfgs = (
        [("pyav", None)]
        + ([("torchcodec-cpu", tc_cpu)] if tc_cpu else [])
        + ([("torchcodec-cuda", tc_cuda)] if tc_cuda else [])
    )
    for how, cand in seek_cfgs:
        res["seek"][how] = run_child(
            {"kind": "seek", "video": videos["720p_60s"]["path"], "first": first, "count": count, "how": how},
            child_env(cand["path"] if cand else None, shim),
        )
    print("seek", res["seek"], flush=True)

    res["rectify"] = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        res["rectify"][device] = run_child(
            {"kind": "rectify", "video": videos["vr180_4k"]["path"], "device": device, "frames": 8 if quick else 32},
            child_env(None, shim),
        )
    print("rectify", res["rectify"], flush=True)

    roots = clip_fixtures(tmp, quick)
    res["clip_cpu"] = []
    after = (
        ("torchcodec", "cuda", tc_cuda) if tc_cuda else (("pyav", "cuda", None) if torch.cuda.is_available() else None)
    )
    for kind in ("stereo4d", "realestate10k"):
        for label, setting in (("before", ("pyav", "cpu", None)), ("after", after)):
            if setting is None:
                continue
            decoder, device, cand = setting
            r = run_child(
                {"kind": "clip", "clip_kind": kind, "root": roots[kind], "decoder": decoder, "device": device},
                child_env(cand["path"] if cand else None, shim),
            )
            res["clip_cpu"].append({"when": label, **r})
            print("clip", label, r, flush=True)
    res["total_s"] = round(time.time() - t_start, 1)
    (out / "decode.json").write_text(json.dumps(res, indent=1))
    (out / "decode.md").write_text(markdown(res))
    print(markdown(res))
    shutil.rmtree(tmp, ignore_errors=True)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"Machine: {m['cpu_count']} CPUs, GPU {m['gpu']}, torch {m['torch']}, PyAV {m['av']}"
        + (" (QUICK run)" if m["quick"] else ""),
        "",
    ]
    lines += [
        "torchcodec candidates: "
        + "; ".join(
            f"{t['candidate']}: cpu {t.get('cpu')}, cuda {t.get('cuda')}"
            + (
                f" ({t.get('cuda_error') or t.get('cpu_error') or t.get('error', '')[:160]})"
                if not (t.get("cpu") and t.get("cuda"))
                else ""
            )
            for t in res["torchcodec"]
        ),
        "",
    ]
    lines += ["| video | Mbit/s | decoder | frames/s | CPU ms/frame |", "|---|---|---|---|---|"]
    for key, cfgs in res["decode"].items():
        for how, r in cfgs.items():
            lines.append(
                f"| {key} | {res['videos'][key]['mbit_s']} | {how} | {r.get('fps', r.get('error', '')[:80])} "
                f"| {r.get('cpu_ms_per_frame', '')} |"
            )
    s = res["seek"]
    lines += [
        "",
        f"Seek: {s['count']} frames from frame {s['first_frame']} of a {s['video_frames']}-frame 720p video",
        "",
        "| reader | frames decoded | wall s | CPU s | max time error us |",
        "|---|---|---|---|---|",
    ]
    full = s["decode_everything_up_to_the_end"]
    lines.append(f"| decode the whole file (PyAV) | {full.get('frames')} | {full.get('wall_s')} | | |")
    for how in ("pyav", "torchcodec-cpu", "torchcodec-cuda"):
        if how in s:
            r = s[how]
            lines.append(
                f"| d4s frames_at_times, {how} | {r.get('decoded', r.get('error', '')[:80])} | {r.get('wall_s')} "
                f"| {r.get('cpu_s')} | {r.get('max_time_error_us')} |"
            )
    lines += ["", "| VR180 rectification (to 512x512) | frames/s | CPU ms/frame | maps s |", "|---|---|---|---|"]
    for dev, r in res["rectify"].items():
        lines.append(
            f"| {dev} | {r.get('fps', r.get('error', '')[:80])} | {r.get('cpu_ms_per_frame')} | {r.get('maps_s')} |"
        )
    lines += [
        "",
        "| 16-frame clip | decode | ingest CPU s | of which decode | encode CPU s | decode share |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["clip_cpu"]:
        lines.append(
            f"| {r.get('clip')} {r.get('frame_hw')} ({r['when']}) | {r.get('decoded_on')} "
            f"| {r.get('ingest_cpu_s', r.get('error', '')[:80])} | {r.get('decode_cpu_s')} | "
            f"{r.get('encode_cpu_s')} | {r.get('decode_share')} |"
        )
    lines += ["", f"Total {res['total_s']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("out_dir")
        ap.add_argument("--quick", action="store_true")
        a = ap.parse_args()
        main(a.out_dir, a.quick)
