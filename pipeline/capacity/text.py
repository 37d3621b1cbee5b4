"""The capacity report as plain-text tables in human units (what ``d4s plan`` prints)."""

from __future__ import annotations

import textwrap


def human_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{int(n)} B"


def human_hours(h: float) -> str:
    if h == 0:
        return "0"
    s = h * 3600.0
    if s < 60:
        return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{h:,.1f} h" if h < 100 else f"{h:,.0f} h"


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return (
        [line(headers), "  ".join("-" * w for w in widths)]
        + [line(r) for r in rows[:-1]]
        + ["  ".join("-" * w for w in widths), line(rows[-1])]
    )


def format_capacity(rep: dict) -> str:
    """The report as plain-text tables (human units) followed by its assumptions."""
    rows, tot = rep["datasets"], rep["totals"]
    head = "d4s plan: " + (
        "projection from a counts table" if rep.get("mode") == "projection" else f"capacity of {rep['output']}"
    )
    t1 = [
        [
            r["label"],
            f"{r['scenes']:,}",
            f"{r['clips']:,}",
            f"{r['frames']:,}",
            f"{r['image_hw'][1]}x{r['image_hw'][0]}",
            human_bytes(r["output_bytes"]),
        ]
        for r in rows
    ]
    t1.append(
        ["total", f"{tot['scenes']:,}", f"{tot['clips']:,}", f"{tot['frames']:,}", "", human_bytes(tot["output_bytes"])]
    )

    def gpu_cell(r, k):
        return human_hours(r["gpu_hours"][k]) if k in r["model_stages"] else "-"

    t2 = [
        [
            r["label"],
            gpu_cell(r, "depth"),
            gpu_cell(r, "tracks"),
            gpu_cell(r, "megasam"),
            human_hours(r["cpu_core_hours"]["total"]),
        ]
        for r in rows
    ]
    g = tot["gpu_hours"]
    t2.append(
        [
            "total",
            human_hours(g["depth"]),
            human_hours(g["tracks"]),
            human_hours(g["megasam"]),
            human_hours(tot["cpu_core_hours"]["total"]),
        ]
    )
    out = [head, ""]
    out += _table(["dataset", "scenes", "clips", "frames", "image", "output"], t1)
    out += ["", f"GPU time per model stage ({rep.get('gpu') or 'one GPU'}) and CPU core time:", ""]
    out += _table(["dataset", "depth (GPU)", "tracks (GPU)", "MegaSaM (GPU)", "CPU (cores)"], t2)
    summary = (
        f"total: {human_hours(g['total'])} of GPU time"
        + (f" ({human_hours(g['megasam'])} of it MegaSaM, an assumption)" if g["megasam"] else "")
        + f", {human_hours(tot['cpu_core_hours']['total'])} of CPU core time, {human_bytes(tot['output_bytes'])} "
        f"in {tot['shards']:,} shards"
        + (
            f", at most {human_bytes(tot['megasam_cache_bytes'])} of MegaSaM cache (OUT/cache/megasam)"
            if tot.get("megasam_cache_bytes")
            else ""
        )
        + "."
    )
    out += [""] + textwrap.wrap(summary, width=78) + ["", "assumptions:"]
    for a in rep["assumptions"]:
        out += textwrap.wrap(
            a.replace("[", "(").replace("]", ")"), width=78, initial_indent="  - ", subsequent_indent="    "
        )
    return "\n".join(out)
