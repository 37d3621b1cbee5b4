"""The ``d4s`` command line. Every command exits non-zero with a one-line reason on bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from pipeline import strict_json
from pipeline.config import ConfigError, load_config, read_text_file


class _OneLineGroup(TyperGroup):
    """Runs every command (``d4s ...`` and CliRunner alike) so that a store it could not use (an
    object store without credentials or answer, a location it may not read:
    :mod:`pipeline.store_errors`) is one line, exit 2, wherever in the command it was met, instead
    of a traceback."""

    def invoke(self, ctx):
        from pipeline.store_errors import store_problem

        try:
            return super().invoke(ctx)
        except (typer.Exit, click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise  # a command's own exit (one line already said) or usage error
        except Exception as exc:
            msg = store_problem(exc)
            if msg is None:
                raise
            _fail(msg)


app = typer.Typer(
    cls=_OneLineGroup,
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="d4s: build 4D scene datasets and train from them.",
)
parity_app = typer.Typer(no_args_is_help=True, help="Check the project's models against recorded official outputs.")
app.add_typer(parity_app, name="parity")
console = Console(stderr=True)
out_console = Console()


def _fail(msg: str, code: int = 2) -> None:
    # escaped: reasons quote paths and "[...]", which rich would read as (broken) markup
    console.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _print_summary(s) -> None:
    transient = f" ({s.shards_failed_transient} transient: `d4s resume` rebuilds them)" if s.shards_failed else ""
    console.print(
        f"{s.output}: {s.clips_written} clips written, {s.clips_failed} clips failed, "
        f"{s.shards_done} shards built, {s.shards_skipped} already done, {s.shards_failed} shards failed"
        f"{transient} ({s.seconds:.1f} s)",
        highlight=False,
        markup=False,
    )
    st = getattr(s, "stats", {}) or {}
    if st.get("ingest.frames_read", 0) < st.get("ingest.clip_frames", 0):  # a scene's clips read together
        console.print(
            f"  ingest: {st['ingest.frames_read']:g} frames read for {st['ingest.clip_frames']:g} clip frames",
            highlight=False,
        )
    if st.get("depth.passes"):
        console.print(
            f"  depth model: {st['depth.passes']:g} passes over {st.get('depth.source_frames', 0):g} source frames "
            f"({st.get('depth.model_frames', 0):g} model frames for {st.get('depth.clip_frames', 0):g} clip frames)"
            + (
                f"; MegaSaM: {st.get('megasam.runs', 0):g} runs, {st.get('megasam.cached', 0):g} from the cache"
                if st.get("megasam.passes")
                else ""
            ),
            highlight=False,
        )
    for f in s.failures[:20]:
        console.print(  # reasons and paths are data, not markup ('[/data/...]' reads as a closing tag)
            f"  failed {f['clip_id']} at {f['stage']}: {f['reason']}" + (f" [{f['path']}]" if f.get("path") else ""),
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    if len(s.failures) > 20:
        console.print(f"  ... and {len(s.failures) - 20} more (d4s status {s.output})", markup=False)


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


def _read_or_fail(fn, *args, **kwargs):
    """Run a read-only command's work: not an output, a damaged manifest, a config of another
    version, or a store that does not answer is one line naming the file (exit 2)."""
    from pipeline.failures import describe, is_transient
    from pipeline.store_errors import store_problem

    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, ConfigError) as exc:
        _fail(str(exc).strip("'\""))
    except Exception as exc:
        problem = store_problem(exc)
        if problem:
            _fail(problem)
        if is_transient(exc) or type(exc).__module__.startswith("botocore"):
            _fail(f"the output store did not answer ({describe(exc)}); try again")
        raise


def _run_or_fail(fn, *args, **kwargs):
    """Run a build or resume; another driver's lease exits 3, a lease lost mid-run 4, a config error 2,
    a write the node refused (disk full, read-only) 5."""
    from manifests.lease import LeaseHeldError, LeaseLostError

    try:
        return fn(*args, **kwargs)
    except LeaseHeldError as exc:
        _fail(str(exc), code=3)
    except LeaseLostError as exc:
        _fail(f"stopped: {exc}; nothing more was written by this driver (`d4s resume` continues)", code=4)
    except ConfigError as exc:
        _fail(str(exc))
    except OSError as exc:  # the driver's own writes (ledger, index, lease) refused by the node
        where = f" {exc.filename}" if exc.filename else ""
        _fail(
            f"stopped: cannot read or write{where}: {exc.strerror or exc}; what was published is kept: "
            "fix it (free space, permissions) and run `d4s resume` on the output",
            code=5,
        )


@app.command()
def build(
    config: Optional[str] = typer.Argument(None, help="YAML build config (see docs/CONFIG.md)."),
    demo: Optional[str] = typer.Option(None, "--demo", help="Generate demo scenes and build them into this output."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster address for this run (default: RAY_ADDRESS or local); not recorded."
    ),
    new_version: bool = typer.Option(
        False,
        "--new-version",
        help="The output holds a build with other content settings: rebuild the shards they change with these.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    fault: Optional[str] = typer.Option(None, "--fault", hidden=True),
):
    """Build shards from a config, or from generated demo data with --demo OUT."""
    from pipeline.runner import build as run_build

    try:
        if demo:
            from pipeline.demo.build_demo import demo_config

            console.print(f"generating demo data under {Path(demo).resolve() / 'demo_data'} ...", markup=False)
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
    console.print(f"next: d4s status {summary.output} | d4s verify {summary.output}", markup=False)
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
def resume(
    output: str = typer.Argument(..., help="An output written by `d4s build`."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address for this run; not recorded."),
    full_check: bool = typer.Option(
        False, "--full-check", help="Re-hash every finished shard (default: only those whose stored object changed)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    fault: Optional[str] = typer.Option(None, "--fault", hidden=True),
):
    """Re-run only what is missing or failed in OUTPUT (its recorded config and plan)."""
    from pipeline.runner import resume as run_resume

    overrides = {**({"ray": {"address": address}} if address else {}), **_fault_overrides(fault)}
    summary = _run_or_fail(
        run_resume, output, show_progress=progress, overrides=overrides or None, full_check=full_check
    )
    _print_summary(summary)
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
def status(output: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")):
    """Counts per dataset and state, shard states, and failures with their reasons."""
    from pipeline.status import collect_status

    st = _read_or_fail(collect_status, output)
    if as_json:
        out_console.print_json(strict_json.dumps(st))
        return
    out_console.print(_status_tables(st))
    for d, why in (st.get("no_clips") or {}).items():
        out_console.print(f"{d}: no clips ({why})", highlight=False, soft_wrap=True, markup=False)
    s = st["shards"]
    out_console.print(
        f"shards: {s['done']} done, {s['failed']} failed, {s['running']} running (the live build's), {s['pending']} pending"
    )
    lease = st.get("lease")
    if lease:
        from datetime import datetime, timezone

        when = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")  # noqa: E731
        who = f"`d4s {lease['command']}` {lease['owner']} on {lease['host']} (pid {lease['pid']})"
        since = f"since {when(lease['acquired_at'])}, last renewed {when(lease['renewed_at'])}"
        if lease["released"]:
            text = f"lease: released by {who} at {when(lease['renewed_at'])}"
        elif lease.get("stale"):
            text = f"lease: left by {who} ({since}): {lease['stale']}; `d4s resume` takes it over"
        else:
            text = f"lease: held by {who} {since} (its clock; TTL {lease['ttl_s']:g} s)"
        out_console.print(text, highlight=False, markup=False, soft_wrap=True)
    tp = st["throughput"]
    if tp["clips_per_s"]:
        eta = tp["eta_s"]
        if tp.get("stopped"):
            left = f"stopped with {tp['clips_left']} clips pending (`d4s resume` continues)"
        else:
            left = "nothing left" if not eta else f"ETA {_duration(eta)} for what is pending"
        out_console.print(
            f"latest build: {tp['clips']} clips in {tp['seconds']:.0f} s = {tp['clips_per_s']:.2f} clips/s; " + left,
            highlight=False,
            soft_wrap=True,
        )
    if st["stage_seconds"]:
        out_console.print("stage time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in st["stage_seconds"].items()))
    fc = st.get("failure_classes") or {}
    if fc.get("transient") or fc.get("permanent"):
        out_console.print(
            f"failures: {fc.get('transient', 0)} transient (shards `d4s resume` rebuilds), "
            f"{fc.get('permanent', 0)} permanent (bad input, recorded once)",
            highlight=False,
        )
    for f in st["failures"][:50]:
        out_console.print(
            f"  failed ({f.get('class', 'permanent')}) {f['clip_id'] or f['shard_id']} at {f['stage']}: {f['reason']}"
            + (f" [{f['path']}]" if f.get("path") else ""),
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    if len(st["failures"]) > 50:
        out_console.print(f"  ... and {len(st['failures']) - 50} more (d4s status --json)")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _status_tables(st: dict):
    """Rich renderables: clips per dataset and stage, QC distributions, drops by reason."""
    from rich.console import Group

    t = Table(title=f"d4s status: {escape(st['output'])}")
    for col in ("dataset", "stage", "done", "failed", "pending", "skipped"):
        t.add_column(col, justify="left" if col in ("dataset", "stage") else "right")
    for d, c in st["datasets"].items():
        t.add_row(
            f"[bold]{d}[/bold]", "clips", str(c["clips_done"]), str(c["clips_failed"]), str(c["clips_pending"]), ""
        )
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
                dr.add_row(d if i == 0 else "", escape(cat), str(n))
        parts.append(dr)
    return Group(*parts)


@app.command()
def verify(output: str = typer.Argument(...)):
    """Prove every planned clip is in exactly one intact shard (or recorded as failed)."""
    from pipeline.verify import verify as run_verify

    rep = _read_or_fail(run_verify, output)
    if rep.not_an_output:  # a usage error like status's and report's, not a failed verification
        _fail(rep.problems[0])
    for p in rep.problems:
        out_console.print(f"[red]problem:[/red] {escape(p)}", highlight=False, soft_wrap=True)
    verdict = "OK" if rep.ok else "FAILED"
    out_console.print(
        f"verify {verdict}: {rep.shards_checked} shards, {rep.samples} samples, "
        f"{rep.clips_failed} clips recorded as failed, {len(rep.problems)} problems",
        highlight=False,
    )
    raise typer.Exit(0 if rep.ok else 1)


@app.command()
def inspect(
    dataset: str = typer.Argument(..., help="Dataset name, e.g. tartanair, realestate10k."),
    path: str = typer.Argument(
        ..., help="A scene folder, or a file: a RealEstate10K camera .txt or pixelSplat .torch chunk."
    ),
    as_json: bool = typer.Option(False, "--json"),
    config: Optional[str] = typer.Option(
        None, "--config", help="A build config: read with its datasets.<DATASET> options and depth range."
    ),
    max_scenes: int = typer.Option(50, "--max-scenes", min=1, help="Scenes to read when PATH holds several."),
):
    """Read the scenes at PATH with the dataset's adapter; report frames, cameras, modalities, problems."""
    from pipeline.clip import ClipError
    from stages.ingest.inspect import inspect_path

    try:
        ds_cfg = None
        if config:
            cfg = load_config(config)
            if dataset not in cfg.datasets:
                _fail(f"{config} configures no dataset {dataset!r} (it has {', '.join(sorted(cfg.datasets))})")
            ds_cfg = cfg.datasets[dataset]
        rep = inspect_path(dataset, path, ds_cfg, max_scenes)
    except ConfigError as exc:
        _fail(str(exc))
    except (KeyError, NotImplementedError, FileNotFoundError, ClipError) as exc:
        _fail(str(exc).strip("'\""))
    reps = rep if isinstance(rep, list) else [rep]  # a RealEstate10K chunk: one report per example
    if as_json:
        out_console.print_json(strict_json.dumps(rep))
    else:
        for r in reps:
            for k in ("dataset", "scene", "num_frames", "image_size", "path_length", "has_depth", "has_tracks"):
                if k in r:
                    out_console.print(f"{k}: {r[k]}", highlight=False, markup=False)
            if r.get("intrinsics"):
                out_console.print(
                    f"intrinsics[0]: {r['intrinsics'][0]}" + (" (normalised)" if r.get("intrinsics_normalized") else "")
                )
            out_console.print(f"problems: {len(r['problems'])}")
            for p in r["problems"]:
                out_console.print(f"  - {p}", highlight=False, soft_wrap=True, markup=False)
            if r.get("not_inspected"):
                n = len(r["not_inspected"])
                out_console.print(
                    f"{n} more scene{'s' if n > 1 else ''} not read (--max-scenes): {r['not_inspected'][0]} ...",
                    highlight=False,
                    markup=False,
                )
    raise typer.Exit(0 if not any(r["problems"] for r in reps) else 1)


@app.command()
def report(
    output: str = typer.Argument(...),
    gallery_clips: int = typer.Option(
        2, "--gallery-clips", min=0, help="Clips per dataset in the gallery, read from the shards (0: none)."
    ),
):
    """Write OUTPUT/report.html: a self-contained report with plots and a gallery, and print its path."""
    from pipeline.report import write_report

    path = _read_or_fail(write_report, output, gallery_clips=gallery_clips)
    out_console.print(str(path), highlight=False)


@app.command()
def show(
    output: str = typer.Argument(..., help="An output written by `d4s build`."),
    clip: str = typer.Option(..., "--clip", help="The clip's key (its clip id), e.g. tartanair__<scene>__000000."),
    rrd: Optional[str] = typer.Option(None, "--rrd", help="Write the recording to this .rrd file."),
    spawn: bool = typer.Option(False, "--spawn", help="Open the Rerun viewer and stream the clip to it."),
):
    """One clip to Rerun: frames, metric depth, pinhole cameras and poses, 3D tracks over time, QC."""
    from pipeline.rerun_log import RerunMissing
    from pipeline.shard_read import SampleReadError
    from pipeline.show import ShowError, show_clip

    try:
        where = show_clip(output, clip, rrd=rrd, spawn=spawn)
    except (FileNotFoundError, ShowError, RerunMissing, SampleReadError) as exc:
        _fail(str(exc))
    out_console.print(str(where), highlight=False)


@app.command()
def plan(
    config: Optional[str] = typer.Argument(
        None,
        help="Build config: its plan and a probe of its data (with "
        "--full-build / --counts only its clip and stage settings).",
    ),
    demo: bool = typer.Option(False, "--demo", help="Plan the demo build (renders its data to a temporary folder)."),
    full_build: bool = typer.Option(
        False,
        "--full-build",
        help="Project the ~130k-scene build from its table of counts (docs/CLUSTER.md); reads no data.",
    ),
    counts: Optional[str] = typer.Option(
        None,
        "--counts",
        help="Project from this YAML list of {dataset, scenes, "
        "frames_per_scene[, hw, label, gt_tracks, source]} rows; reads no data.",
    ),
    costs: Optional[str] = typer.Option(
        None, "--costs", help="Per-frame costs YAML (default: pipeline/capacity/costs.yaml)."
    ),
    as_json: bool = typer.Option(False, "--json"),
    markdown: bool = typer.Option(False, "--markdown", help="With --full-build: the table of docs/CLUSTER.md."),
):
    """Capacity model: scenes, clips, output bytes and GPU-hours per model stage, before a build."""
    from pipeline import capacity

    try:
        if full_build or counts:
            if demo:
                _fail("--demo plans the demo data; a projection (--full-build, --counts) reads no data")
            if markdown:
                if counts or config:
                    _fail("--markdown prints the docs table of the built-in full-build counts only")
                typer.echo(capacity.full_build_markdown(costs))
                return
            rows = _counts_table(counts) if counts else capacity.FULL_BUILD_COUNTS
            rep = capacity.projection_from_counts(rows, cfg=load_config(config) if config else None, costs=costs)
        else:
            if markdown:
                _fail("--markdown goes with --full-build")
            if demo:
                from pipeline.demo import build_demo

                with _plan_demo_folder() as folder:  # the demo data, read by the report's probe
                    rep = capacity.capacity_report(build_demo.demo_config(folder), costs=costs)
            elif config:
                rep = capacity.capacity_report(load_config(config), costs=costs)
            else:
                _fail("give a CONFIG.yaml, --demo, --full-build or --counts FILE")
    except ConfigError as exc:
        _fail(str(exc))
    out_console.print_json(strict_json.dumps(rep)) if as_json else out_console.print(
        capacity.format_capacity(rep), highlight=False
    )


def _plan_demo_folder():
    """A temporary folder for `plan --demo`'s rendered data, removed when the report is made."""
    import tempfile

    return tempfile.TemporaryDirectory(prefix="d4s-plan-demo-")


def _counts_table(path: str) -> list[dict]:
    """The rows of a ``--counts`` file, or a one-line error naming the file."""
    import yaml

    from pipeline.yaml_load import load_yaml, yaml_error_line
    from stages.ingest import ADAPTERS

    try:
        rows = load_yaml(read_text_file(path, "counts file"))
    except ConfigError as exc:
        _fail(str(exc))
    except yaml.YAMLError as exc:
        _fail(f"counts file {path} is not valid YAML: {yaml_error_line(exc)}")
    if isinstance(rows, list) and not rows:
        _fail(f"counts file {path} has no rows: expected a list of {{dataset, scenes, frames_per_scene}} rows")
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and {"dataset", "scenes", "frames_per_scene"} <= set(r) for r in rows
    ):
        _fail(f"counts file {path}: expected a list of {{dataset, scenes, frames_per_scene}} rows")
    for i, r in enumerate(rows, 1):
        if r["dataset"] not in ADAPTERS:
            _fail(
                f"counts file {path}, row {i}: unknown dataset {r['dataset']!r}; known: {', '.join(sorted(ADAPTERS))}"
            )
        for k in ("scenes", "frames_per_scene"):
            if not isinstance(r[k], int) or isinstance(r[k], bool) or r[k] < 1:
                _fail(f"counts file {path}, row {i}: {k} must be a whole number >= 1, got {r[k]!r}")
        hw = r.get("hw")
        if hw is not None and not (
            isinstance(hw, list)
            and len(hw) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in hw)
        ):
            _fail(f"counts file {path}, row {i}: hw must be [height, width] in pixels (whole numbers >= 1), got {hw!r}")
    return rows


@app.command()
def train(
    config: Optional[str] = typer.Argument(None, help="Training config YAML (docs/TRAINING.md)."),
    demo: Optional[str] = typer.Option(
        None, "--demo", help="Train the tiny CPU config on the shards of a demo build in this output."
    ),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="Checkpoints and logs (resumed if present)."),
):
    """Train Diff4Splat from shards with Ray Train (local Ray by default)."""
    from training.cli import train_main

    if not config and not demo:
        _fail("give a CONFIG.yaml or --demo OUT")
    try:
        code = train_main(config, demo, max_steps, workdir)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command("train-report")
def train_report(workdir: str = typer.Argument(..., help="A training workdir (metrics.jsonl).")):
    """Write WORKDIR/report.html: loss and validation curves, the best checkpoint; print its path."""
    from training.report import MetricsError, write_training_report

    try:
        out_console.print(write_training_report(workdir), highlight=False)
    except (FileNotFoundError, MetricsError) as exc:
        _fail(str(exc))


@app.command("eval")
def eval_cmd(
    ckpt: str = typer.Argument(..., help="A checkpoint file, or a training workdir (its best, else latest)."),
    data: list[str] = typer.Argument(..., help="A build's output (its held-out split), or shard files/globs."),
    out: str = typer.Option(..., "--out", help="Writes metrics.json and eval.html here."),
    split: str = typer.Option("val", "--split", help="Of a build: val (held-out scenes) or train."),
    clips: Optional[int] = typer.Option(None, "--clips", min=1, help="At most this many clips."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Default: the last stage's."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Default: the last stage's."),
    sample_steps: int = typer.Option(
        10, "--sample-steps", min=0, help="Flow steps for the sampled measures (0: none)."
    ),
    lpips_torch_home: Optional[str] = typer.Option(
        None, "--lpips-torch-home", help="Dir with hub/checkpoints/<backbone>.pth for LPIPS."
    ),
    device: str = typer.Option("auto", "--device"),
    rrd: Optional[str] = typer.Option(
        None, "--rrd", help="Also write renders, Gaussians and ground truth to this Rerun file."
    ),
    config: Optional[str] = typer.Option(None, "--config", help="Training config the checkpoint must match."),
):
    """Measure a checkpoint on held-out clips: PSNR, SSIM, LPIPS, depth AbsRel and delta, track EPE."""
    from training.config import TrainConfigError
    from training.evaluate import EvalError, evaluate
    from training.load import CheckpointError

    if split not in ("val", "train"):
        _fail(f"--split must be val or train, got {split!r}")
    try:
        res = evaluate(
            ckpt,
            data,
            out,
            split=split,
            clips=clips,
            resolution=resolution,
            frames=frames,
            sample_steps=sample_steps,
            lpips_torch_home=lpips_torch_home,
            device=device,
            rrd=rrd,
            config=config,
        )
    except (EvalError, CheckpointError, ConfigError, TrainConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
    keys = ("psnr", "ssim", "lpips", "depth_abs_rel", "depth_delta_1_25", "track_epe_m")
    out_console.print(
        f"{res['clips']} clips: " + ", ".join(f"{k} {res[k]:.4g}" if res[k] is not None else f"{k} -" for k in keys),
        highlight=False,
    )
    out_console.print(
        f"{out}/metrics.json, {out}/eval.html" + (f", {rrd}" if rrd else ""), highlight=False, markup=False
    )


@app.command("generate")
def generate_cmd(
    ckpt: str = typer.Argument(..., help="A checkpoint file, or a training workdir (its best, else latest)."),
    image: str = typer.Option(..., "--image", help="The first frame (resolution x resolution, or --resize)."),
    trajectory: str = typer.Option(
        ...,
        "--trajectory",
        help="RealEstate10K .txt, .json/.npz cameras, a build OUT with --clip, or orbit[:R] / dolly[:D] / pan[:D] (metres).",
    ),
    out: str = typer.Option(..., "--out", help="Writes mp4s, ply/, cameras.json and timings.json here."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt (needs a T5 encoder)."),
    steps: int = typer.Option(25, "--steps", min=1, help="Flow-matching sampling steps."),
    seed: int = typer.Option(0, "--seed"),
    frames: Optional[int] = typer.Option(None, "--frames", help="Default: the last stage's."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Default: the last stage's."),
    resize: bool = typer.Option(False, "--resize", help="Centre-crop and resize an image of another size."),
    fov: float = typer.Option(
        60.0, "--fov", help="Field of view (degrees) of presets and of files without intrinsics."
    ),
    clip: Optional[str] = typer.Option(None, "--clip", help="With --trajectory OUT: the cameras of this clip."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="T5 encoder dir for --prompt."),
    ply: bool = typer.Option(True, "--ply/--no-ply", help="Write per-frame Gaussians as .ply."),
    device: str = typer.Option("auto", "--device"),
    config: Optional[str] = typer.Option(None, "--config", help="Training config the checkpoint must match."),
):
    """One image + a camera path -> deformable Gaussians rendered to videos (RGB, depth), novel views, .ply files."""
    from training.config import TrainConfigError
    from training.evaluate import EvalError
    from training.generate import GenerateError, generate
    from training.load import CheckpointError

    try:
        res = generate(
            ckpt,
            image,
            trajectory,
            out,
            prompt=prompt,
            steps=steps,
            seed=seed,
            frames=frames,
            resolution=resolution,
            resize=resize,
            fov_deg=fov,
            clip=clip,
            device=device,
            text_encoder=text_encoder,
            write_ply=ply,
            config=config,
        )
    except (GenerateError, EvalError, CheckpointError, ConfigError, TrainConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
    out_console.print(
        f"{res['frames']} frames at {res['resolution']}x{res['resolution']}: {res['scene_s']:.2f} s per scene "
        f"({res['device']}), {res['gaussians_per_frame']} Gaussians per frame; {out}",
        highlight=False,
    )


def _parity(kind: str, fixture_dir: str, salt: str) -> None:
    if not Path(fixture_dir).is_dir():
        _fail(f"fixture folder not found: {fixture_dir}")
    if kind == "vda":
        from stages.depth.vda.parity import format_report, run_parity
    else:
        from stages.tracks.cotracker.parity import format_report, run_parity
    try:
        cases = run_parity(fixture_dir, salt=salt)
    except (FileNotFoundError, json.JSONDecodeError) as exc:  # a fixture's file missing or not its JSON
        why = f"missing {exc.filename}" if getattr(exc, "filename", None) else str(exc)
        _fail(why if "parity fixture" in why else f"{fixture_dir}: not a {kind} parity fixture folder ({why})")
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
