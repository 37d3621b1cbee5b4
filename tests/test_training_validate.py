"""Validation while training: held-out clips measured every N steps and at stage ends, logged, the best
checkpoint kept, the report drawn; ranks split the clips and agree with one rank."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from training.config import make_config
from training.synthetic import write_shards

STAGE = dict(
    name="static",
    steps=3,
    resolution=16,
    num_frames=5,
    scenes="any",
    frozen=["deformation"],
    losses=["photo", "geo"],
    max_frame_stride=1,
)
VAL_KEYS = {"synth__s1__0", "synth__s4__0"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("val_shards")
    write_shards(str(out), n_clips=6, per_shard=3, t=5, size=16, datasets=("synth",), val=lambda ds, i: i in (1, 4))
    return str(out)


def _cfg(shards, workdir, **validation):
    return make_config(
        "tiny",
        data={"root": shards},
        workdir=str(workdir),
        stages=[STAGE],
        validation={"every": 2, "clips": 2, "sample_steps": 1, "tracks": 8, **validation},
        runtime={"launcher": "local", "num_workers": 1, "ckpt_every": 100, "tensorboard": False},
    )


def test_validation_rows_best_checkpoint_and_report(shards, tmp_path):
    from training.trainer import train
    from training.validate import load_clips, validation_source

    cfg = _cfg(shards, tmp_path / "w", clips=1, report=False)
    source, split = validation_source(cfg)
    assert {c.key for c in load_clips(source, split, None)} == VAL_KEYS  # only held-out scenes
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("kind") == "val"]
    assert [r["step"] for r in val] == [2, 3]  # every 2 steps, and at the stage's (and run's) end
    assert [r["step"] for r in rows if r.get("kind") != "val"] == [1, 2, 3]
    for r in val:
        assert r["clips"] == 1
        for k in (
            "recon_psnr",
            "recon_ssim",
            "recon_depth_abs_rel",
            "recon_depth_delta_1_25",
            "recon_track_epe_m",
            "sample_psnr",
            "sample_ssim",
        ):
            assert k in r and r[k] == r[k], k  # present and finite
        assert "recon_lpips" not in r  # no LPIPS weights here
        assert 0 < r["recon_ssim"] <= 1 and 0 <= r["recon_depth_delta_1_25"] <= 1 and r["recon_depth_abs_rel"] > 0
    best = json.loads((tmp_path / "w" / "ckpt" / "best.json").read_text())
    want = max(val, key=lambda r: r["recon_psnr"])
    assert best["metric"] == "recon_psnr" and best["step"] == want["step"] and best["value"] == want["recon_psnr"]
    state = torch.load(tmp_path / "w" / "ckpt" / "best.pt", weights_only=True)
    assert state["step"] == best["step"] and "model" in state and state["config"]["validation"]["every"] == 2
    from training.report import write_training_report

    assert not (tmp_path / "w" / "report.html").exists()  # validation.report off
    page = Path(write_training_report(str(tmp_path / "w"))).read_text()
    assert page.count("data:image/png;base64,") == 2 and "Best checkpoint" in page


def test_no_held_out_clips_skips_validation(tmp_path, capsys):
    from training.trainer import train

    out = tmp_path / "noval"
    write_shards(str(out), n_clips=2, per_shard=2, t=5, size=16, datasets=("synth",))
    train(_cfg(str(out), tmp_path / "w").model_copy(update={"max_steps": 1}))
    assert "validation skipped: no held-out clips" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("kind") == "val" for r in rows) and not (tmp_path / "w" / "ckpt" / "best.pt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _validate(rank, world, port, shards, out, fsdp=False):
    import torch.distributed as dist

    from training.model import Diff4Splat
    from training.render_torch import rasterize
    from training.validate import Validator

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = make_config(
        "tiny",
        data={"root": shards},
        stages=[STAGE],
        validation={"every": 1, "clips": 3, "sample_steps": 1, "tracks": 8},
    )
    torch.manual_seed(0)
    model = Diff4Splat(cfg)
    if fsdp:  # every forward is a collective: ranks must run the same number (a stand-in pads rank 1)
        from training.trainer import _shard_fsdp

        _shard_fsdp(model, torch.device("cpu"))
    res = Validator(cfg, rank, world, torch.device("cpu")).run(model, cfg.stages[0], rasterize, False)
    Path(f"{out}.{rank}").write_text(json.dumps(res))
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fsdp", [False, True])
def test_ranks_split_validation_and_agree_with_one_rank(tmp_path, fsdp):
    import torch.multiprocessing as mp

    data = tmp_path / "d"
    write_shards(str(data), n_clips=6, per_shard=3, t=5, size=16, datasets=("synth",), val=lambda ds, i: i in (0, 1, 4))
    _validate(0, 1, 0, str(data), str(tmp_path / "one"))
    mp.spawn(_validate, args=(2, _free_port(), str(data), str(tmp_path / "two"), fsdp), nprocs=2)
    one = json.loads((tmp_path / "one.0").read_text())
    two = [json.loads((tmp_path / f"two.{r}").read_text()) for r in (0, 1)]
    assert one["clips"] == 3 and two[0] == two[1]  # every rank gets the reduced means
    assert set(one) == set(two[0])
    for k, v in one.items():
        assert abs(v - two[0][k]) <= 1e-5 * max(1.0, abs(v)), (k, v, two[0][k])
