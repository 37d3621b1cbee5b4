"""The MegaSaM wrapper (stages/align/megasam_run.py) against a fake MegaSaM checkout.

The fake tree has tiny python scripts at the real scripts' paths (Depth-Anything/run_videos.py,
UniDepth/scripts/demo_mega-sam.py, camera_tracking_scripts/test_demo.py, cvd_opt/preprocess_flow.py,
cvd_opt/cvd_opt.py). Each checks the arguments, working directory and environment the real one
needs, logs its call, and writes what the real one writes where it writes it; cvd_opt.py's result
is a depth on MegaSaM's cropped working grid whose values encode the original pixel position, so
the wrapper's conversion back to the frames' grid can be checked exactly.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.align.megasam import MegaSaMCache, MegaSaMRunner, load_megasam_npz, run_cached
from stages.align.megasam_run import command_template, main, working_size
from stages.align.references import reference_from_megasam

H0, W0, T, F0 = 90, 160, 3, 100.0  # frames and the true focal length (pixels)

COMMON = textwrap.dedent("""
    import argparse, glob, json, os, sys
    import numpy as np
    def log(name, args):
        with open(os.environ["FAKE_MEGASAM_LOG"], "a") as f:
            f.write(json.dumps({"script": name, "argv": sys.argv[1:], "args": vars(args), "cwd": os.getcwd(),
                                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                "pythonpath": os.environ.get("PYTHONPATH", "")}) + "\\n")
        if os.environ.get("FAKE_MEGASAM_FAIL") == name:
            sys.exit(7)
    def frames(path):
        fs = sorted(glob.glob(os.path.join(path, "*.jpg"))) + sorted(glob.glob(os.path.join(path, "*.png")))
        assert len(fs) >= 2, path
        return fs
    def grid(path):
        from PIL import Image
        w0, h0 = Image.open(frames(path)[0]).size
        f = np.sqrt(384 * 512 / (h0 * w0))
        h1, w1 = int(h0 * f), int(w0 * f)
        return h0, w0, h1, w1, h1 - h1 % 8, w1 - w1 % 8
""")

SCRIPTS = {
    "Depth-Anything/run_videos.py": """
        p = argparse.ArgumentParser(); p.add_argument("--img-path"); p.add_argument("--outdir")
        p.add_argument("--encoder"); p.add_argument("--load-from", required=True); p.add_argument("--localhub", action="store_true")
        a = p.parse_args(); log("depth_anything", a)
        assert a.encoder == "vitl" and os.path.isfile(a.load_from)
        os.makedirs(a.outdir, exist_ok=True)
        for f in frames(a.img_path):
            np.save(os.path.join(a.outdir, os.path.basename(f)[:-4] + ".npy"), np.ones((4, 4), np.float32))
    """,
    "UniDepth/scripts/demo_mega-sam.py": """
        p = argparse.ArgumentParser(); p.add_argument("--img-path"); p.add_argument("--outdir"); p.add_argument("--scene-name")
        a = p.parse_args(); log("unidepth", a)
        assert any(q.endswith("UniDepth") and os.path.isdir(q) for q in os.environ["PYTHONPATH"].split(os.pathsep))
        os.makedirs(os.path.join(a.outdir, a.scene_name), exist_ok=True)
        for f in frames(a.img_path):
            np.savez(os.path.join(a.outdir, a.scene_name, os.path.basename(f)[:-4] + ".npz"), depth=np.ones((4, 4)), fov=60.0)
    """,
    "camera_tracking_scripts/test_demo.py": """
        sys.path.append("base/droid_slam")
        assert os.path.isdir("base/droid_slam"), "run from the MegaSaM root"
        p = argparse.ArgumentParser(); p.add_argument("--datapath"); p.add_argument("--weights")
        p.add_argument("--scene_name"); p.add_argument("--mono_depth_path"); p.add_argument("--metric_depth_path")
        p.add_argument("--disable_vis", action="store_true")
        a = p.parse_args(); log("camera_tracking", a)
        assert os.path.isfile(a.weights) and a.disable_vis
        n = len(frames(a.datapath))
        assert len(glob.glob(os.path.join(a.mono_depth_path, a.scene_name, "*.npy"))) == n
        assert len(glob.glob(os.path.join(a.metric_depth_path, a.scene_name, "*.npz"))) == n
        h0, w0, h1, w1, hc, wc = grid(a.datapath)
        k = np.array([%(F0)r * w1 / w0, %(F0)r * h1 / h0, w0 / 2 * w1 / w0, h0 / 2 * h1 / h0])
        d = os.path.join("reconstructions", a.scene_name); os.makedirs(d, exist_ok=True)
        np.save(os.path.join(d, "images.npy"), np.zeros((n, 3, hc, wc), np.uint8))
        np.save(os.path.join(d, "intrinsics.npy"), np.tile(k, (n, 1)))
        for name in ("disps", "poses", "motion_prob"):
            np.save(os.path.join(d, name + ".npy"), np.zeros(n))
        os.makedirs("outputs", exist_ok=True)
        np.savez(os.path.join("outputs", a.scene_name + "_droid.npz"), depths=np.zeros(1))
    """
    % {"F0": F0},
    "cvd_opt/preprocess_flow.py": """
        sys.path.append("cvd_opt/core")
        assert os.path.isdir("cvd_opt/core"), "run from the MegaSaM root"
        p = argparse.ArgumentParser(); p.add_argument("--datapath"); p.add_argument("--model"); p.add_argument("--scene_name")
        p.add_argument("--mixed_precision", action="store_true")
        a = p.parse_args(); log("flow", a)
        assert os.path.isfile(a.model) and a.mixed_precision
        d = os.path.join("./cache_flow", a.scene_name); os.makedirs(d, exist_ok=True)
        for name in ("flows", "flows_masks", "ii-jj"):
            np.save(os.path.join(d, name + ".npy"), np.zeros(1))
    """,
    "cvd_opt/cvd_opt.py": """
        p = argparse.ArgumentParser(); p.add_argument("--w_grad", type=float); p.add_argument("--w_normal", type=float)
        p.add_argument("--output_dir", default="outputs_cvd"); p.add_argument("--scene_name")
        a = p.parse_args(); log("cvd", a)
        rec = os.path.join(os.getcwd(), "reconstructions", a.scene_name)
        for name in ("images", "disps", "intrinsics", "poses", "motion_prob"):
            assert os.path.isfile(os.path.join(rec, name + ".npy")), name
        for name in ("flows", "flows_masks", "ii-jj"):
            assert os.path.isfile(os.path.join("./cache_flow", a.scene_name, name + ".npy")), name
        images = np.load(os.path.join(rec, "images.npy"))
        k = np.load(os.path.join(rec, "intrinsics.npy"))[0]
        n, _, hc, wc = images.shape
        # depth encodes the original pixel of each working-grid pixel centre: 2 + u0/100 + v0/50 + t
        h1_over_h0, w1_over_w0 = k[1] / %(F0)r, k[0] / %(F0)r
        v, u = np.meshgrid(np.arange(hc) + 0.5, np.arange(wc) + 0.5, indexing="ij")
        depth = np.stack([2 + (u / w1_over_w0) / 100 + (v / h1_over_h0) / 50 + t for t in range(n)])
        K = np.array([[k[0], 0, k[2]], [0, k[1], k[3]], [0, 0, 1.0]])
        c2w = np.tile(np.eye(4), (n, 1, 1)); c2w[:, 0, 3] = 0.1 * np.arange(n)
        os.makedirs(a.output_dir, exist_ok=True)
        np.savez("%%s/%%s_sgd_cvd_hr.npz" %% (a.output_dir, a.scene_name), images=images.transpose(0, 2, 3, 1),
                 depths=np.clip(np.float16(depth), 1e-3, 1e2), intrinsic=K, cam_c2w=c2w)
    """
    % {"F0": F0},
}


@pytest.fixture()
def fake_megasam(tmp_path, monkeypatch):
    root = tmp_path / "mega-sam"
    for rel, body in SCRIPTS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(COMMON + textwrap.dedent(body))
    for rel in ("base/droid_slam", "cvd_opt/core", "UniDepth/unidepth"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    for rel in (
        "Depth-Anything/checkpoints/depth_anything_vitl14.pth",
        "cvd_opt/raft-things.pth",
        "checkpoints/megasam_final.pth",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"weights")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_MEGASAM_LOG", str(log))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    return root, log


def frames(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (T, H0, W0, 3), dtype=np.uint8)
    for i in range(T):
        Image.fromarray(rgb[i]).save(d / f"{i:06d}.png")
    return d, rgb


def calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_wrapper_runs_megasams_steps_and_converts_to_the_frame_grid(tmp_path, fake_megasam):
    root, log = fake_megasam
    fdir, rgb = frames(tmp_path)
    out = tmp_path / "result.npz"
    assert main([str(fdir), str(out), "--megasam-root", str(root), "--python", sys.executable]) == 0
    steps = calls(log)
    assert [c["script"] for c in steps] == ["depth_anything", "unidepth", "camera_tracking", "flow", "cvd"]
    assert all(c["cuda"] == "3" for c in steps), "CUDA_VISIBLE_DEVICES must be passed through untouched"
    assert steps[4]["args"]["w_grad"] == 2.0 and steps[4]["args"]["w_normal"] == 5.0
    assert len({c["cwd"] for c in steps}) == 1 and Path(steps[0]["cwd"]) != root
    assert not any((root / d).exists() for d in ("reconstructions", "outputs", "cache_flow", "outputs_cvd"))
    assert not list(tmp_path.glob("megasam-work-*")), "the private working directory is removed"

    res = load_megasam_npz(out, expected_frames=T)
    np.testing.assert_array_equal(res.images, rgb)
    assert res.depths.shape == (T, H0, W0)
    np.testing.assert_allclose(res.intrinsic, [[F0, 0, W0 / 2], [0, F0, H0 / 2], [0, 0, 1]], rtol=1e-9)
    h1, w1, _, _ = working_size(H0, W0)
    v, u = np.meshgrid(np.arange(H0) + 0.5, np.arange(W0) + 0.5, indexing="ij")
    has = res.depths > 0
    # only the strip MegaSaM cropped off (bottom rows / right columns) has no depth
    assert not has[:, -1].any() and has[:, : H0 - 1, : W0 - 2].all()
    for t in range(T):
        expect = 2 + u / 100 + v / 50 + t
        err = np.abs(res.depths[t] - expect)[has[t]]
        # nearest working-grid pixel: within half of its size (W0/w1 px), plus float16 rounding
        assert err.max() < 0.5 * (W0 / w1) / 100 + 0.5 * (H0 / h1) / 50 + 4e-3 * expect.max(), err.max()
    ref = reference_from_megasam(
        out, H0, W0, expected_frames=T, clip_intrinsics=np.tile([F0, F0, W0 / 2, H0 / 2], (T, 1))
    )
    assert abs(ref.meta["focal_ratio"] - 1) < 1e-9


def test_wrapper_as_the_runners_command(tmp_path, fake_megasam, monkeypatch):
    root, log = fake_megasam
    repo = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    template = command_template(str(root), python=sys.executable, extra=["--offline"])
    runner = MegaSaMRunner(template, tmp_path / "work", timeout_s=120, retries=0)
    cache = MegaSaMCache(str(tmp_path / "cache"))
    rgb = np.random.default_rng(1).integers(0, 255, (T, H0, W0, 3), dtype=np.uint8)
    out = run_cached(runner, cache, "realestate10k__scene__0", rgb)
    assert not out.cached
    res = runner.run("realestate10k__scene__0", rgb)  # the wrapper's npz as the runner reads it
    assert res.depths.shape == (T, H0, W0)
    np.testing.assert_array_equal(res.images, rgb)
    assert [c["script"] for c in calls(log)][:5] == ["depth_anything", "unidepth", "camera_tracking", "flow", "cvd"]
    n = len(calls(log))
    assert run_cached(runner, cache, "realestate10k__scene__0", rgb).cached and len(calls(log)) == n


def test_failing_step_and_missing_checkpoint(tmp_path, fake_megasam, monkeypatch, capsys):
    root, log = fake_megasam
    fdir, _ = frames(tmp_path)
    monkeypatch.setenv("FAKE_MEGASAM_FAIL", "flow")
    assert main([str(fdir), str(tmp_path / "o.npz"), "--megasam-root", str(root), "--python", sys.executable]) == 2
    assert "optical flow" in capsys.readouterr().err and not (tmp_path / "o.npz").exists()
    assert [c["script"] for c in calls(log)] == ["depth_anything", "unidepth", "camera_tracking", "flow"]
    monkeypatch.delenv("FAKE_MEGASAM_FAIL")
    (root / "cvd_opt/raft-things.pth").unlink()
    assert main([str(fdir), str(tmp_path / "o.npz"), "--megasam-root", str(root), "--python", sys.executable]) == 2
    assert "RAFT checkpoint not found" in capsys.readouterr().err


def test_frames_in_a_folder_named_like_a_pattern_are_found(tmp_path):
    """The wrapper globbed '<frames_dir>/*.png' with the folder as a pattern: frames under
    'job[42]/' were 'found 0'."""
    from stages.align.megasam_run import frame_files

    d = tmp_path / "job[42]" / "frames"
    d.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / f"{i:06d}.png")
    assert [Path(f).name for f in frame_files(str(d))] == ["000000.png", "000001.png", "000002.png"]
