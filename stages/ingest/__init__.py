"""Dataset adapters, one module per dataset, looked up by name.

Modules are imported lazily so that one adapter's optional dependency (h5py for Spring, a
video decoder for the real datasets) never breaks the others.
"""

from __future__ import annotations

import importlib

from stages.ingest.base import DatasetAdapter

ADAPTERS: dict[str, str] = {
    "tartanair": "stages.ingest.tartanair:TartanAirAdapter",
    "matrixcity": "stages.ingest.matrixcity:MatrixCityAdapter",
    "pointodyssey": "stages.ingest.pointodyssey:PointOdysseyAdapter",
    "dynamic_replica": "stages.ingest.dynamic_replica:DynamicReplicaAdapter",
    "spring": "stages.ingest.spring:SpringAdapter",
    "vkitti2": "stages.ingest.vkitti2:VKITTI2Adapter",
    "kubric_movi_f": "stages.ingest.kubric:KubricMoviFAdapter",
    "realestate10k": "stages.ingest.realestate10k:RealEstate10KAdapter",
    "stereo4d": "stages.ingest.stereo4d:Stereo4DAdapter",
}


def adapter_class(name: str) -> type[DatasetAdapter]:
    if name not in ADAPTERS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    module, cls = ADAPTERS[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise NotImplementedError(f"the {name} adapter ({module}) is not implemented yet") from None
        raise
    return getattr(mod, cls)


def get_adapter(
    name: str, root: str, options: dict | None = None, depth_range: tuple[float | None, float | None] = (None, None)
) -> DatasetAdapter:
    return adapter_class(name)(root, options, depth_range=depth_range)


def adapter_for_dataset(name: str, ds) -> DatasetAdapter:
    """The adapter of one configured dataset (a ``pipeline.config.DatasetConfig``): its root, its
    options and its valid depth range."""
    return get_adapter(name, ds.root, ds.options, (ds.min_depth_m, ds.max_depth_m))
