"""The packages d4s needs beyond its own imports, who needs them and why, checked before any work.

Adapters, model stages and the trainer import their heavier or optional packages lazily (a
video decoder only when a video is read, OpenEXR only for MatrixCity depth), so one dataset's
dependency never breaks another. Found at first use, a missing one fails inside a Ray worker,
clip after clip, each time with its own message. Instead every such package is declared here
once, with its import name, the pip requirement that installs it (as pinned in pyproject.toml)
and why it is needed; ``d4s build`` (before planning, so before Ray starts), ``d4s plan`` and
``d4s train`` collect what their config needs and stop with one message listing every missing
package and how to install it.

Declaring a new one: add a :class:`Requirement` to :data:`NEEDS` under the adapter's dataset
name (``dataset:<name>``), the model stage, or the trainer feature that imports it; or, for a new
storage protocol, nothing: fsspec's registry says which package implements each protocol.

The check runs where the command runs (the driver). On a cluster, the worker image must hold
the same packages (docs/CLUSTER.md).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from pipeline.config import BuildConfig, ConfigError


@dataclass(frozen=True)
class Requirement:
    module: str  # import name
    pip: str  # what `pip install` takes (the pyproject.toml pin)
    why: str


_TORCH = "torch>=2.2"
_RAY = Requirement("ray", "ray[data]>=2.9", "runs the build's stage DAG and the trainer's workers")

NEEDS: dict[str, tuple[Requirement, ...]] = {
    "build": (_RAY, Requirement("webdataset", "webdataset>=0.2.86", "writes the shard tars")),
    # adapters (stages/ingest/<name>.py), by dataset
    "dataset:matrixcity": (Requirement("OpenEXR", "OpenEXR>=3.2", "MatrixCity depth maps are OpenEXR files"),),
    "dataset:spring": (Requirement("h5py", "h5py>=3.8", "Spring disparity files (.dsp5) are HDF5"),),
    "dataset:kubric_movi_f": (
        Requirement("google.protobuf", "protobuf>=4", "Kubric MOVi-F records are tf.train.Example protobufs"),
    ),
    "dataset:realestate10k": (
        Requirement(
            "av", "av>=12", "RealEstate10K clip videos are decoded with PyAV (when frames are not extracted as images)"
        ),
    ),
    "dataset:stereo4d": (Requirement("av", "av>=12", "Stereo4D frames are decoded from its rectified videos"),),
    # adapter options that pick an optional package (RealEstate10K / Stereo4D `decoder`)
    "decoder:torchcodec": (
        Requirement(
            "torchcodec",
            "torchcodec",
            "options.decoder: torchcodec (NVDEC video decoding; match your torch build, README 'Video decoding')",
        ),
    ),
    # model stages
    "stage:depth": (Requirement("torch", _TORCH, "runs Video Depth Anything (depth_source other than gt)"),),
    "stage:cotracker": (Requirement("torch", _TORCH, "runs CoTracker3 (track_source cotracker)"),),
    # the trainer and its optional features (training/config.py)
    "train": (
        Requirement("torch", _TORCH, "the Diff4Splat model"),
        Requirement("diffusers", "diffusers>=0.30", "the CogVideoX backbone and VAE"),
        _RAY,
    ),
    "train:gsplat": (Requirement("gsplat", "gsplat>=1.4", "runtime.renderer: gsplat (CUDA rasteriser)"),),
    "train:lpips": (
        Requirement("lpips", "lpips", "loss.lpips_enabled (perceptual loss)"),
        Requirement("torchvision", "torchvision", "lpips imports it (match your torch build)"),
    ),
}

# pip requirements for storage packages that pyproject.toml pins (others: the module's own name)
_STORAGE_PINS = {"s3fs": "s3fs>=2024.6", "gcsfs": "gcsfs>=2024.6"}


class MissingPackages(ConfigError):
    """Packages the command's config needs are not installed: the message lists each with its
    pip requirement and who needs it, and one pip command installing them all."""


@dataclass(frozen=True)
class Need:
    req: Requirement
    who: str  # what in the config needs it, e.g. "dataset matrixcity"


def storage_needs(url: str | None, who: str) -> list[Need]:
    """The fsspec implementation of ``url``'s protocol, when it is a separate package."""
    from fsspec.core import split_protocol
    from fsspec.registry import known_implementations

    protocol, _ = split_protocol(url or "")
    impl = known_implementations.get(protocol or "file")
    module = impl["class"].split(".")[0] if impl else None
    if not module or module == "fsspec":
        return []
    return [Need(Requirement(module, _STORAGE_PINS.get(module, module), f"{protocol}:// storage"), who)]


def build_needs(cfg: BuildConfig) -> list[Need]:
    """What a build of ``cfg`` imports: Ray and the writer, the enabled datasets' adapters, the
    model stages their routing runs, and the storage of the output and of every root."""
    cfg = cfg.resolved()
    out = [Need(r, "the build") for r in NEEDS["build"]]
    out += storage_needs(cfg.output, "the output")
    for name, ds in sorted(cfg.datasets.items()):
        if not ds.enabled:
            continue
        who = f"dataset {name}"
        if not _reads_no_video(name, ds.options):
            out += [Need(r, who) for r in NEEDS.get(f"dataset:{name}", ())]
        if ds.options.get("decoder") == "torchcodec":
            out += [Need(r, f"{who} (options.decoder)") for r in NEEDS["decoder:torchcodec"]]
        if ds.depth_source != "gt":
            out += [Need(r, f"{who} (depth_source {ds.depth_source})") for r in NEEDS["stage:depth"]]
        if ds.track_source == "cotracker":
            out += [Need(r, f"{who} (track_source cotracker)") for r in NEEDS["stage:cotracker"]]
        out += storage_needs(ds.root, f"{who} (root)")
    return out


def _reads_no_video(name: str, options: dict) -> bool:
    """RealEstate10K configured to read extracted frames only (``form: camera_files``, ``frames:
    images``) decodes no video, so it needs no video decoder."""
    return name == "realestate10k" and options.get("frames") == "images" and options.get("form") == "camera_files"


def train_needs(tcfg) -> list[Need]:
    """What ``d4s train`` with ``tcfg`` (a ``training.config.TrainConfig``) imports."""
    out = [Need(r, "the trainer") for r in NEEDS["train"] if r.module != "ray" or tcfg.runtime.launcher == "ray"]
    if tcfg.runtime.renderer == "gsplat":
        out += [Need(r, "runtime.renderer") for r in NEEDS["train:gsplat"]]
    if tcfg.loss.lpips_enabled:
        out += [Need(r, "loss.lpips_enabled") for r in NEEDS["train:lpips"]]
    out += storage_needs(tcfg.workdir, "workdir")
    for url in [tcfg.data.root, *tcfg.data.shards]:
        if url:
            out += storage_needs(url, "training data")
    return out


def is_installed(module: str) -> bool:
    """Importable, judged without importing it (``find_spec``: no start-up cost, no side effects)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module stubbed out as None
        return False


def missing(needs: list[Need]) -> dict[Requirement, list[str]]:
    """The requirements of ``needs`` that are not installed -> who needs each (in first-need order)."""
    out: dict[Requirement, list[str]] = {}
    installed: dict[str, bool] = {}
    for n in needs:
        if n.req.module not in installed:
            installed[n.req.module] = is_installed(n.req.module)
        if not installed[n.req.module]:
            whos = out.setdefault(_by_module(out, n.req), [])
            if n.who not in whos:
                whos.append(n.who)
    return out


def _by_module(found: dict[Requirement, list[str]], req: Requirement) -> Requirement:
    """One entry per module (the first declaration wins, so the message lists a package once)."""
    return next((r for r in found if r.module == req.module), req)


def check(needs: list[Need], what: str) -> None:
    """Raise :class:`MissingPackages` listing every missing package of ``needs`` (none: return)."""
    gone = missing(needs)
    if not gone:
        return
    lines = [f"{what} needs {len(gone)} package(s) that are not installed:"]
    for req, whos in gone.items():
        lines.append(f"  - {req.module}: pip install '{req.pip}'  ({req.why}; needed by {', '.join(whos)})")
    lines.append("install them all: pip install " + " ".join(f"'{r.pip}'" for r in gone))
    raise MissingPackages("\n".join(lines))
