"""``d4s report OUT``: one self-contained HTML page about a build, drawn from its manifests alone.

The page (``OUT/report.html``) has a summary, clips per dataset, frames and bytes per clip,
depth range, alignment residual / AbsRel, ground-truth self-check, QC drops by reason,
throughput over time, stage time and the failures table. Its data comes from
:func:`pipeline.status.collect_status` and the ledger's events (their per-sample ``clip_qc``
records); only the gallery (:mod:`pipeline.gallery`, a few clips per dataset) reads samples from
the shards. Plots are
drawn with matplotlib (Agg, no display needed) and embedded as base64 PNGs, the style is inline,
and every string taken from the manifests is HTML-escaped, so the file can be mailed or opened
from an object store as it is.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from collections import defaultdict

import numpy as np

from manifests.store import ManifestStore
from pipeline.gallery import GALLERY_CLIPS_DEFAULT, render_gallery
from pipeline.stage_routes import STAGE_ORDER
from pipeline.status import collect_status
from pipeline.storage import Store

REPORT_NAME = "report.html"
MAX_FAILURE_ROWS = 500
MAX_DROP_CATEGORIES = 40

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
td.reason,td.path{word-break:break-all;max-width:36em}
img{max-width:100%;height:auto;display:block;margin:.6em 0}
.note{color:#666;font-style:italic} .meta{color:#555;font-size:.9em}
.bad{color:#b00020;font-weight:600} .good{color:#1b7a1b;font-weight:600}
"""

# Counts the images the browser actually decoded (complete and non-zero width) into
# body[data-images-loaded]; harmless for readers, and lets a headless browser prove the plots render.
_SCRIPT = """
(function(){function count(){var n=0,im=document.images;for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0){n++;}}
document.body.setAttribute('data-images-loaded',String(n));document.body.setAttribute('data-images-total',String(im.length));}
count();window.addEventListener('load',count);})();
"""


def _esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(rec: dict, *path):
    for p in path:
        if not isinstance(rec, dict):
            return None
        rec = rec.get(p)
    return float(rec) if _num(rec) else None


def _lbl(v) -> str:
    """Text from the manifests for a plot: drawn literally ("$" does not start mathtext)."""
    return str(v).replace("$", r"\$")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def _fmt_secs(s: float | None) -> str:
    if s is None or not _num(s):
        return "-"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{s:.1f} s")


def _utc(ts: float | None) -> str:
    if not _num(ts):
        return "-"
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- data -----------------------------------------------------------------------------------
def _current_done_events(events: list[dict]) -> list[dict]:
    """The latest event of every shard, when it is ``done`` (what the shards on disk hold)."""
    latest: dict[str, dict] = {}
    for e in events:
        latest[e["shard_id"]] = e
    return [e for e in latest.values() if e["state"] == "done"]


def _qc_records(done: list[dict]) -> list[dict]:
    recs = []
    for e in done:
        for r in e.get("clip_qc") or []:
            if isinstance(r, dict):
                recs.append(r)
    return recs


def _by_dataset(records: list[dict], *path) -> dict[str, np.ndarray]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        v = _get(r, *path)
        if v is not None:
            groups[str(r.get("dataset", "?"))].append(v)
    return {d: np.asarray(v, dtype=np.float64) for d, v in sorted(groups.items())}


def _builds(events: list[dict]) -> list[dict]:
    """Per build_id (in order of first appearance): start, end, shards, clips (as ``d4s status``
    counts them: :func:`pipeline.status.build_window`) and the cumulative curve of done shards."""
    from pipeline.status import build_window

    per: dict[str, list[dict]] = {}
    for e in events:
        per.setdefault(e.get("build_id") or "?", []).append(e)
    out = []
    for bid, evs in per.items():
        curve = sorted(
            (e["finished_at"], (e.get("samples_written") or 0) + len(e.get("clips_failed") or []))
            for e in evs
            if e["state"] == "done" and _num(e.get("finished_at"))
        )
        start, end, clips = build_window(evs)
        secs = (end - start) if (start is not None and end is not None) else None
        out.append(
            {
                "build_id": bid,
                "start": start,
                "end": end,
                "shards_done": len(curve),
                "shards_failed": sum(1 for e in evs if e["state"] == "failed"),
                "clips": clips,
                "seconds": secs,
                "clips_per_s": clips / secs if secs and secs > 0 else None,
                "curve": curve,
            }
        )
    return out


# -- plotting -------------------------------------------------------------------------------
class _Plots:
    """Figures rendered to base64 PNG ``<img>`` tags with stable ids."""

    def __init__(self, datasets: list[str]):
        import matplotlib

        cmap = matplotlib.colormaps["tab10"]
        self.colors = {d: cmap(i % 10) for i, d in enumerate(sorted(datasets))}
        self.count = 0

    def figure(self, width: float = 8.0, height: float = 3.6, ncols: int = 1):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(width, height), dpi=100)
        FigureCanvasAgg(fig)  # the Agg canvas, whatever the default backend (no display, thread-safe per figure)
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        return fig, list(axes)

    def img(self, fig, img_id: str, alt: str) -> str:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.count += 1
        b64 = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img id="{_esc(img_id)}" alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'

    @staticmethod
    def log_x(ax) -> None:
        """Log x axis with plain labels at 1, 2, 5 x 10^k (no overlapping minor labels)."""
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())

    @staticmethod
    def integer_axis(axis) -> None:
        from matplotlib.ticker import MaxNLocator

        axis.set_major_locator(MaxNLocator(integer=True))

    def color(self, ds: str):
        return self.colors.get(ds, "0.5")

    def stacked_hist(self, ax, groups: dict[str, np.ndarray], integer: bool = False, log_x: bool = False):
        groups = {d: v for d, v in groups.items() if v.size}
        allv = np.concatenate(list(groups.values()))
        if integer and allv.max() - allv.min() <= 80:
            bins = np.arange(math.floor(allv.min()) - 0.5, math.ceil(allv.max()) + 1.5)
        elif log_x:
            lo, hi = float(allv.min()), float(allv.max())
            bins = np.geomspace(lo, hi * 1.0001 if hi > lo else lo * 1.5, 31)
            self.log_x(ax)
        else:
            bins = np.histogram_bin_edges(allv, bins=int(np.clip(np.sqrt(allv.size), 5, 40)))
        names = list(groups)
        ax.hist(
            [groups[d] for d in names],
            bins=bins,
            stacked=True,
            label=[_lbl(d) for d in names],
            color=[self.color(d) for d in names],
        )
        ax.set_ylabel("clips")
        self.integer_axis(ax.yaxis)
        if len(names) > 1:
            ax.legend(fontsize=7)


# -- html pieces ----------------------------------------------------------------------------
def _table(
    header: list[str], rows: list[list], numeric: set[int] = frozenset(), classes: dict[int, str] | None = None
) -> str:
    classes = classes or {}
    out = ["<table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = "n" if i in numeric else classes.get(i)
            cells.append(f'<td class="{cls}">{_esc(v)}</td>' if cls else f"<td>{_esc(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _section(sec_id: str, title: str, body: str) -> str:
    return f'<section id="{_esc(sec_id)}"><h2>{_esc(title)}</h2>{body}</section>'


# -- sections -------------------------------------------------------------------------------
def _summary(st: dict, builds: list[dict]) -> str:
    ds = st["datasets"]
    tot = {k: sum(c[k] for c in ds.values()) for k in ("clips_done", "clips_failed", "clips_pending")}
    sh = st["shards"]
    tp = st["throughput"]
    parts = [
        _table(
            ["", "done", "failed", "running", "pending"],
            [
                ["shards", sh["done"], sh["failed"], sh["running"], sh["pending"]],
                ["clips", tot["clips_done"], tot["clips_failed"], "", tot["clips_pending"]],
            ],
            numeric={1, 2, 3, 4},
        )
    ]
    if tp.get("clips_per_s"):
        eta = tp.get("eta_s")
        parts.append(
            f"<p>Latest build <code>{_esc(tp['build_id'])}</code>: {tp['clips']} clips in "
            f"{_esc(_fmt_secs(tp['seconds']))} = <b>{tp['clips_per_s']:.3g} clips/s</b>; "
            + (
                f"stopped with {tp['clips_left']} clips pending (no driver holds the output: "
                "<code>d4s resume</code> continues)."
                if tp.get("stopped")
                else "nothing left to do."
                if not eta
                else f"ETA {_esc(_fmt_secs(eta))} for what is pending."
            )
            + "</p>"
        )
    else:
        parts.append(_note("No finished shard in the latest build yet: no throughput."))
    state = (
        '<span class="good">complete</span>'
        if sh["pending"] == 0 and sh["failed"] == 0
        else '<span class="bad">incomplete</span>'
    )
    parts.append(f"<p>Output state: {state} ({sh['done']} of {sum(sh.values())} shards done).</p>")
    if builds:
        rows = [
            [
                b["build_id"],
                _utc(b["start"]),
                b["shards_done"],
                b["shards_failed"],
                b["clips"],
                _fmt_secs(b["seconds"]),
                f"{b['clips_per_s']:.3g}" if b["clips_per_s"] else "-",
            ]
            for b in builds
        ]
        parts.append(
            "<p>Builds (each <code>d4s build</code> / <code>d4s resume</code>):</p>"
            + _table(
                ["build_id", "started", "shards done", "shards failed", "clips", "duration", "clips/s"],
                rows,
                numeric={2, 3, 4, 6},
            )
        )
    return _section("summary", "Summary", "".join(parts))


def _clips_per_dataset(st: dict, plots: _Plots) -> str:
    ds = st["datasets"]
    if not ds:
        return _section("clips-per-dataset", "Clips per dataset", _note("No dataset planned."))
    names = list(ds)
    fig, (ax,) = plots.figure(8, max(2.2, 0.45 * len(names) + 1.2))
    y = np.arange(len(names))
    left = np.zeros(len(names))
    for key, label, color in (
        ("clips_done", "done", "#2e8b57"),
        ("clips_failed", "failed", "#c0392b"),
        ("clips_pending", "pending", "#bbbbbb"),
    ):
        vals = np.array([ds[d][key] for d in names], dtype=float)
        ax.barh(y, vals, left=left, color=color, label=label)
        left += vals
    ax.set_yticks(y, labels=[_lbl(d) for d in names])
    ax.invert_yaxis()
    ax.set_xlabel("clips")
    plots.integer_axis(ax.xaxis)
    ax.legend(fontsize=8, loc="lower right")
    rows = [[d, c["clips_done"], c["clips_failed"], c["clips_pending"]] for d, c in ds.items()]
    body = plots.img(fig, "fig-clips-per-dataset", "Clips per dataset: done, failed and pending") + _table(
        ["dataset", "done", "failed", "pending"], rows, numeric={1, 2, 3}
    )
    body += "".join(_note(f"{d}: no clips ({why})") for d, why in (st.get("no_clips") or {}).items())
    return _section("clips-per-dataset", "Clips per dataset", body)


def _frames_bytes(records: list[dict], plots: _Plots) -> str:
    frames = _by_dataset(records, "frames")
    size = _by_dataset(records, "bytes")
    if not frames and not size:
        return _section("frames-bytes", "Frames and bytes per clip", _note("No written sample recorded yet."))
    body = []
    if frames:
        fig, (ax,) = plots.figure(8, 3.2)
        plots.stacked_hist(ax, frames, integer=True)
        ax.set_xlabel("frames per clip")
        body.append(plots.img(fig, "fig-frames-per-clip", "Histogram of frames per clip"))
    if size:
        raw = np.concatenate(list(size.values()))
        unit, div = next(
            (u, d) for u, d in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0)) if np.median(raw) >= d or d == 1.0
        )
        scaled = {d: v / div for d, v in size.items()}
        fig, (ax,) = plots.figure(8, 3.2)
        plots.stacked_hist(ax, scaled, log_x=raw.min() > 0 and raw.max() / raw.min() > 50)
        ax.set_xlabel(f"bytes per clip ({unit})")
        body.append(plots.img(fig, "fig-bytes-per-clip", "Histogram of bytes per clip"))
        body.append(
            f"<p>{raw.size} samples, {_esc(_fmt_bytes(float(raw.sum())))} in all; "
            f"median {_esc(_fmt_bytes(float(np.median(raw))))} per clip.</p>"
        )
    return _section("frames-bytes", "Frames and bytes per clip", "".join(body))


def _depth(records: list[dict], plots: _Plots) -> str:
    med = _by_dataset(records, "depth_median_m")
    if not med:
        return _section("depth-range", "Depth range", _note("No written sample has depth."))
    p5 = _by_dataset(records, "depth_p5_m")  # written together with the median (manifests/clip_qc.py)
    p95 = _by_dataset(records, "depth_p95_m")
    fig, (ax1, ax2) = plots.figure(10, max(3.2, 0.4 * len(med) + 1.4), ncols=2)
    allv = np.concatenate(list(med.values()))
    plots.stacked_hist(ax1, med, log_x=allv.min() > 0 and allv.max() / allv.min() > 20)
    ax1.set_xlabel("per-clip median depth (m)")
    names = list(med)
    y = np.arange(len(names))
    for i, d in enumerate(names):
        lo = float(np.median(p5[d])) if d in p5 and p5[d].size else float(np.min(med[d]))
        hi = float(np.median(p95[d])) if d in p95 and p95[d].size else float(np.max(med[d]))
        ax2.plot([lo, hi], [i, i], color=plots.color(d), linewidth=6, solid_capstyle="butt", alpha=0.6)
        ax2.plot([float(np.median(med[d]))], [i], "o", color="black", markersize=5)
    ax2.set_yticks(y, labels=[_lbl(d) for d in names])
    ax2.invert_yaxis()
    ax2.set_xlabel("depth (m): median clip p5 - p95, dot = median")
    lows = [float(np.min(v)) for v in p5.values() if v.size]
    highs = [float(np.max(v)) for v in p95.values() if v.size]
    if lows and highs and min(lows) > 0 and max(highs) / min(lows) > 20:
        plots.log_x(ax2)
    rows = []
    for d in names:
        rows.append(
            [
                d,
                med[d].size,
                f"{np.median(p5[d]):.3g}" if d in p5 and p5[d].size else "-",
                f"{np.median(med[d]):.3g}",
                f"{np.median(p95[d]):.3g}" if d in p95 and p95[d].size else "-",
            ]
        )
    body = plots.img(
        fig, "fig-depth-range", "Depth range per dataset: histogram of per-clip median depth and p5-p95 ranges"
    ) + _table(
        ["dataset", "clips", "median p5 (m)", "median of medians (m)", "median p95 (m)"], rows, numeric={1, 2, 3, 4}
    )
    return _section("depth-range", "Depth range", body)


def _alignment(records: list[dict], st: dict, plots: _Plots) -> str:
    residual = _by_dataset(records, "align", "residual")
    absrel = _by_dataset(records, "align", "abs_rel")
    body = []
    if not residual and not absrel:
        body.append(
            _note(
                "No aligned clips: every written sample has ground-truth (or no) depth, "
                "so there is no alignment residual to show."
            )
        )
    else:
        panels = [(g, label) for g, label in ((residual, "alignment residual"), (absrel, "AbsRel vs reference")) if g]
        fig, axes = plots.figure(5 * len(panels), 3.2, ncols=len(panels))
        for ax, (g, label) in zip(axes, panels):
            plots.stacked_hist(ax, g)
            ax.set_xlabel(label)
        body.append(
            plots.img(
                fig,
                "fig-align-residual",
                "Histogram of the depth alignment residual" + (" and AbsRel" if absrel else ""),
            )
        )
        n = sum(v.size for v in residual.values()) if residual else sum(v.size for v in absrel.values())
        body.append(f"<p>{n} aligned clips.</p>")
    qc_rows = []
    for d, rows in (st.get("qc") or {}).items():
        for label, r in rows.items():
            qc_rows.append(
                [d, label, r.get("n", ""), *[f"{r[k]:.3g}" if _num(r.get(k)) else "" for k in ("p5", "p50", "p95")]]
            )
    if qc_rows:
        body.append(
            "<p>QC distributions of the written samples (as in <code>d4s status</code>):</p>"
            + _table(["dataset", "measure", "n", "p5", "median", "p95"], qc_rows, numeric={2, 3, 4, 5})
        )
    return _section("alignment", "Alignment residual", "".join(body))


def _selfcheck(records: list[dict], st: dict, plots: _Plots) -> str:
    """Ground-truth self-check (stages/selfcheck.py): agreement per dataset and its drops."""
    agree = _by_dataset(records, "selfcheck", "agreement")
    dropped = {
        d: sum(n for c, n in cats.items() if "pose/depth convention mismatch" in c)
        for d, cats in (st.get("drops") or {}).items()
    }
    dropped = {d: n for d, n in dropped.items() if n}
    if not agree and not dropped:
        return _section(
            "selfcheck",
            "Ground-truth self-check",
            _note("No written sample has a self-check (no ground-truth depth, or the check is off)."),
        )
    body = []
    if agree:
        fig, (ax,) = plots.figure(8, 3.2)
        plots.stacked_hist(ax, agree)
        ax.set_xlabel("share of reprojected depth pixels that agree between frames")
        body.append(plots.img(fig, "fig-selfcheck", "Histogram of the ground-truth self-check agreement per clip"))
    rows = [
        [
            d,
            agree[d].size if d in agree else 0,
            f"{np.min(agree[d]):.3f}" if d in agree else "-",
            f"{np.median(agree[d]):.3f}" if d in agree else "-",
            dropped.get(d, 0),
        ]
        for d in sorted(set(agree) | set(dropped))
    ]
    body.append(
        _table(
            [
                "dataset",
                "clips judged",
                "min agreement",
                "median agreement",
                "clips dropped: pose/depth convention mismatch",
            ],
            rows,
            numeric={1, 2, 3, 4},
        )
    )
    return _section("selfcheck", "Ground-truth self-check", "".join(body))


def _drops(st: dict, plots: _Plots) -> str:
    drops = st.get("drops") or {}
    totals: dict[str, int] = defaultdict(int)
    for cats in drops.values():
        for c, n in cats.items():
            totals[c] += n
    if not totals:
        return _section("qc-drops", "QC drops by reason", _note("No clip was dropped."))
    cats = sorted(totals, key=lambda c: (-totals[c], c))
    shown = cats[:MAX_DROP_CATEGORIES]
    dsets = sorted(drops)
    fig, (ax,) = plots.figure(9, max(2.2, 0.38 * len(shown) + 1.2))
    y = np.arange(len(shown))
    left = np.zeros(len(shown))
    for d in dsets:
        vals = np.array([drops[d].get(c, 0) for c in shown], dtype=float)
        if vals.any():
            ax.barh(y, vals, left=left, color=plots.color(d), label=_lbl(d))
            left += vals
    ax.set_yticks(y, labels=[_lbl(c if len(c) <= 60 else c[:57] + "...") for c in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("clips dropped")
    plots.integer_axis(ax.xaxis)
    ax.legend(fontsize=7, loc="lower right")
    body = [plots.img(fig, "fig-qc-drops", "QC drops by reason category, per dataset")]
    if len(cats) > len(shown):
        body.append(_note(f"Showing the {len(shown)} most frequent of {len(cats)} categories."))
    rows = [[d, c, n] for d in dsets for c, n in drops[d].items()]
    body.append(_table(["dataset", "reason", "clips"], rows, numeric={2}))
    return _section("qc-drops", "QC drops by reason", "".join(body))


def _throughput(builds: list[dict], plots: _Plots) -> str:
    curves = [b for b in builds if b["curve"]]
    if not curves:
        return _section("throughput", "Throughput over time", _note("No shard finished yet."))
    begin = {b["build_id"]: b["start"] if b["start"] is not None else b["curve"][0][0] for b in curves}
    t0 = min(begin.values())
    span = max(b["curve"][-1][0] for b in curves) - t0
    unit, div = ("h", 3600.0) if span > 3 * 3600 else (("min", 60.0) if span > 180 else ("s", 1.0))
    fig, (ax,) = plots.figure(8, 3.4)
    for _i, b in enumerate(curves):
        xs = [(begin[b["build_id"]] - t0) / div] + [(t - t0) / div for t, _ in b["curve"]]
        ys = [0] + list(np.cumsum([n for _, n in b["curve"]]))
        ax.step(xs, ys, where="post", label=_lbl(f"{b['build_id']} ({b['clips']} clips)"))
    ax.set_xlabel(f"time since first build started ({unit}); start {_utc(t0)}")
    ax.set_ylabel("cumulative clips")
    plots.integer_axis(ax.yaxis)
    ax.legend(fontsize=7, loc="upper left")
    body = plots.img(fig, "fig-throughput", "Cumulative clips finished over time, per build")
    return _section("throughput", "Throughput over time", body)


def _stage_times(done: list[dict], st: dict, plots: _Plots) -> str:
    per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in done:
        ds = e["shard_id"].rsplit("-", 1)[0]
        for k, v in (e.get("timings") or {}).items():
            if _num(v):
                per[ds][k] += v
    if not per:
        return _section("stage-times", "Stage time breakdown", _note("No stage timings recorded yet."))
    stages = sorted(
        {k for t in per.values() for k in t},
        key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s),
    )
    names = sorted(per)
    fig, (ax,) = plots.figure(8, max(2.2, 0.45 * len(names) + 1.4))
    import matplotlib

    cmap = matplotlib.colormaps["Set2"]
    y = np.arange(len(names))
    left = np.zeros(len(names))
    for i, s in enumerate(stages):
        vals = np.array([per[d].get(s, 0.0) for d in names])
        ax.barh(y, vals, left=left, color=cmap(i % 8), label=_lbl(s))
        left += vals
    ax.set_yticks(y, labels=[_lbl(d) for d in names])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (summed over clips and workers)")
    ax.legend(fontsize=7, loc="lower right")
    totals = st.get("stage_seconds") or {}
    rows = [[s, f"{totals.get(s, sum(per[d].get(s, 0.0) for d in names)):.1f}"] for s in stages]
    body = plots.img(fig, "fig-stage-times", "Stage time per dataset, summed over clips") + _table(
        ["stage", "seconds"], rows, numeric={1}
    )
    return _section("stage-times", "Stage time breakdown", body)


def _failures(st: dict) -> str:
    fails = st.get("failures") or []
    if not fails:
        return _section("failures", "Failures", _note("No failures."))
    rows = [
        [
            f.get("dataset"),
            f.get("clip_id") or f"shard {f.get('shard_id')}",
            f.get("stage"),
            f.get("reason"),
            f.get("path") or "",
        ]
        for f in fails[:MAX_FAILURE_ROWS]
    ]
    body = [
        f"<p>{len(fails)} failures.</p>",
        _table(["dataset", "clip", "stage", "reason", "path"], rows, classes={3: "reason", 4: "path"}),
    ]
    if len(fails) > MAX_FAILURE_ROWS:
        body.append(
            _note(f"Showing the first {MAX_FAILURE_ROWS} of {len(fails)} failures; `d4s status --json` lists them all.")
        )
    return _section("failures", "Failures", "".join(body))


# -- entry points ---------------------------------------------------------------------------
def render_report(st: dict, events: list[dict], display: str, gallery: str | None = None) -> str:
    """The report's HTML from ``collect_status``'s dict and the ledger's events (and the gallery's
    HTML from :func:`pipeline.gallery.render_gallery`, when given)."""
    done = _current_done_events(events)
    records = _qc_records(done)
    builds = _builds(events)
    all_ds = set(st["datasets"]) | {str(r.get("dataset", "?")) for r in records}
    plots = _Plots(sorted(all_ds))
    sections = [
        _summary(st, builds),
        _clips_per_dataset(st, plots),
        _frames_bytes(records, plots),
        _depth(records, plots),
        _alignment(records, st, plots),
        _selfcheck(records, st, plots),
        _drops(st, plots),
        _throughput(builds, plots),
        _stage_times(done, st, plots),
        _failures(st),
    ] + ([_section("gallery", "Gallery", gallery)] if gallery is not None else [])
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    nav = " | ".join(
        f'<a href="#{sid}">{_esc(t)}</a>'
        for sid, t in (
            ("summary", "summary"),
            ("clips-per-dataset", "clips"),
            ("frames-bytes", "frames & bytes"),
            ("depth-range", "depth"),
            ("alignment", "alignment"),
            ("selfcheck", "self-check"),
            ("qc-drops", "drops"),
            ("throughput", "throughput"),
            ("stage-times", "stage time"),
            ("failures", "failures"),
        )
        + ((("gallery", "gallery"),) if gallery is not None else ())
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>d4s report: {_esc(display)}</title><style>{_CSS}</style></head>\n<body>"
        f'<h1>d4s report</h1><p class="meta">Output <code>{_esc(display)}</code>; generated {now} '
        f"from the manifests{'' if gallery is not None else ' (no shard opened)'}; {plots.count} figures.</p><nav>{nav}</nav>\n"
        + "\n".join(sections)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def write_report(output: str, gallery_clips: int = GALLERY_CLIPS_DEFAULT) -> str:
    """Write ``OUTPUT/report.html`` and return where it is (a path, or a URL for object stores).
    ``gallery_clips``: clips shown per dataset in the gallery (0: no gallery section)."""
    store = Store(output)
    ms = ManifestStore(store)
    if not ms.has_plan():
        raise FileNotFoundError(f"{output} is not a d4s output (no manifests/shards.parquet); run `d4s build` first")
    if not store.exists("config.resolved.yaml"):
        raise FileNotFoundError(f"{output} is not a d4s output (no config.resolved.yaml); run `d4s build` first")
    events = ms.ledger_events()  # the one ledger read of the command
    st = collect_status(output, events)
    gallery = (
        render_gallery(store, ms.shards(), events, st["failures"], gallery_clips)[0] if gallery_clips > 0 else None
    )
    page = render_report(st, events, store.display(), gallery)
    store.write_bytes_atomic(REPORT_NAME, page.encode("utf-8"))
    return store.display(REPORT_NAME)
