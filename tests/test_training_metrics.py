"""Logged metrics are rank-safe: every rank reduces the same fixed key set, with counts, so a term that
only some ranks' batches have (motion: tracks) is averaged over the samples that have it."""

import json
import os
import socket

import numpy as np
import torch

from training.config import make_config


def _batch(tracks: bool, seed: int = 0):
    from training.data import collate, process
    from training.synthetic import make_clip

    clip = make_clip(seed, t=5, size=24, dynamic=True)
    if not tracks:
        clip.tracks = clip.track_visible = None
    return collate([process(clip, list(range(5)), 24, 16, np.random.default_rng(seed))])


def _forward(tracks: bool):
    from training.model import Diff4Splat
    from training.render_torch import rasterize

    cfg = make_config("tiny")
    torch.manual_seed(0)
    model = Diff4Splat(cfg)
    stage = cfg.stages[-1]  # every loss, motion included
    assert "motion" in stage.losses
    return model(_batch(tracks), stage=stage, rasterize=rasterize)


def test_fixed_metric_keys_with_counts():
    from training.model import METRICS

    _, with_tracks = _forward(True)
    _, without = _forward(False)
    assert list(with_tracks) == list(without) == list(METRICS)
    assert with_tracks["motion"][1] == 1 and without["motion"] == (0.0, 0)
    assert without["photo"][1] == 1 and without["fm"][1] == 1


def _rank(rank, port, out):
    import torch.distributed as dist

    from training.trainer import reduce_metrics

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _, met = _forward(tracks=rank == 0)  # only rank 0's batch has tracks
        mean = reduce_metrics({k: list(v) for k, v in met.items()}, torch.device("cpu"))
        local = {k: [float(s), c] for k, (s, c) in met.items()}  # sums are tensors (no device read in the step)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"local": local, "mean": mean}, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_whose_batches_differ_in_tracks(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert r[0]["mean"] == r[1]["mean"]  # every rank logs the same numbers
    mean = r[0]["mean"]
    # motion: rank 0's value alone (the only sample with tracks), not halved, not rank 1's loss
    assert abs(mean["motion"] - r[0]["local"]["motion"][0]) < 1e-9
    assert abs(mean["loss"] - (r[0]["local"]["loss"][0] + r[1]["local"]["loss"][0]) / 2) < 1e-9
    assert abs(mean["photo"] - (r[0]["local"]["photo"][0] + r[1]["local"]["photo"][0]) / 2) < 1e-9


def test_tensorboard_off_says_why(tmp_path, monkeypatch, capsys):
    """runtime.tensorboard on, but no tb/ written (tensorboard not installed, or a remote workdir):
    that was silent; the run now says why in one line, and writes the scalars when it can."""
    import sys

    from training.trainer import tensorboard_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    assert tensorboard_writer(str(tmp_path)) is None
    out = capsys.readouterr().out
    assert "TensorBoard off" in out and "pip install" in out
    monkeypatch.undo()
    assert tensorboard_writer("s3://bucket/run") is None
    out = capsys.readouterr().out
    assert "TensorBoard off" in out and "s3://bucket/run" in out and "metrics.jsonl" in out


def test_a_metrics_line_cut_by_a_kill_is_dropped_before_the_next_append(tmp_path):
    """A kill mid-write leaves a partial last line; the resumed run appended its next row onto it,
    leaving a broken line in the middle of metrics.jsonl (train-report then refused the file)."""
    import json

    from training.trainer import _append_jsonl

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    _append_jsonl(str(p), {"step": 2, "loss": 0.4})
    _append_jsonl(str(p), {"step": 3, "loss": 0.3})
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2, 3]
