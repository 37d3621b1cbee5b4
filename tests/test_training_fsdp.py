"""FSDP2 (``runtime.strategy: fsdp``) on CPU: Ray Train with 2 gloo workers, tiny preset.

One chain of runs in one workdir, gradient accumulation 2 (so FSDP2's ``set_requires_gradient_sync`` is
used), a checkpoint after every step, all kept: an FSDP run from scratch does steps 1-4 (stage 1: step 1,
stage 2: step 2, stage 3: steps 3-4), then a local 1-process run resumes from the FSDP checkpoint and
does step 5. The slow tests check the sharding itself in two plain gloo processes, and resume FSDP and DDP
from the local run's checkpoint and compare their losses.
"""

import json
import os
import shutil

import pytest
import torch

from training.config import make_config
from training.synthetic import write_shards
from training.trainer import latest_checkpoint, load_checkpoint, train

STEPS = (1, 1, 5)  # static, static_hi (deformation frozen), dynamic (everything trainable)
LR = 1e-3  # the tiny preset's, no warm-up


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _cfg(shards, workdir, launcher, strategy="ddp", max_steps=None):
    stages = [s.model_copy(update={"steps": n}).model_dump() for s, n in zip(make_config("tiny").stages, STEPS)]
    return make_config(
        "tiny",
        data={"root": shards},
        workdir=workdir,
        stages=stages,
        max_steps=max_steps,
        optim={"grad_accum": 2, "lr": LR, "warmup_steps": 0},
        runtime={
            "launcher": launcher,
            "num_workers": 2 if launcher == "ray" else 1,
            "strategy": strategy,
            "ckpt_every": 1,
            "keep_ckpts": 100,
            "tensorboard": False,
        },
    )


def _ckpt(workdir, step):
    return load_checkpoint(os.path.join(workdir, "ckpt", f"step-{step:08d}.pt"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    shards = str(root / "shards")
    write_shards(shards, n_clips=4, per_shard=1, t=9, size=32)
    wd = str(root / "w")
    train(_cfg(shards, wd, "ray", "fsdp", max_steps=4))
    train(_cfg(shards, wd, "local", max_steps=5))
    return dict(shards=shards, wd=wd, ckpts={s: _ckpt(wd, s) for s in range(1, 6)})


def test_fsdp_curriculum_resume_and_freezing(chain):
    wd, ck = chain["wd"], chain["ckpts"]
    rows = _metrics(wd)
    # every stage ran under FSDP; the local run resumed from FSDP's checkpoint and continued the step count
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in rows] == ["static", "static_hi"] + ["dynamic"] * 3
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() and r["loss"] < 1e3 for r in rows)
    assert all("motion" in r for r in rows[2:]) and not any("motion" in r for r in rows[:2])
    assert latest_checkpoint(wd).endswith("step-00000005.pt")
    assert [ck[s]["world"] for s in range(1, 6)] == [2, 2, 2, 2, 1]

    # FSDP checkpoints (1-4) have the local/DDP format of 5: same model keys and shapes, integer-keyed
    # optimiser state; in stages 1-2 the frozen deformation head (weight, bias) has no optimiser state
    loc = ck[5]
    head = [loc["model"]["ldrm.deform_head.weight"].shape, loc["model"]["ldrm.deform_head.bias"].shape]
    for s in range(1, 5):
        assert list(ck[s]["model"]) == list(loc["model"])
        assert all(ck[s]["model"][k].shape == v.shape for k, v in loc["model"].items())
        assert [g["params"] for g in ck[s]["optim"]["param_groups"]] == [
            g["params"] for g in loc["optim"]["param_groups"]
        ]
        st = ck[s]["optim"]["state"]
        assert set(st) <= set(loc["optim"]["state"])
        assert all(v["exp_avg"].shape == loc["optim"]["state"][i]["exp_avg"].shape for i, v in st.items())
    trained = set(ck[1]["optim"]["state"])
    head_ids = sorted(set(loc["optim"]["state"]) - trained)
    assert [loc["optim"]["state"][i]["exp_avg"].shape for i in head_ids] == head
    for s in range(1, 6):
        st = ck[s]["optim"]["state"]
        assert set(st) == trained | (set(head_ids) if s >= 3 else set())
        assert all(int(st[i]["step"]) == s for i in trained)  # the state survived the resume
        assert all(int(st[i]["step"]) == s - 2 for i in head_ids if s >= 3)  # fresh AdamW state from stage 3

    # all ranks start from rank 0's initial weights (broadcast before sharding): one AdamW step moves a
    # weight by at most lr * (1 + weight_decay * |w|) (|w| <= ~1 here); a different rank-1 init is far off
    from training.model import Diff4Splat

    with torch.random.fork_rng():
        torch.manual_seed(0)  # the trainer's seed for rank 0 (runtime.seed * 1000 + rank)
        init = Diff4Splat(_cfg(chain["shards"], wd, "local")).state_dict()
    delta = {k: float((ck[1]["model"][k] - v).abs().max()) for k, v in init.items() if v.is_floating_point()}
    assert max(delta.values()) <= 1.02 * LR, max(delta.items(), key=lambda kv: kv[1])
    assert max(delta.values()) > 0.5 * LR

    def same(a, b, prefix):
        keys = [k for k in ck[a]["model"] if k.startswith(prefix)]
        assert keys
        return all(torch.equal(ck[a]["model"][k], ck[b]["model"][k]) for k in keys)

    # frozen: the VAE never changes, the deformation head not in stages 1-2 (steps 1-2) ...
    assert all(delta[k] == 0 for k in init if k.startswith("backbone.vae."))
    assert all(same(1, s, "backbone.vae.") for s in range(2, 6))
    assert all(delta[k] == 0 for k in init if k.startswith("ldrm.deform_head."))
    assert same(1, 2, "ldrm.deform_head.")
    # ... and it trains in stage 3: under FSDP (2 -> 3 -> 4) and after the local resume (4 -> 5)
    assert all(not same(s, s + 1, "ldrm.deform_head.weight") for s in (2, 3, 4))
    # an FSDP step updates both ranks' shards (dim-0 halves) of the sharded blocks and the root group
    for k, a in ck[1]["model"].items():
        if k.startswith(("ldrm.blocks.", "backbone.transformer.transformer_blocks.")) and a.shape[0] >= 2:
            b, h = ck[2]["model"][k], a.shape[0] // 2
            assert not torch.equal(a[:h], b[:h]) and not torch.equal(a[h:], b[h:]), k
    for k in ("ldrm.token_in.weight", "backbone.null_text", "backbone.camera.proj.0.weight"):
        assert not torch.equal(ck[1]["model"][k], ck[2]["model"][k]), k


@pytest.mark.slow
def test_fsdp_and_ddp_resume_from_local_checkpoint_alike(chain, tmp_path):
    """FSDP and DDP resume from the local run's step-5 checkpoint (same seeds, same data) and do steps 6-7.

    Step 6 starts from identical parameters; after that they differ only in the order of float reductions
    (DDP all-reduce vs FSDP reduce-scatter, the gradient norm summed over shards)."""
    rows, ckpts = {}, {}
    for strategy in ("fsdp", "ddp"):
        wd = str(tmp_path / strategy)
        shutil.copytree(chain["wd"], wd)
        train(_cfg(chain["shards"], wd, "ray", strategy))
        rows[strategy] = {r["step"]: r for r in _metrics(wd)}
        ckpts[strategy] = _ckpt(wd, 7)
    f, d = rows["fsdp"], rows["ddp"]
    assert sorted(f) == sorted(d) == list(range(1, 8))
    for s in (6, 7):
        for k in ("loss", "fm", "photo", "geo", "motion", "grad_norm"):
            assert abs(f[s][k] - d[s][k]) <= 1e-4 * max(1.0, abs(d[s][k])), (s, k, f[s][k], d[s][k])  # seen: ~3e-7
    assert abs(f[6]["loss"] - d[6]["loss"]) <= 1e-6 * abs(d[6]["loss"])
    a, b = ckpts["fsdp"], ckpts["ddp"]
    assert a["world"] == b["world"] == 2
    assert max(float((a["model"][k] - v).abs().max()) for k, v in b["model"].items() if v.is_floating_point()) < 1e-4
    # AdamW state came through the FSDP load: 5 steps, 3 for the deformation head (trained from stage 3)
    head_ids = set(chain["ckpts"][5]["optim"]["state"]) - set(chain["ckpts"][1]["optim"]["state"])
    steps = {i: int(v["step"]) for i, v in a["optim"]["state"].items()}
    assert steps == {i: int(v["step"]) for i, v in b["optim"]["state"].items()}
    assert steps == {i: 5 if i in head_ids else 7 for i in steps} and len(head_ids) == 2


def _shard_worker(rank, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from training.model import Diff4Splat
    from training.trainer import _model_state, _shard_fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # as in the trainer, each rank initialises a different model
        model = Diff4Splat(make_config("tiny"))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _shard_fsdp(model, torch.device("cpu"))
        blocks = [*model.backbone.transformer.transformer_blocks, *model.ldrm.blocks]
        assert len(blocks) == 3 and all(isinstance(b, FSDPModule) for b in [model, *blocks])
        for n, p in model.named_parameters():
            assert isinstance(p, DTensor) != n.startswith("backbone.vae."), n  # the frozen VAE is not sharded
        full = _model_state(model, True)
        if rank == 0:  # gathered = rank 0's initial weights
            assert list(full) == list(before)
            assert all(torch.equal(full[k], v) for k, v in before.items())
            torch.save(len(full), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_shard_structure(tmp_path):
    """Each transformer block and the root are FSDP modules, the VAE is not sharded (two gloo processes)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ok.pt")
    mp.spawn(_shard_worker, args=(port, out), nprocs=2)
    assert torch.load(out) > 0
