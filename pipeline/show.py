"""``d4s show OUT --clip KEY [--rrd FILE | --spawn]``: one written clip, from its shard, into Rerun.

The clip is found through the ledger (the done shard that holds it and the byte offset of its
sample; :mod:`pipeline.shard_read`), decoded by :func:`pipeline.sample_format.decode_sample` and
logged by :func:`pipeline.rerun_log.log_clip` under ``gt``, with its metadata and QC in the
recording's properties. ``--rrd`` writes a recording file (through
:meth:`pipeline.storage.Store.write_bytes_atomic`, so a local path or an object-store URL, never
half-written); ``--spawn`` starts the Rerun viewer (the ``rerun`` program that rerun-sdk installs)
and streams the clip to it.
"""

from __future__ import annotations

import difflib
import os
import posixpath
import shutil
import tempfile

from manifests.store import ManifestStore
from pipeline.rerun_log import import_rerun, log_clip, send_clip_properties
from pipeline.shard_read import failed_clips, read_sample, written_samples
from pipeline.storage import Store

APPLICATION_ID = "d4s"


class ShowError(ValueError):
    """Why a clip cannot be shown (unknown key, failed clip, no viewer); one line for the CLI."""


def load_clip_sample(output: str, key: str) -> tuple[dict, object]:
    """(raw sample, its :class:`~pipeline.shard_read.SampleLocation`) of clip ``key`` in ``output``."""
    store = Store(output)
    ms = ManifestStore(store)
    if not ms.has_plan():
        raise FileNotFoundError(f"{output} is not a d4s output (no manifests/shards.parquet); run `d4s build` first")
    events = ms.ledger_events()
    written = written_samples(ms.shards(), events)
    loc = written.get(key)
    if loc is None:
        failed = failed_clips(events).get(key)
        if failed:
            raise ShowError(
                f"clip {key} failed at {failed.get('stage')}: {failed.get('reason')}"
                + (f" [{failed['path']}]" if failed.get("path") else "")
                + "; it is in no shard"
            )
        planned = {c for sh in ms.shards() for c in sh["clip_ids"]}
        if key in planned:
            raise ShowError(f"clip {key} is planned but its shard is not done yet (d4s status / d4s resume {output})")
        near = difflib.get_close_matches(key, list(written), n=3, cutoff=0.5)
        hint = (
            f"; did you mean {', '.join(near)}?"
            if near
            else f"; {len(written)} clips are written (d4s status {output})"
        )
        raise ShowError(f"no clip {key!r} in {output}{hint}")
    return read_sample(store, loc), loc


def _rgb_jpeg(sample: dict, num_frames: int) -> list[bytes]:
    return [sample[f"rgb.{i:03d}.jpg"] for i in range(num_frames)]


def show_clip(output: str, key: str, rrd: str | None = None, spawn: bool = False) -> str:
    """Write clip ``key`` of ``output`` to the recording file ``rrd`` or a spawned viewer; return where."""
    if bool(rrd) == bool(spawn):
        raise ShowError("give exactly one of --rrd FILE (write a recording) or --spawn (open the Rerun viewer)")
    if rrd and "://" not in rrd and os.path.isdir(rrd):
        raise ShowError(
            f"--rrd {rrd} is a folder; give the recording file to write, e.g. {os.path.join(rrd, 'clip.rrd')}"
        )
    if rrd and "://" not in rrd:
        parent = os.path.dirname(os.path.abspath(rrd))
        while parent and not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if os.path.exists(parent) and not os.path.isdir(parent):  # checked before any work
            raise ShowError(f"--rrd {rrd}: {parent} is a file, not a folder to write the recording in")
    rr = import_rerun()
    if spawn and shutil.which("rerun") is None:
        raise ShowError(
            "no Rerun viewer found (the `rerun` program on PATH; pip install rerun-sdk installs it); "
            "write a file with --rrd FILE and open it where a viewer runs"
        )
    sample, _loc = load_clip_sample(output, key)
    from pipeline.sample_format import decode_sample

    clip = decode_sample(sample)
    rec = rr.RecordingStream(APPLICATION_ID, recording_id=key, send_properties=True)
    rec.set_log_time_enabled(False)  # only the clip's own timelines: the file depends on the clip alone
    tmpdir = None
    try:
        if spawn:
            rec.spawn()
        else:
            tmpdir = tempfile.mkdtemp(prefix="d4s-rrd-")
            rec.save(os.path.join(tmpdir, "clip.rrd"))
        rec.send_recording_name(key)
        send_clip_properties(rec, clip)
        log_clip(rec, clip, prefix="gt", rgb_jpeg=_rgb_jpeg(sample, clip.num_frames))
        rec.flush()
        rec.disconnect()
        if spawn:
            return "the Rerun viewer"
        with open(os.path.join(tmpdir, "clip.rrd"), "rb") as f:
            data = f.read()
        parent, name = posixpath.split(rrd.replace(os.sep, "/"))
        dest = Store(parent or ".")
        dest.makedirs("")
        dest.write_bytes_atomic(name, data)
        return dest.display(name)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
