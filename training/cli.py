"""Entry point behind ``d4s train CONFIG.yaml`` and ``d4s train --demo OUT --max-steps N --workdir DIR``."""

from __future__ import annotations

import os
import sys
import traceback

from training.config import TrainConfig, TrainConfigError, load_config, make_config


def build_config(
    config_path: str | None, demo_out: str | None, max_steps: int | None, workdir: str | None
) -> TrainConfig:
    if max_steps is not None and max_steps < 1:
        raise TrainConfigError(f"--max-steps must be at least 1, got {max_steps}")
    if config_path:
        cfg = load_config(config_path)
        if demo_out:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": demo_out})})
    elif demo_out:
        # the tiny CPU config on the demo build's shards, 2 gloo workers under a local Ray
        cfg = make_config("tiny", data={"root": demo_out}, workdir=workdir or os.path.join(demo_out, "train"))
    else:
        raise ValueError("give a config file or --demo OUT")
    upd = {}
    if workdir:
        upd["workdir"] = workdir
    if max_steps is not None:
        upd["max_steps"] = max_steps
    if not upd:
        return cfg
    from pydantic import ValidationError

    from pipeline.config_errors import one_line

    try:
        return TrainConfig.model_validate({**cfg.model_dump(), **upd})
    except ValidationError as exc:
        raise TrainConfigError(one_line(exc, TrainConfig, "training config")) from None


def check_data(cfg: TrainConfig, config_path: str | None, demo_out: str | None) -> None:
    """The training shards resolve (:func:`training.data.resolve_catalog`), checked before Ray or any
    worker starts; otherwise one :class:`TrainConfigError` line naming ``--demo`` or the config's key."""
    from training.data import resolve_catalog

    d = cfg.data
    if demo_out:
        where = f"--demo {demo_out}"
    elif d.root:
        where = f"{config_path}: data.root {d.root}"
    elif d.shards:
        where = f"{config_path}: data.shards"
    else:
        raise TrainConfigError(f"{config_path}: no training data: set data.root (a build's output) or data.shards")
    local_root = d.root if d.root and "://" not in d.root else None
    if local_root and not os.path.isdir(local_root):
        what = "a file, not" if os.path.exists(local_root) else "no such folder: not"
        raise TrainConfigError(f"{where}: {what} a d4s build output")
    try:
        cat = resolve_catalog(d)
    except FileNotFoundError as exc:
        raise TrainConfigError(f"{where}: {'not a d4s build output: ' if d.root else ''}{exc}") from None
    except (ValueError, OSError) as exc:  # a shard path leaving the output, an unreadable index
        raise TrainConfigError(f"{where}: {type(exc).__name__}: {exc}") from None
    urls = [u for lst in cat.shards.values() for u in lst]
    if not urls:
        raise TrainConfigError(f"{where}: index.parquet lists no training samples (every scene is held out)")
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        fix = "; run `d4s verify` on the output" if d.root else ""
        raise TrainConfigError(f"{where}: shard {missing[0]} is not there{more}{fix}")


def train_main(
    config_path: str | None = None,
    demo_out: str | None = None,
    max_steps: int | None = None,
    workdir: str | None = None,
) -> int:
    """Train (or resume) and return a process exit code; prints what it resumed from."""
    from training.trainer import latest_checkpoint, train

    try:
        cfg = build_config(config_path, demo_out, max_steps, workdir)
    except Exception as e:  # bad config: one clear line
        print(f"d4s train: {e}", file=sys.stderr)
        return 2
    from pipeline.deps import MissingPackages, check, train_needs

    try:
        check(train_needs(cfg), "d4s train")
    except MissingPackages as e:  # every missing package at once, before any work
        print(f"d4s train: {e}", file=sys.stderr)
        return 2
    try:  # the data, before Ray and its workers start (a worker's traceback would say it)
        check_data(cfg, config_path, demo_out)
    except TrainConfigError as e:
        print(f"d4s train: {e}", file=sys.stderr)
        return 2
    from training.load import CheckpointError, read_checkpoint
    from training.trainer import refuse_another_model

    try:  # before any worker starts: one line, not a worker's traceback
        ck = latest_checkpoint(cfg.workdir)
        state = read_checkpoint(ck) if ck else None
        if state is not None:
            refuse_another_model(cfg, state, ck)
    except CheckpointError as e:
        print(f"d4s train: {e}", file=sys.stderr)
        return 2
    if ck:
        step = state["step"]
        print(f"d4s train: resumed from checkpoint {ck} (step {step})", flush=True)
        if step >= min(cfg.total_steps, cfg.max_steps or cfg.total_steps):
            print(f"d4s train: nothing to do, already at step {step}", flush=True)
            return 0
    else:
        print(
            f"d4s train: starting in {cfg.workdir} ({cfg.runtime.launcher}, {cfg.runtime.num_workers} worker(s), "
            f"{cfg.total_steps} curriculum steps{f', stopping at {cfg.max_steps}' if cfg.max_steps else ''})",
            flush=True,
        )
    try:
        train(cfg)
    except Exception as e:
        refused = write_refused(e)
        if refused is not None:  # the node's fault, not the code's: one line naming the file
            rank, exc = refused
            who = f"rank {rank} " if rank is not None else ""
            where = f" {exc.filename}" if exc.filename else ""
            print(
                f"d4s train: stopped: {who}cannot write{where}: {exc.strerror or exc}; the checkpoints written are "
                "kept: fix it (free space, quota, permissions) and run `d4s train` again to resume",
                file=sys.stderr,
            )
            return 5
        traceback.print_exc()
        print(f"d4s train: failed: {e}", file=sys.stderr)
        return 1
    ck = latest_checkpoint(cfg.workdir)
    print(f"d4s train: done; last checkpoint {ck}", flush=True)
    return 0


def write_refused(exc: BaseException, rank: int | None = None, depth: int = 0) -> tuple[int | None, OSError] | None:
    """(rank or None, the OSError) when ``exc`` is, or wraps, a write the node refused (disk or
    quota full, read-only, file size limit, no file descriptors left), in this process or in a Ray
    Train rank (``WorkerGroupError.worker_failures``, ``ControllerError``, a Ray task's cause)."""
    from pipeline.failures import NODE_RESOURCE_ERRNOS

    if exc is None or depth > 8:
        return None
    if isinstance(exc, OSError) and exc.errno in NODE_RESOURCE_ERRNOS:
        return rank, exc
    for r, inner in sorted((getattr(exc, "worker_failures", None) or {}).items()):
        found = write_refused(inner, r, depth + 1)
        if found:
            return found
    for inner in (
        getattr(exc, "controller_failure", None),
        getattr(exc, "cause", None),
        exc.__cause__,
        exc.__context__,
    ):
        if isinstance(inner, BaseException):
            found = write_refused(inner, rank, depth + 1)
            if found:
                return found
    return None


def main(argv: list[str] | None = None) -> int:  # python -m training.cli
    import argparse

    p = argparse.ArgumentParser("d4s train")
    p.add_argument("config", nargs="?")
    p.add_argument("--demo")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--workdir")
    a = p.parse_args(argv)
    return train_main(a.config, a.demo, a.max_steps, a.workdir)


if __name__ == "__main__":
    sys.exit(main())
