"""Using a checkpoint: ``d4s eval`` (metrics.json, eval.html, a Rerun recording beside the ground truth),
``d4s generate`` (videos, 3DGS .ply files, timings), and the bad inputs each refuses clearly."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_STAGE, write_tiny_use_inputs
from typer.testing import CliRunner

from pipeline.cli import app
from training.config import make_config

runner = CliRunner()
STAGE = TINY_STAGE
REQUIRED = {"psnr", "ssim", "lpips", "depth_abs_rel", "depth_delta_1_25", "track_epe_m", "clips"}


class NotATensor:
    """An object a checkpoint must not hold: unpickling it would run this module's code."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("use")
    cfg, model = write_tiny_use_inputs(root, step=11, moving=True)
    return root, cfg, model


def test_eval_metrics_page_and_recording_beside_ground_truth(setup, tmp_path):
    pytest.importorskip("rerun", reason="d4s eval --rrd needs rerun-sdk (pip install -e '.[dev]')")
    pytest.importorskip("datafusion", reason="reading a recording back needs rerun-sdk[catalog] (in the dev extra)")
    from rerun.chunk import RrdReader

    root, _, _ = setup
    rrd = tmp_path / "rec" / "eval.rrd"
    r = runner.invoke(
        app,
        [
            "eval",
            str(root / "ckpt.pt"),
            str(root / "data"),
            "--out",
            str(tmp_path / "e"),
            "--sample-steps",
            "1",
            "--clips",
            "1",
            "--rrd",
            str(rrd),
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert REQUIRED <= set(m) and m["clips"] == 1 and m["step"] == 11 and m["split"] == "val"
    assert m["lpips"] is None and "LPIPS not measured" in m["lpips_note"]  # no weights here
    assert [c["key"] for c in m["per_clip"]] == ["synth__s1__0"]  # the first held-out clip, never a training one
    assert 0 < m["ssim"] <= 1 and m["psnr"] > 0 and m["depth_abs_rel"] > 0 and m["track_epe_m"] > 0
    assert set(m["sampled"]) == set(REQUIRED) - {"clips"} | {"depth_abs_rel_scaled"} and m["sampled"]["psnr"] > 0
    page = (tmp_path / "e" / "eval.html").read_text()
    assert page.count("data:image/png;base64,") == 6  # gt, recon, sampled; their depths

    store = RrdReader(rrd).stream().collect()
    entities = {line.split()[0] for line in store.summary().splitlines()}
    key = "/synth__s1__0"
    want = {
        f"{key}/gt/camera/image/rgb",
        f"{key}/gt/camera/image/depth",
        f"{key}/gt/tracks",
        f"{key}/recon/camera/image/rgb",
        f"{key}/recon/camera/image/depth",
        f"{key}/recon/gaussians",
        f"{key}/sample/camera/image/rgb",
        f"{key}/sample/gaussians",
        f"{key}/recon/tracks",
    }
    assert want <= entities, want - entities
    frames = store.reader(index="frame").to_arrow_table()
    assert frames.column("frame").to_pylist() == list(range(5))
    gt = frames.column(f"{key}/gt/camera:Transform3D:translation").to_pylist()
    rec = frames.column(f"{key}/recon/camera:Transform3D:translation").to_pylist()
    assert gt == rec and gt[0] != gt[-1]  # renders at the clip's own (moving) cameras
    pts = frames.column(f"{key}/recon/gaussians:Points3D:positions").to_pylist()
    assert all(p is not None and len(p[0]) > 0 for p in pts)


def test_eval_refuses_bad_checkpoints_and_data(setup, tmp_path):
    root, cfg, model = setup
    bad = tmp_path / "pickled.pt"
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "extra": NotATensor()}, bad)
    other = make_config("tiny", stages=[STAGE], ldrm={"dim": 48, "heads": 2})
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"model": model.state_dict(), "config": other.model_dump(mode="json")}, mismatched)
    other_yaml = tmp_path / "other.yaml"
    other_yaml.write_text("preset: tiny\nldrm: {dim: 48, heads: 2}\n")
    cases = [
        ([str(bad), str(root / "data")], "refused: it holds objects other than tensors"),
        ([str(mismatched), str(root / "data")], "weights do not fit its config"),
        (
            [str(root / "ckpt.pt"), str(root / "data"), "--config", str(other_yaml)],
            "another model than the given config",
        ),
        ([str(tmp_path), str(root / "data")], "not a training workdir"),
        ([str(root / "ckpt.pt"), str(tmp_path)], "no index.parquet"),
        ([str(root / "ckpt.pt"), str(root / "data"), "--frames", "4"], "frames must be 1 + k*2"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, ["eval", *args, "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and msg in r.output.replace("\n", ""), (args, r.output)


def test_generate_videos_ply_and_timings(setup, tmp_path):
    import av
    from plyfile import PlyData

    root, _, _ = setup
    r = runner.invoke(
        app,
        [
            "generate",
            str(root / "ckpt.pt"),
            "--image",
            str(root / "img.png"),
            "--trajectory",
            "dolly:0.4",
            "--out",
            str(tmp_path / "g"),
            "--steps",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    t = json.loads((tmp_path / "g" / "timings.json").read_text())
    assert t["frames"] == 5 and t["resolution"] == 16 and t["steps"] == 2
    assert t["scene_s"] == pytest.approx(t["encode_s"] + t["sample_s"] + t["ldrm_s"] + t["render_s"], abs=1e-3)
    for name in ("rgb.mp4", "depth.mp4", "novel_rgb.mp4", "novel_depth.mp4"):
        with av.open(str(tmp_path / "g" / name)) as v:
            assert sum(1 for _ in v.decode(video=0)) == 5, name
    cams = json.loads((tmp_path / "g" / "cameras.json").read_text())
    c2w = np.array(cams["trajectory"]["c2w"])
    assert np.allclose(c2w[0], np.eye(4)) and c2w[-1, 2, 3] == pytest.approx(0.4)
    plys = sorted((tmp_path / "g" / "ply").iterdir())
    assert [p.name for p in plys] == [f"frame_{i:03d}.ply" for i in range(5)]
    v0, v4 = (PlyData.read(str(p))["vertex"] for p in (plys[0], plys[4]))
    assert [p.name for p in v0.properties][:6] == ["x", "y", "z", "nx", "ny", "nz"] and len(v0) == t[
        "gaussians_per_frame"
    ]
    assert not np.allclose(v0["x"], v4["x"])  # deformed to each frame's time


def test_generate_refuses_bad_image_and_trajectory(setup, tmp_path):
    root, _, _ = setup
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "wide.png")
    traj = tmp_path / "bad.txt"
    traj.write_text(
        "https://youtu.be/x\n"
        + "1000 0.5 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0\n"
        + "2000 0.5 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1\n"
    )  # line 3: a value short
    cases = [
        (["--image", str(tmp_path / "wide.png"), "--trajectory", "orbit"], "the image is 30x20"),
        (["--image", str(root / "img.png"), "--trajectory", str(traj)], "line 3: expected 19 values"),
        (["--image", str(root / "img.png"), "--trajectory", "spiral:2"], "no such trajectory file, and not a preset"),
        (["--image", str(root / "img.png"), "--trajectory", "orbit", "--prompt", "a cat"], "needs a T5 text encoder"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, ["generate", str(root / "ckpt.pt"), *args, "--out", str(tmp_path / "o"), "--steps", "1"])
        assert r.exit_code == 2 and msg in r.output.replace("\n", ""), (args, r.output)


def test_ply_stores_the_3dgs_layout_with_activations_inverted(tmp_path):
    from plyfile import PlyData

    from training.gaussians import Gaussians
    from training.ply import PROPERTIES, SH_C0, ply_bytes

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(50, 4, generator=g), dim=-1)
    gs = Gaussians(
        torch.randn(50, 3, generator=g),
        q,
        torch.rand(50, 3, generator=g) * 0.1 + 1e-3,
        torch.rand(50, generator=g) * 0.9 + 0.05,
        torch.rand(50, 3, generator=g),
    )
    (tmp_path / "a.ply").write_bytes(ply_bytes(gs))
    el = PlyData.read(str(tmp_path / "a.ply"))["vertex"]
    assert tuple(p.name for p in el.properties) == PROPERTIES and len(el) == 50
    col = lambda *names: np.stack([el[n] for n in names], -1)
    assert np.allclose(col("x", "y", "z"), gs.means.numpy(), atol=1e-6)
    assert np.allclose(1 / (1 + np.exp(-el["opacity"])), gs.opacities.numpy(), atol=1e-5)
    assert np.allclose(np.exp(col("scale_0", "scale_1", "scale_2")), gs.scales.numpy(), rtol=1e-5)
    assert np.allclose(col("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5, gs.colours.numpy(), atol=1e-6)
    assert np.allclose(col("rot_0", "rot_1", "rot_2", "rot_3"), q.numpy(), atol=1e-6)


def test_trajectories_presets_files_and_bad_rows(tmp_path):
    from training import trajectory as tj

    orbit = tj.load("orbit:2", 9, (16, 16), 16)
    assert orbit.c2w.shape == (9, 4, 4) and np.allclose(orbit.c2w[0], np.eye(4))
    centre = np.array([0, 0, 2.0])
    dist = [np.linalg.norm(c[:3, 3] - centre) for c in orbit.c2w]
    assert np.allclose(dist, 2.0)  # on the circle about the point 2 m ahead
    fwd = orbit.c2w[-1, :3, 2]
    assert np.allclose(orbit.c2w[-1, :3, 3] + 2.0 * fwd, centre, atol=1e-9)  # looking at it
    # a 13-camera json path subsampled to 5, made relative to its first camera; normalised intrinsics
    c2w = np.tile(np.eye(4), (13, 1, 1))
    c2w[:, 0, 3] = np.arange(13) + 5.0
    (tmp_path / "p.json").write_text(json.dumps({"c2w": c2w.tolist(), "intrinsics": [[0.5, 0.5, 0.5, 0.5]] * 13}))
    p = tj.load(str(tmp_path / "p.json"), 5, (32, 16), 16)
    assert np.allclose(p.c2w[:, 0, 3], [0, 3, 6, 9, 12]) and np.allclose(p.intrinsics[0], [16, 8, 16, 8])
    with pytest.raises(tj.TrajectoryError, match="fewer than the 17 frames"):
        tj.load(str(tmp_path / "p.json"), 17, (32, 16), 16)
    c2w[3, :3, :3] *= 2.0
    (tmp_path / "q.json").write_text(json.dumps({"c2w": c2w.tolist()}))
    with pytest.raises(tj.TrajectoryError, match="camera 3: the rotation is not a rotation"):
        tj.load(str(tmp_path / "q.json"), 5, (16, 16), 16)
    np.savez(tmp_path / "n.npz", c2w=np.tile(np.eye(4), (5, 1, 1)), intrinsics=np.full((5, 4), np.nan))
    with pytest.raises(tj.TrajectoryError, match="camera 0: intrinsics"):
        tj.load(str(tmp_path / "n.npz"), 5, (16, 16), 16)


def test_generate_along_a_build_clips_cameras(setup, tmp_path):
    from viz_output import write_output

    root, _, _ = setup
    built = write_output(tmp_path)
    key = "pointodyssey__scene1__000000"
    r = runner.invoke(
        app,
        [
            "generate",
            str(root / "ckpt.pt"),
            "--image",
            str(root / "img.png"),
            "--trajectory",
            built["output"],
            "--clip",
            key,
            "--out",
            str(tmp_path / "g"),
            "--steps",
            "1",
            "--no-ply",
        ],
    )
    assert r.exit_code == 0, r.output
    clip = built["clips"][key]
    idx = np.round(np.linspace(0, clip.num_frames - 1, 5)).astype(int)  # 8 cameras taken evenly for 5 frames
    want = np.linalg.inv(clip.c2w[idx[0]])[None] @ clip.c2w[idx]
    cams = json.loads((tmp_path / "g" / "cameras.json").read_text())
    assert np.allclose(cams["trajectory"]["c2w"], want, atol=1e-5)
    fx = clip.intrinsics[0, 0] * 16 / 32  # the clip's 32x24 pixel intrinsics, for the 16x16 image
    assert cams["trajectory"]["intrinsics"][0][0] == pytest.approx(fx, rel=1e-5)
    assert not (tmp_path / "g" / "ply").exists()


def test_depth_and_image_measures_on_known_values():
    from training.metrics import depth_errors, psnr, ssim, track_epe

    gt = torch.linspace(1, 5, 64).reshape(8, 8)
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[0] = False
    abs_rel, delta, scaled, n = depth_errors(2 * gt, gt, valid)  # twice too far: right shape, wrong scale
    assert (abs_rel, delta, n) == (pytest.approx(1.0), 0.0, 56) and scaled == pytest.approx(0.0, abs=1e-6)
    abs_rel, delta, _, _ = depth_errors(gt * 1.1, gt, valid)
    assert abs_rel == pytest.approx(0.1, rel=1e-5) and delta == 1.0
    img = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    assert psnr(img.clamp(0, 0.9) * 0 + 0.5, torch.full_like(img, 0.6)).tolist() == pytest.approx([20.0, 20.0])
    assert ssim(img, img).tolist() == pytest.approx([1.0, 1.0]) and float(ssim(img, 1 - img).mean()) < 0.5
    tracks = torch.zeros(3, 4, 3)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[:, 0] = False
    pred = tracks.clone()
    pred[..., 0] = 0.3
    pred[:, 0] = 100.0  # invisible: not counted
    assert track_epe(pred, tracks, mask) == (pytest.approx(0.3), 9)


def test_eval_of_shard_files_reads_every_sample(setup, tmp_path):
    root, _, _ = setup
    r = runner.invoke(
        app,
        [
            "eval",
            str(root / "ckpt.pt"),
            str(root / "data" / "shards" / "*.tar"),
            "--out",
            str(tmp_path / "e"),
            "--sample-steps",
            "0",
            "--split",
            "val",
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["split"] == "all" and m["clips"] == 3 and m["sampled"] is None  # no index: training scenes too
