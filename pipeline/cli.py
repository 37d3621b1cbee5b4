"""The ``d4s`` command line. Every command exits non-zero with a one-line reason on bad input."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, load_config

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, help="d4s: build 4D scene datasets and train from them.")
parity_app = typer.Typer(no_args_is_help=True, help="Check the project's models against recorded official outputs.")
app.add_typer(parity_app, name="parity")
console = Console(stderr=True)
out_console = Console()


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _print_summary(s) -> None:
    transient = f" ({s.shards_failed_transient} transient: `d4s resume` rebuilds them)" if s.shards_failed else ""
    console.print(f"{s.output}: {s.clips_written} clips written, {s.clips_failed} clips failed, "
                  f"{s.shards_done} shards built, {s.shards_skipped} already done, {s.shards_failed} shards failed"
                  f"{transient} ({s.seconds:.1f} s)", highlight=False)
    for f in s.failures[:20]:
        console.print(f"  failed {f['clip_id']} at {f['stage']}: {f['reason']}" + (f" [{f['path']}]" if f.get("path") else ""),
                      highlight=False, soft_wrap=True)
    if len(s.failures) > 20:
        console.print(f"  ... and {len(s.failures) - 20} more (d4s status {s.output})")


def _fault_overrides(fault: Optional[str]) -> dict:
    """The hidden ``--fault JSON`` option (tests and bench/chaos.py): fault hooks for this run only."""
    if not fault:
        return {}
    try:
        hooks = json.loads(fault)
    except json.JSONDecodeError as exc:
        _fail(f"--fault must be a JSON object of fault settings: {exc}")
    if not isinstance(hooks, dict):
        _fail("--fault must be a JSON object of fault settings")
    return {"fault": hooks}


def _run_or_fail(fn, *args, **kwargs):
    """Run a build or resume; another driver's lease exits 3, a lease lost mid-run 4, a config error 2."""
    from manifests.lease import LeaseHeldError, LeaseLostError

    try:
        return fn(*args, **kwargs)
    except LeaseHeldError as exc:
        _fail(str(exc), code=3)
    except LeaseLostError as exc:
        _fail(f"stopped: {exc}; nothing more was written by this driver (`d4s resume` continues)", code=4)
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def build(
    config: Optional[str] = typer.Argument(None, help="YAML build config (see docs/CONFIG.md)."),
    demo: Optional[str] = typer.Option(None, "--demo", help="Generate demo scenes and build them into this output."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address for this run (default: RAY_ADDRESS or local); not recorded."),
    new_version: bool = typer.Option(False, "--new-version", help="The output holds a build with other content settings: rebuild every shard with these."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    fault: Optional[str] = typer.Option(None, "--fault", hidden=True),
):
    """Build shards from a config, or from generated demo data with --demo OUT."""
    from pipeline.runner import build as run_build

    try:
        if demo:
            from pipeline.demo.build_demo import demo_config

            console.print(f"generating demo data under {Path(demo).resolve() / 'demo_data'} ...")
            cfg = demo_config(demo)
        elif config:
            cfg = load_config(config)
        else:
            _fail("give a CONFIG.yaml or --demo OUT")
    except ConfigError as exc:
        _fail(str(exc))
    overrides = {**({"ray": {"address": address}} if address else {}), **_fault_overrides(fault)}
    summary = _run_or_fail(run_build, cfg, show_progress=progress, overrides=overrides, new_version=new_version)
    _print_summary(summary)
    console.print(f"next: d4s status {summary.output} | d4s verify {summary.output}")
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
def resume(output: str = typer.Argument(..., help="An output written by `d4s build`."),
           address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address for this run; not recorded."),
           full_check: bool = typer.Option(False, "--full-check", help="Re-hash every finished shard (default: only those whose stored object changed)."),
           progress: bool = typer.Option(True, "--progress/--no-progress"),
           fault: Optional[str] = typer.Option(None, "--fault", hidden=True)):
    """Re-run only what is missing or failed in OUTPUT (its recorded config and plan)."""
    from pipeline.runner import resume as run_resume

    overrides = {**({"ray": {"address": address}} if address else {}), **_fault_overrides(fault)}
    summary = _run_or_fail(run_resume, output, show_progress=progress, overrides=overrides or None, full_check=full_check)
    _print_summary(summary)
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
def status(output: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")):
    """Counts per dataset and state, shard states, and failures with their reasons."""
    from pipeline.status import collect_status

    try:
        st = collect_status(output)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if as_json:
        out_console.print_json(json.dumps(st))
        return
    out_console.print(_status_tables(st))
    s = st["shards"]
    out_console.print(f"shards: {s['done']} done, {s['failed']} failed, {s['pending']} pending")
    lease = st.get("lease")
    if lease:
        from datetime import datetime, timezone

        when = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")  # noqa: E731
        who = f"`d4s {lease['command']}` {lease['owner']} on {lease['host']} (pid {lease['pid']})"
        out_console.print(f"lease: released by {who} at {when(lease['renewed_at'])}" if lease["released"] else
                          f"lease: held by {who} since {when(lease['acquired_at'])}, last renewed "
                          f"{when(lease['renewed_at'])} (its clock; TTL {lease['ttl_s']:g} s)", highlight=False)
    tp = st["throughput"]
    if tp["clips_per_s"]:
        eta = tp["eta_s"]
        out_console.print(f"latest build: {tp['clips']} clips in {tp['seconds']:.0f} s = {tp['clips_per_s']:.2f} clips/s; "
                          + ("nothing left" if not eta else f"ETA {_duration(eta)} for what is pending"), highlight=False)
    if st["stage_seconds"]:
        out_console.print("stage time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in st["stage_seconds"].items()))
    fc = st.get("failure_classes") or {}
    if fc.get("transient") or fc.get("permanent"):
        out_console.print(f"failures: {fc.get('transient', 0)} transient (shards `d4s resume` rebuilds), "
                          f"{fc.get('permanent', 0)} permanent (bad input, recorded once)", highlight=False)
    for f in st["failures"][:50]:
        out_console.print(f"  failed ({f.get('class', 'permanent')}) {f['clip_id'] or f['shard_id']} at {f['stage']}: {f['reason']}"
                          + (f" [{f['path']}]" if f.get("path") else ""), highlight=False, soft_wrap=True)
    if len(st["failures"]) > 50:
        out_console.print(f"  ... and {len(st['failures']) - 50} more (d4s status --json)")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _status_tables(st: dict):
    """Rich renderables: clips per dataset and stage, QC distributions, drops by reason."""
    from rich.console import Group

    t = Table(title=f"d4s status: {st['output']}")
    for col in ("dataset", "stage", "done", "failed", "pending", "skipped"):
        t.add_column(col, justify="left" if col in ("dataset", "stage") else "right")
    for d, c in st["datasets"].items():
        t.add_row(f"[bold]{d}[/bold]", "clips", str(c["clips_done"]), str(c["clips_failed"]), str(c["clips_pending"]), "")
        for name, sc in st["stages"].get(d, {}).items():
            t.add_row("", name, str(sc["done"]), str(sc["failed"]), str(sc["pending"]), str(sc["skipped"]))
    parts = [t]
    if any(st["qc"].values()):
        q = Table(title="QC distributions (written samples)")
        for col in ("dataset", "measure", "n", "p5", "median", "p95"):
            q.add_column(col, justify="left" if col in ("dataset", "measure") else "right")
        for d, rows in st["qc"].items():
            for i, (label, r) in enumerate(rows.items()):
                vals = [f"{r[k]:.3g}" if k in r else "" for k in ("p5", "p50", "p95")]
                q.add_row(d if i == 0 else "", label, str(r["n"]), *vals)
        parts.append(q)
    if st["drops"]:
        dr = Table(title="Drops by reason")
        for col in ("dataset", "reason", "clips"):
            dr.add_column(col, justify="right" if col == "clips" else "left")
        for d, cats in st["drops"].items():
            for i, (cat, n) in enumerate(cats.items()):
                dr.add_row(d if i == 0 else "", cat, str(n))
        parts.append(dr)
    return Group(*parts)


@app.command()
def verify(output: str = typer.Argument(...)):
    """Prove every planned clip is in exactly one intact shard (or recorded as failed)."""
    from pipeline.verify import verify as run_verify

    rep = run_verify(output)
    for p in rep.problems:
        out_console.print(f"[red]problem:[/red] {p}", highlight=False, soft_wrap=True)
    verdict = "OK" if rep.ok else "FAILED"
    out_console.print(f"verify {verdict}: {rep.shards_checked} shards, {rep.samples} samples, "
                      f"{rep.clips_failed} clips recorded as failed, {len(rep.problems)} problems", highlight=False)
    raise typer.Exit(0 if rep.ok else 1)


@app.command()
def inspect(dataset: str = typer.Argument(..., help="Dataset name, e.g. tartanair, realestate10k."),
            path: str = typer.Argument(..., help="A scene folder (or a camera file such as a RealEstate10K .txt)."),
            as_json: bool = typer.Option(False, "--json")):
    """Read one scene with its adapter and report frames, cameras, modalities and problems."""
    from stages.ingest.inspect import inspect_path

    try:
        rep = inspect_path(dataset, path)
    except (KeyError, NotImplementedError, FileNotFoundError) as exc:
        _fail(str(exc).strip("'\""))
    if as_json:
        out_console.print_json(json.dumps(rep))
    else:
        for k in ("dataset", "scene", "num_frames", "image_size", "path_length", "has_depth", "has_tracks"):
            if k in rep:
                out_console.print(f"{k}: {rep[k]}", highlight=False)
        if rep.get("intrinsics"):
            out_console.print(f"intrinsics[0]: {rep['intrinsics'][0]}" + (" (normalised)" if rep.get("intrinsics_normalized") else ""))
        out_console.print(f"problems: {len(rep['problems'])}")
        for p in rep["problems"]:
            out_console.print(f"  - {p}", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if not rep["problems"] else 1)


@app.command()
def report(output: str = typer.Argument(...)):
    """Write OUTPUT/report.html: a self-contained report with plots, and print its path."""
    from pipeline.report import write_report
    try:
        path = write_report(output)
    except FileNotFoundError as exc:
        _fail(str(exc))
    out_console.print(str(path), highlight=False)


@app.command()
def plan(config: Optional[str] = typer.Argument(None), demo: bool = typer.Option(False, "--demo"),
         as_json: bool = typer.Option(False, "--json"),
         costs: Optional[str] = typer.Option(None, "--costs", help="Per-frame costs YAML (default: pipeline/capacity_costs.yaml).")):
    """Capacity model: scenes, clips, output bytes and GPU-hours per model stage for a config."""
    from pipeline.capacity import capacity_report, format_capacity
    try:
        if demo:
            import tempfile

            from pipeline.demo.build_demo import demo_config

            cfg = demo_config(tempfile.mkdtemp(prefix="d4s-plan-demo-"))
        elif config:
            cfg = load_config(config)
        else:
            _fail("give a CONFIG.yaml or --demo")
        rep = capacity_report(cfg, costs=costs)
    except ConfigError as exc:
        _fail(str(exc))
    out_console.print_json(json.dumps(rep)) if as_json else out_console.print(format_capacity(rep), highlight=False)


@app.command()
def train(config: Optional[str] = typer.Argument(None, help="Training config YAML (docs/TRAINING.md)."),
          demo: Optional[str] = typer.Option(None, "--demo", help="Train the tiny CPU config on the shards of a demo build in this output."),
          max_steps: Optional[int] = typer.Option(None, "--max-steps"),
          workdir: Optional[str] = typer.Option(None, "--workdir", help="Checkpoints and logs (resumed if present).")):
    """Train Diff4Splat from shards with Ray Train (local Ray by default)."""
    from training.cli import train_main

    if not config and not demo:
        _fail("give a CONFIG.yaml or --demo OUT")
    try:
        code = train_main(config, demo, max_steps, workdir)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def _parity(kind: str, fixture_dir: str, salt: str) -> None:
    if not Path(fixture_dir).is_dir():
        _fail(f"fixture folder not found: {fixture_dir}")
    if kind == "vda":
        from stages.depth.vda.parity import format_report, run_parity
    else:
        from stages.tracks.cotracker.parity import format_report, run_parity
    cases = run_parity(fixture_dir, salt=salt)
    out_console.print(format_report(cases), highlight=False, soft_wrap=True)
    raise typer.Exit(0 if cases and all(c.ok for c in cases) else 1)


@parity_app.command("vda")
def parity_vda(fixture_dir: str = typer.Argument(...), salt: str = typer.Option("", "--salt")):
    """Video Depth Anything against a fixture folder laid out like shared/parity/vda."""
    _parity("vda", fixture_dir, salt)


@parity_app.command("cotracker3")
def parity_cotracker3(fixture_dir: str = typer.Argument(...), salt: str = typer.Option("", "--salt")):
    """CoTracker3 against a fixture folder laid out like shared/parity/cotracker3."""
    _parity("cotracker3", fixture_dir, salt)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
