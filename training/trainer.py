"""Distributed trainer: Ray Train ``TorchTrainer`` (DDP default, FSDP2 option) or in-process.

Every rank runs :func:`train_loop_per_worker`. State lives in ``workdir`` (local path or fsspec URL):

* ``ckpt/step-XXXXXXXX.pt`` — model, optimiser, scheduler, step, curriculum stage and data position
  (batches consumed in the stage), every rank's RNG states, the config. Written by rank 0 to a
  ``.tmp`` name and renamed; ``ckpt/latest`` (the file name) is replaced the same way afterwards, so a
  crash at any point leaves the previous checkpoint intact and pointed to.
* ``metrics.jsonl`` — one line per optimiser step (rank-averaged losses), ``tb/`` TensorBoard events.

A run in a workdir that has a checkpoint resumes from it (model, optimiser, data position, RNG), so
the losses after a resume equal those of an uninterrupted run.

``runtime.strategy: fsdp`` shards the model with FSDP2 (``torch.distributed.fsdp.fully_shard``): every
CogVideoX transformer block and every LDRM block is its own shard group, the root group holds the rest;
the frozen VAE is left out (``ignored_params``, replicated). Its checkpoints are gathered into the same
full, unsharded state dicts as the DDP / local path, so either kind of run resumes from the other's.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from pipeline import strict_json
from training.config import TrainConfig
from training.curriculum import describe, stage_position


# --- storage helpers (local or fsspec) ------------------------------------------------------------
def _fs(url: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _join(a: str, *b: str) -> str:
    return "/".join([a.rstrip("/"), *b])


def write_atomic(url: str, data: bytes) -> None:
    fs, path = _fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.mv(tmp, path)


def latest_checkpoint(workdir: str) -> str | None:
    fs, path = _fs(_join(workdir, "ckpt", "latest"))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        name = f.read().decode(errors="replace").strip()
    if not re.fullmatch(r"step-\d{8,}\.pt", name):  # what save_checkpoint writes; never a path out of ckpt/
        from training.load import CheckpointError

        raise CheckpointError(
            f"{_join(workdir, 'ckpt', 'latest')}: holds {name[:80]!r}, not a checkpoint name (step-NNNNNNNN.pt); "
            "fix or remove it to use this workdir"
        )
    return _join(workdir, "ckpt", name)


def load_checkpoint(url: str) -> dict:
    fs, path = _fs(url)
    with fs.open(path, "rb") as f:
        # weights_only: a workdir on shared storage is not trusted to run code; the state holds only
        # tensors and plain Python values (rng_state stores numpy's generator state as a tensor).
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def save_checkpoint(workdir: str, state: dict, keep: int) -> str:
    name = f"step-{state['step']:08d}.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(_join(workdir, "ckpt", name), buf.getvalue())
    write_atomic(_join(workdir, "ckpt", "latest"), name.encode())
    fs, path = _fs(_join(workdir, "ckpt"))
    olds = sorted(
        p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("step-") and p.endswith(".pt")
    )
    for p in olds[:-keep] if keep > 0 else []:
        fs.rm(p)
    return _join(workdir, "ckpt", name)


# --- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# --- the per-rank loop ----------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    from training.data import make_loader
    from training.losses import LPIPSLoss
    from training.model import Diff4Splat
    from training.render_gsplat import build_backend_once, get_rasterizer
    from training.render_gsplat import rasterize as rasterize_gsplat
    from training.speed import compile_blocks, compile_vae_encoder, make_optimizer

    cfg = TrainConfig.model_validate(config["cfg"])
    rt = cfg.runtime
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    use_cuda = rt.use_gpu and torch.cuda.is_available()
    if use_cuda:
        # modulo: ranks packed onto one GPU (runtime.gpus_per_worker < 1) all see that one device
        local = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())) % torch.cuda.device_count()
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = rt.cudnn_benchmark
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed = rt.seed * 1000 + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    # Random initialisation on the GPU: a 2B-parameter model takes minutes to initialise on the one CPU
    # thread a Ray worker gets (OMP_NUM_THREADS=1). Pretrained weights load the usual way.
    with torch.device(device) if use_cuda and not cfg.backbone.pretrained_dir else _null():
        model = Diff4Splat(cfg).to(device)
    model.set_gradient_checkpointing(rt.grad_checkpointing, rt.checkpoint_fraction)
    if rt.compile:  # before sharding: FSDP2's hooks stay outside the compiled forwards
        compile_blocks(model)
    if rt.compile_vae:
        compile_vae_encoder(model.backbone)
    rasterize = get_rasterizer(rt.renderer if use_cuda else "torch")
    if distributed and rasterize is rasterize_gsplat:
        build_backend_once(rank, int(os.environ.get("LOCAL_RANK", rank)), dist.barrier)
    lpips_fn = LPIPSLoss(cfg.loss.lpips_net, cfg.loss.lpips_torch_home).to(device) if cfg.loss.lpips_enabled else None
    text_encoder = None
    if cfg.backbone.text_encoder_dir:  # frozen, beside the model (not in DDP/FSDP, optimiser or checkpoints)
        from training.text import TextEncoder

        tc = model.backbone.transformer.config
        text_encoder = TextEncoder(
            cfg.backbone.text_encoder_dir,
            tc.max_text_seq_length,
            device,
            cache_size=cfg.backbone.text_cache_size,
            expect_dim=tc.text_embed_dim,
        )

    fsdp = rt.strategy == "fsdp" and distributed
    if rank == 0:
        n_all = sum(p.numel() for p in model.parameters())
        n_vae = sum(p.numel() for p in model.backbone.vae.parameters())
        how = ("FSDP2" if fsdp else "DDP") if distributed else "single process"
        print(
            f"[train] {world} rank(s) on {device.type}, {how}, {n_all / 1e6:.1f}M parameters "
            f"({n_vae / 1e6:.1f}M in the frozen VAE), grad checkpointing {'on' if rt.grad_checkpointing else 'off'}",
            flush=True,
        )
    if fsdp:
        _shard_fsdp(model, device)  # in place: ``model`` is now an FSDPModule with DTensor parameters
    params = [p for n, p in model.named_parameters() if ".vae." not in f".{n}"]
    opt = make_optimizer(params, cfg.optim)
    warm = cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)

    step = 0
    resumed_from = latest_checkpoint(cfg.workdir)
    rng_to_restore = None
    if resumed_from:
        st = load_checkpoint(resumed_from)
        refuse_another_model(cfg, st, resumed_from)
        _load_model(model, st["model"], fsdp)
        _load_optim(model, opt, st["optim"], fsdp)
        sched.load_state_dict(st["sched"])
        step = st["step"]
        rngs = st.get("rng", [])
        rng_to_restore = rngs[rank] if rank < len(rngs) else None
        if rank == 0:
            print(
                f"[train] resumed from {resumed_from} at step {step} "
                f"(stage {st['stage_index']}, {st['batches_in_stage']} batches into it)",
                flush=True,
            )
    if rng_to_restore is not None:
        set_rng_state(rng_to_restore)

    max_steps = min(cfg.total_steps, cfg.max_steps or cfg.total_steps)
    writer = tensorboard_writer(cfg.workdir) if rank == 0 and rt.tensorboard else None
    metrics_url = _join(cfg.workdir, "metrics.jsonl")
    accum = cfg.optim.grad_accum
    samples_per_step = rt.batch_size * accum * world

    def checkpoint(stage_index: int, in_stage: int) -> None:
        model_sd = _model_state(model, fsdp)  # collective under FSDP: every rank calls it
        optim_sd = _optim_state(model, opt, fsdp)
        rngs = [None] * world
        if distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if rank == 0:
            state = {
                "model": model_sd,
                "optim": optim_sd,
                "sched": sched.state_dict(),
                "step": step,
                "stage_index": stage_index,
                "batches_in_stage": in_stage,
                "rng": rngs,
                "config": cfg.model_dump(mode="json"),
                "world": world,
            }
            path = save_checkpoint(cfg.workdir, state, rt.keep_ckpts)
            print(f"[train] checkpoint {path}", flush=True)
        if distributed:
            dist.barrier()

    pending: list[dict] = []  # steps whose metrics are still on the device

    def flush_metrics() -> dict[str, float]:
        """Reduce and write the pending steps' metrics: one all-reduce and one device read for all of
        them; returns the last step's means."""
        if not pending:
            return {}
        means = reduce_metrics_steps([r.pop("agg") for r in pending], device)
        norms = [r.pop("grad_norm") for r in pending]
        if any(n is not None for n in norms):
            norms = torch.stack([n.float() for n in norms]).tolist()
        for row, mean, norm in zip(pending, means, norms):
            row.update(mean)
            if norm is not None:
                row["grad_norm"] = norm
            if rank == 0:
                _append_jsonl(metrics_url, row)
                if writer is not None:
                    for k, v in mean.items():
                        writer.add_scalar(f"train/{k}", v, row["step"])
        pending.clear()
        return means[-1]

    validator, best = _validation_setup(cfg, rank, world, device, lpips_fn, text_encoder)

    def validate(stage, stage_index: int) -> None:
        """Measure the held-out clips (every rank), log them, keep the best checkpoint, redraw the report."""
        flush_metrics()  # the training rows of the steps before it land first in metrics.jsonl
        res = validator.run(model, stage, rasterize, use_cuda and rt.bf16)
        if rank == 0:
            _append_jsonl(metrics_url, {"step": step, "stage": stage.name, "kind": "val", "time": time.time(), **res})
            if writer is not None:
                for k, v in res.items():
                    writer.add_scalar(f"val/{k}", v, step)
            print(
                f"[train] validation at step {step} ({res['clips']} clips): "
                + " ".join(f"{k} {v:.4g}" for k, v in res.items() if k != "clips"),
                flush=True,
            )
        if best is not None and best.improves(res):
            # a collective under FSDP (every rank takes this branch alike); otherwise only rank 0 copies the weights
            model_sd = _model_state(model, fsdp) if (fsdp or rank == 0) else None
            if rank == 0:
                path = best.save(
                    {
                        "model": model_sd,
                        "config": cfg.model_dump(mode="json"),
                        "step": step,
                        "stage_index": stage_index,
                    },
                    res[best.metric],
                )
                print(f"[train] best {best.metric} {res[best.metric]:.4g}: {path}", flush=True)
        if rank == 0 and cfg.validation.report:
            _write_report(cfg.workdir)

    stage_index, in_stage = stage_position(cfg, step)
    t_last, step_last = time.perf_counter(), step
    while step < max_steps and stage_index < len(cfg.stages):
        stage = cfg.stages[stage_index]
        model.apply_stage(stage)
        if fsdp:
            # FSDP2 reads requires_grad from the sharded parameters at every unshard, so the stage's
            # freezing (set on them by apply_stage) takes effect without re-wrapping.
            ddp = model
        elif distributed:
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if use_cuda else None, find_unused_parameters=False
            )
        else:
            ddp = model
        ddp.train()
        model.backbone.vae.eval()
        loader = make_loader(
            cfg.data,
            stage,
            stage_index,
            cfg.loss.tracks_per_sample,
            rt.batch_size,
            rank,
            world,
            start_batches=in_stage * accum,
            pin_memory=use_cuda,
        )
        it = iter(loader)
        if rank == 0:
            print(f"[train] stage {stage_index} {describe(stage)}", flush=True)
        while in_stage < stage.steps and step < max_steps:
            lr = sched.get_last_lr()[0]  # the rate this step's update uses (train_step steps the schedule)
            agg, grad_norm = train_step(
                ddp,
                model,
                opt,
                sched,
                it,
                stage,
                cfg,
                device,
                rasterize=rasterize,
                lpips_fn=lpips_fn,
                text_encoder=text_encoder,
                fsdp=fsdp,
                distributed=distributed,
                autocast=use_cuda and rt.bf16,
            )
            step += 1
            in_stage += 1
            # kept on the device until log time: reading a metric back every step would stall the GPU
            pending.append(
                {
                    "step": step,
                    "stage": stage.name,
                    "lr": lr,
                    "time": time.time(),
                    "agg": agg,
                    "grad_norm": grad_norm,
                    **({"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if use_cuda else {}),
                }
            )
            end_of_stage = in_stage >= stage.steps
            crash = rt.crash_at_step is not None and step == rt.crash_at_step
            ckpt_due = step % rt.ckpt_every == 0 or (rt.checkpoint_at_end and (step == max_steps or end_of_stage))
            if step % rt.log_every == 0 or step == max_steps or end_of_stage or ckpt_due or crash:
                mean = flush_metrics()
                if rank == 0 and (step % rt.log_every == 0 or step == max_steps):
                    now = time.perf_counter()
                    its = (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    parts = " ".join(
                        f"{k} {mean[k]:.4g}" for k in ("loss", "fm", "photo", "geo", "motion", "psnr") if k in mean
                    )
                    print(
                        f"[train] step {step}/{max_steps} stage {stage.name} {parts} | {its:.2f} it/s "
                        f"{its * samples_per_step:.2f} samples/s",
                        flush=True,
                    )
            if crash:
                raise RuntimeError(f"injected crash after step {step}")
            if validator.due(step, end_of_stage, step == max_steps):
                validate(stage, stage_index)
            if ckpt_due:
                nxt = (stage_index + 1, 0) if end_of_stage else (stage_index, in_stage)
                checkpoint(*nxt)
        del it, loader
        if in_stage >= stage.steps:
            stage_index, in_stage = stage_index + 1, 0
    if writer is not None:
        writer.close()
    try:
        from ray import train as ray_train

        if ray_train.get_context().get_world_size() >= 1 and config.get("_ray"):
            ray_train.report({"step": step})
    except Exception:
        pass


def tensorboard_writer(workdir: str):
    """A SummaryWriter on WORKDIR/tb, or None with one line saying why (tensorboard not installed,
    or a workdir that is not a local folder: SummaryWriter writes local files only)."""
    tb_dir = _join(workdir, "tb")
    why = None
    if "://" in tb_dir:
        why = f"the workdir {workdir} is not a local folder (metrics.jsonl has every scalar)"
    else:
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(tb_dir)
        except ImportError:
            why = "tensorboard is not installed (pip install 'd4s[train]'; metrics.jsonl has every scalar)"
        except Exception as exc:  # noqa: BLE001 - logging must not stop training
            why = f"{type(exc).__name__}: {exc} (metrics.jsonl has every scalar)"
    print(f"[train] TensorBoard off: {why}", flush=True)
    return None


def refuse_another_model(cfg: TrainConfig, state: dict, path: str) -> None:
    """A workdir's checkpoint of another model (weight-shaping fields differ) is not resumed: its
    weights would be re-split (another head count) or not fit (another width)."""
    from training.load import CheckpointError, shaping_differences

    try:
        saved = TrainConfig.model_validate(state["config"])
    except Exception as exc:  # noqa: BLE001 - a checkpoint written by another version of d4s
        raise CheckpointError(f"{path}: its stored config is not a valid training config: {exc}") from None
    diff = shaping_differences(saved, cfg)
    if diff:
        raise CheckpointError(
            f"{cfg.workdir} holds a checkpoint of another model ({path}; checkpoint vs config: "
            f"{'; '.join(diff)}): train in a new workdir, or with the checkpoint's settings"
        )


def _validation_setup(cfg: TrainConfig, rank: int, world: int, device, lpips_fn, text_encoder):
    """(Validator, BestCheckpoint or None); says once when there is nothing held out to validate on."""
    from training.validate import BestCheckpoint, Validator

    if lpips_fn is None and cfg.validation.every > 0:  # measured even when not a loss, if its weights are there
        from training.metrics import load_lpips

        # Building LPIPS draws random numbers (its layers' initialisation), here after a resume
        # restored the random state: on a forked state, so a resumed run draws what the
        # uninterrupted one drew.
        devices = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            lpips_fn = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_torch_home, device)[0]
    validator = Validator(cfg, rank, world, device, lpips_fn, text_encoder)
    if rank == 0 and cfg.validation.every > 0 and not validator.enabled:
        print(
            "[train] validation skipped: no held-out clips (build with datasets.<name>.val_fraction > 0, "
            "or set validation.root / validation.shards)",
            flush=True,
        )
    keep = validator.enabled and cfg.validation.keep_best
    return validator, (BestCheckpoint(cfg.workdir, cfg.validation.best_metric) if keep else None)


def _write_report(workdir: str) -> None:
    """WORKDIR/report.html; a failure to draw it is reported, never fatal to training."""
    try:
        from training.report import write_training_report

        write_training_report(workdir)
    except Exception as exc:  # noqa: BLE001 - the report is a convenience
        print(f"[train] could not write the training report: {type(exc).__name__}: {exc}", flush=True)


def train_step(
    ddp,
    model,
    opt,
    sched,
    it,
    stage,
    cfg: TrainConfig,
    device: torch.device,
    *,
    rasterize,
    lpips_fn=None,
    text_encoder=None,
    fsdp: bool = False,
    distributed: bool = False,
    autocast: bool = False,
) -> tuple[dict[str, list], torch.Tensor | None]:
    """One optimiser step over ``optim.grad_accum`` micro-batches drawn from ``it``.

    -> ({metric: [sum, count]} over the micro-steps, sums as device tensors; the pre-clip global gradient
    norm as a device tensor, or None without clipping). Nothing is read back from the device here (the
    caller reduces the metrics at log time), so the host can queue the next step's work while the GPU
    runs this one. Phases are labelled for torch.profiler (``d4s/...``). ``bench/bench_speed.py`` times
    this same function.
    """
    from training.speed import attention_context
    from training.text import embed_captions

    accum = cfg.optim.grad_accum
    agg: dict[str, list] = {}
    with attention_context(cfg.runtime.attention_backend):
        for micro in range(accum):
            with record_function("d4s/loader"):
                batch = next(it)
            batch["text"], batch["use_text"] = embed_captions(
                text_encoder, batch["caption"], cfg.backbone.caption_dropout
            )
            batch = _to_device(batch, device)
            sync = micro == accum - 1 or not distributed
            if fsdp:  # FSDP2 has no no_sync(): keep unsharded grads locally until the last micro-step
                model.set_requires_gradient_sync(sync)
                ctx = _null()
            else:
                ctx = ddp.no_sync() if (not sync and hasattr(ddp, "no_sync")) else _null()
            with ctx:
                loss, met = ddp(batch, stage=stage, rasterize=rasterize, lpips_fn=lpips_fn, autocast=autocast)
                with record_function("d4s/backward"):
                    (loss / accum).backward()
            for k, (total, count) in met.items():
                a = agg.setdefault(k, [0.0, 0])
                a[0] = a[0] + total
                a[1] += count
    grad_norm = None
    with record_function("d4s/optimizer"):
        if cfg.optim.grad_clip > 0:
            # Under FSDP2 the grads are DTensor shards: the norm is reduced over ranks (a collective).
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None], cfg.optim.grad_clip
            )
            grad_norm = _full_tensor(norm).detach()  # pre-clip global norm, the same on every rank
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return agg, grad_norm


def reduce_metrics(agg: dict[str, list], device: torch.device) -> dict[str, float]:
    """{metric: [sum, count]} of this rank's micro-steps -> {metric: mean over all ranks' counted entries}.

    One all-reduce of a fixed-length vector (sums, then counts, in :data:`training.model.METRICS` order)
    whatever terms this rank's batches had; a metric counted nowhere is left out, on every rank alike.
    Sums may be floats or tensors (on any device).
    """
    return reduce_metrics_steps([agg], device)[0]


def reduce_metrics_steps(aggs: list[dict[str, list]], device: torch.device) -> list[dict[str, float]]:
    """:func:`reduce_metrics` for several steps at once: one all-reduce of a (steps, 2 x metrics) matrix
    and one read back to the host, instead of one of each per step."""
    from training.model import METRICS

    rows = []
    for agg in aggs:
        unknown = set(agg) - set(METRICS)
        if unknown:
            raise KeyError(f"metrics outside training.model.METRICS: {sorted(unknown)}")
        sums = [agg.get(k, (0.0, 0))[0] for k in METRICS]
        sums = [torch.as_tensor(x).to(device=device, dtype=torch.float64) for x in sums]
        counts = torch.tensor([agg.get(k, (0.0, 0))[1] for k in METRICS], dtype=torch.float64, device=device)
        rows.append(torch.cat([torch.stack(sums), counts]))
    vals = torch.stack(rows)
    if dist.is_available() and dist.is_initialized():
        on_gpu = device.type == "cuda" and dist.get_backend() == "nccl"
        vals = vals if on_gpu else vals.cpu()
        dist.all_reduce(vals)
    vals = vals.cpu()
    n = len(METRICS)
    return [{k: float(v[i] / v[n + i]) for i, k in enumerate(METRICS) if v[n + i] > 0} for v in vals]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# per-sample flags the model reads as Python booleans: left on the host, where reading them costs no sync
HOST_KEYS = ("has_depth", "has_tracks")


def _to_device(batch: dict, device) -> dict:
    """The batch on ``device``, flags in :data:`HOST_KEYS` left on the host; uint8 video (the loader's) is
    made float in [0, 1] there, after the copy (a quarter of the bytes moved)."""
    out = {
        k: (v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_KEYS else v)
        for k, v in batch.items()
    }
    if out["video"].dtype == torch.uint8:
        out["video"] = out["video"].float() / 255.0
    return out


_TAILS_CHECKED: set[str] = set()


def _drop_partial_tail(fs, path: str) -> None:
    """A line cut short by a kill mid-write is removed (once per file and process), so the next
    row starts a line of its own instead of extending the broken one."""
    size = fs.size(path)
    if not size:
        return
    with fs.open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
    data = fs.cat_file(path)
    keep = data[: data.rfind(b"\n") + 1]
    with fs.open(path, "wb") as f:
        f.write(keep)


def _append_jsonl(url: str, row: dict) -> None:
    fs, path = _fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if url not in _TAILS_CHECKED and fs.exists(path):
        _drop_partial_tail(fs, path)
    _TAILS_CHECKED.add(url)
    mode = "ab" if fs.exists(path) else "wb"
    try:
        with fs.open(path, mode) as f:
            f.write((strict_json.dumps(row) + "\n").encode())
    except (NotImplementedError, ValueError):  # object stores without append: rewrite
        old = fs.cat_file(path) if fs.exists(path) else b""
        with fs.open(path, "wb") as f:
            f.write(old + (strict_json.dumps(row) + "\n").encode())


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_fsdp(model, device: torch.device) -> None:
    """FSDP2: one shard group per transformer block (backbone and LDRM), the root group for the rest.

    Ranks seed differently, so their freshly initialised weights differ: rank 0's are broadcast first
    (what DDP's constructor does), otherwise every rank would keep its own slice of a different model.
    The frozen VAE is ignored by FSDP: not sharded, not in the optimiser, replicated on every rank.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in itertools.chain(model.backbone.transformer.transformer_blocks, model.ldrm.blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(model.backbone.vae.parameters()))


def _optim_fqns(model, opt) -> list[str]:
    """Parameter names in the optimiser's order (= the integer keys of ``opt.state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _model_state(model, fsdp: bool) -> dict:
    if fsdp:  # gathered full tensors on rank 0 (CPU), {} elsewhere; keys as model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _optim_state(model, opt, fsdp: bool) -> dict:
    if fsdp:
        # The helper keys state by parameter name; the checkpoint keeps torch's integer keys (the DDP and
        # local format) so that any kind of run can load it.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not osd:  # ranks other than 0
            return {}
        index = {n: i for i, n in enumerate(_optim_fqns(model, opt))}
        return {
            "state": {index[n]: v for n, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]],
        }
    return opt.state_dict()


def _load_model(model, sd: dict, fsdp: bool) -> None:
    if fsdp:  # every rank holds the full state dict; each keeps its shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(sd)


def _load_optim(model, opt, sd: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        fqns = _optim_fqns(model, opt)
        named = {
            "state": {fqns[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in sd["param_groups"]],
        }
        # strict=False: parameters frozen so far (the deformation head before stage 3) have no saved state.
        set_optimizer_state_dict(model, opt, named, options=StateDictOptions(full_state_dict=True, strict=False))
        # The helper first runs a zero-lr step to create state for every trainable parameter; drop it where
        # the checkpoint had none, so such a parameter starts fresh (AdamW step 0) as after a plain load.
        params = [p for g in opt.param_groups for p in g["params"]]
        for p, n in zip(params, fqns):
            if n not in named["state"]:
                opt.state.pop(p, None)
        return
    opt.load_state_dict(sd)


# --- launchers ------------------------------------------------------------------------------------
def run_local(cfg: TrainConfig) -> None:
    """One process, no process group (world size 1)."""
    train_loop_per_worker({"cfg": cfg.model_dump(mode="json")})


def ray_storage_path(workdir: str) -> str:
    """Where Ray Train keeps its own run bookkeeping: ``workdir/ray`` for a local (or shared) workdir.

    The training state is ours (checkpoints, metrics in ``workdir``, written through fsspec); this
    function never passes Ray Train a checkpoint, so its storage holds only bookkeeping. For an
    object-store workdir that goes to a node-local directory named after the workdir, which keeps
    Ray Train's pyarrow filesystem layer off the object store: one writer per store, the fsspec one
    that the tests prove against an S3 server.
    """
    if "://" not in workdir:
        return os.path.abspath(_join(workdir, "ray"))
    import hashlib

    from pipeline.private_tmp import private_temp_dir

    return os.path.join(private_temp_dir("d4s-ray-train"), hashlib.sha1(workdir.encode()).hexdigest()[:16])


def run_ray(cfg: TrainConfig) -> None:
    """Ray Train ``TorchTrainer`` with ``runtime.num_workers`` ranks (gloo on CPU, nccl on GPU)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    rt = cfg.runtime
    started = False
    if not ray.is_initialized():
        address = rt.ray_address or os.environ.get("RAY_ADDRESS")
        # address="local": start our own Ray; never join one that another process left running (that
        # one would reject num_cpus, or worse, run this job among somebody else's).
        kw = (
            dict(address=address)
            if address
            else dict(address="local", num_cpus=max(rt.num_workers, os.cpu_count() or 1), include_dashboard=False)
        )
        env = {
            "env_vars": {
                "PYTHONPATH": os.pathsep.join(
                    p for p in [os.getcwd(), _repo_root(), os.environ.get("PYTHONPATH", "")] if p
                )
            }
        }
        ray.init(runtime_env=env, logging_level="ERROR", **kw)
        started = True
    backend = rt.backend if rt.backend != "auto" else ("nccl" if rt.use_gpu else "gloo")
    storage = ray_storage_path(cfg.workdir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "_ray": True},
        scaling_config=ScalingConfig(
            num_workers=rt.num_workers,
            use_gpu=rt.use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": rt.gpus_per_worker} if rt.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(storage_path=storage, name="d4s"),
    )
    try:
        trainer.fit()
    finally:
        if started:
            ray.shutdown()


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def absolute_local_paths(cfg: TrainConfig) -> TrainConfig:
    """Relative local paths made absolute against the driver's working directory.

    Ray Train ranks run in other working directories (and on other machines), where a relative
    ``data.root`` or ``workdir`` would name nothing or the wrong thing. URLs are left alone.
    """

    def fix(p: str | None) -> str | None:
        return p if p is None or "://" in p or os.path.isabs(p) else os.path.abspath(p)

    return cfg.model_copy(
        update={
            "workdir": fix(cfg.workdir),
            "data": cfg.data.model_copy(
                update={"root": fix(cfg.data.root), "shards": [fix(p) for p in cfg.data.shards]}
            ),
            "backbone": cfg.backbone.model_copy(
                update={
                    "pretrained_dir": fix(cfg.backbone.pretrained_dir),
                    "text_encoder_dir": fix(cfg.backbone.text_encoder_dir),
                }
            ),
            "loss": cfg.loss.model_copy(update={"lpips_torch_home": fix(cfg.loss.lpips_torch_home)}),
            "validation": cfg.validation.model_copy(
                update={"root": fix(cfg.validation.root), "shards": [fix(p) for p in cfg.validation.shards]}
            ),
        }
    )


def train(cfg: TrainConfig) -> None:
    cfg = absolute_local_paths(cfg)
    if cfg.runtime.launcher == "local" or (cfg.runtime.num_workers <= 1 and cfg.runtime.launcher != "ray"):
        run_local(cfg)
    else:
        run_ray(cfg)


if __name__ == "__main__":  # pragma: no cover
    from training.config import load_config

    train(load_config(sys.argv[1]))
