"""``WORKDIR/report.html``: a training run's curves in one self-contained page.

Read from ``metrics.jsonl`` (training rows, one per step; validation rows, ``"kind": "val"``) and
``ckpt/best.json``. Plots (matplotlib, embedded as PNG): the loss terms, the training render PSNR, and
every validation measure over steps (reconstruction and sampled latents side by side), with the
curriculum's stage boundaries; a table of the last validation and the best checkpoint. A resumed run
appends rows for steps it repeats: the last row of a step wins, as in the trainer's own reading.
Rewritten by rank 0 after every validation (``validation.report``); ``d4s train-report WORKDIR`` draws it
on demand.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json

TRAIN_TERMS = ("loss", "fm", "photo", "geo", "motion")
VAL_FAMILIES = (
    ("psnr", "PSNR (dB)"),
    ("ssim", "SSIM"),
    ("lpips", "LPIPS"),
    ("depth_abs_rel", "depth AbsRel"),
    ("depth_delta_1_25", "depth δ<1.25"),
    ("track_epe_m", "track EPE (m)"),
)


class MetricsError(ValueError):
    """A ``metrics.jsonl`` that cannot be read; the message names the file and the line."""


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows), each sorted by step, the last row of a repeated step kept.

    A last line that is not a row (a run stopped while writing it) is skipped with a warning on
    stderr; any other line that is not a row is a :class:`MetricsError` naming it."""
    import sys

    from training.trainer import _fs, _join

    url = _join(workdir, "metrics.jsonl")
    fs, path = _fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{workdir} has no metrics.jsonl: not a training workdir, or no step done yet")
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    with fs.open(path, "rb") as f:
        data = f.read()
    lines = [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    for n, line in lines:
        try:
            row = json.loads(line.decode())
            step = int(row["step"]) if isinstance(row, dict) and not isinstance(row["step"], bool) else None
        except (ValueError, KeyError, TypeError) as exc:  # JSON, UTF-8 (ValueError), no or no whole 'step'
            why, step = f"{type(exc).__name__}: {exc}", None
        else:
            why = "not a row with a step" if step is None else ""
        if step is None:
            if n == lines[-1][0]:
                print(
                    f"warning: {url}: line {n}, the last, is not a whole row (a run stopped while writing "
                    "it?); skipped",
                    file=sys.stderr,
                )
                continue
            raise MetricsError(f"{url}: line {n} is not a metrics row ({why[:200]})")
        (val if row.get("kind") == "val" else train)[step] = row
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _stage_lines(ax, train: list[dict]) -> None:
    for a, b in itertools.pairwise(train):
        if a.get("stage") != b.get("stage"):
            ax.axvline(a["step"] + 0.5, color="#999", lw=0.8, ls="--")


def plots(train: list[dict], val: list[dict]) -> list[str]:
    """The figures as inline ``<img>`` tags."""
    return [_png(fig) for _, fig in figures(train, val)]


def figures(train: list[dict], val: list[dict]) -> list[tuple[str, object]]:
    """[(name, matplotlib figure)]: ``training`` (loss terms, render PSNR), ``validation`` (every measure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if train:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
        steps = [r["step"] for r in train]
        for k in TRAIN_TERMS:
            pts = [(r["step"], r[k]) for r in train if k in r]
            if pts:
                axes[0].plot(*zip(*pts), label=k, lw=1)
        axes[0].set_yscale("log")
        axes[0].set_title("training loss terms")
        axes[0].legend(fontsize=7)
        axes[1].plot(steps, [r.get("psnr", float("nan")) for r in train], lw=1, label="render PSNR (training batch)")
        axes[1].set_title("training render PSNR (dB)")
        for ax in axes:
            ax.set_xlabel("step")
            _stage_lines(ax, train)
        out.append(("training", fig))
    if val:
        fig, axes = plt.subplots(2, 3, figsize=(12, 5.5))
        for ax, (fam, title) in zip(axes.ravel(), VAL_FAMILIES):
            series = [(how, fam, style) for how, style in (("recon", "-o"), ("sample", "--s"))]
            if fam == "depth_abs_rel":  # with the median-scaled diagnostic beside it
                series += [("recon", "depth_abs_rel_scaled", ":^")]
            for how, name, style in series:
                pts = [(r["step"], r[f"{how}_{name}"]) for r in val if f"{how}_{name}" in r]
                if pts:
                    ax.plot(*zip(*pts), style, ms=3, lw=1, label=how + (" (median-scaled)" if name != fam else ""))
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            _stage_lines(ax, train)
            if any(not ln.get_label().startswith("_") for ln in ax.lines):
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="#888")
        fig.suptitle(
            "validation (held-out clips): recon = own latents, sample = latents sampled from frame 0 + cameras"
        )
        fig.tight_layout()
        out.append(("validation", fig))
    return out


def render(workdir: str) -> str:
    from training.trainer import _fs, _join

    train, val = read_metrics(workdir)
    best = None
    fs, path = _fs(_join(workdir, "ckpt", "best.json"))
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            best = json.loads(f.read())
    esc = html.escape
    parts = [
        f"<h1>Training: {esc(workdir)}</h1>",
        f"<p>{len(train)} steps logged"
        + (f", last step {train[-1]['step']} (stage {esc(str(train[-1].get('stage')))})" if train else "")
        + f"; {len(val)} validations.</p>",
    ]
    parts += plots(train, val)
    if val:
        last = val[-1]
        rows = "".join(
            f"<tr><td>{esc(k)}</td><td>{v:.4g}</td></tr>"
            for k, v in last.items()
            if isinstance(v, float) and k != "time"
        )
        parts.append(f"<h2>Last validation (step {last['step']}, {last.get('clips')} clips)</h2><table>{rows}</table>")
    if best:
        parts.append(
            f"<p>Best checkpoint: <code>ckpt/best.pt</code>, step {best['step']}, "
            f"{esc(best['metric'])} = {best['value']:.4g}.</p>"
        )
    style = (
        "body{font-family:sans-serif;margin:1.5em;max-width:1300px}img{max-width:100%}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 8px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>d4s training</title><style>{style}</style>"
        f"</head><body>{''.join(parts)}</body></html>"
    )


def write_training_report(workdir: str) -> str:
    """Write ``WORKDIR/report.html`` atomically; returns its path."""
    from training.trainer import _join, write_atomic

    url = _join(workdir, "report.html")
    write_atomic(url, render(workdir).encode())
    return url
