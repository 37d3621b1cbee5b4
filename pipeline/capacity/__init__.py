"""Capacity model behind ``d4s plan``: scenes, clips, output bytes and GPU-hours before a build.

One module per concern:

=================  ==========================================================================
``costs.py``       the per-frame costs file (``costs.yaml``): pydantic schema, figure lookup
``models.py``      per-clip cost models (depth, tracks, bytes of a sample)
``rows.py``        counts of a dataset -> its report row; the report around the rows
``from_config.py`` ``capacity_report(cfg)``: a config's real plan and a probe of its data
``from_counts.py`` ``projection_from_counts``: a table of counts instead of data (full build)
``text.py``        the report as text tables
=================  ==========================================================================

``capacity_report(cfg)`` plans the config with the real planner (:func:`pipeline.plan.make_plan`,
so the scene and clip counts are exactly what ``d4s build`` would plan), reads the first planned
clip of every dataset to learn its image size (and its ground-truth track count), and turns the
counts into projected costs with the measured per-frame figures of ``costs.yaml`` (every figure
there names the benchmark, machine and RESULTS section it comes from; the few that are
assumptions say so and are listed in the report). The command line is ``d4s plan``
(pipeline/cli.py); ``bench/measure_bytes_per_pixel.py`` re-measures the byte figures.

How each cost is modelled (docs/CLUSTER.md, "Capacity planning", has the derivation):

* **depth** (Video Depth Anything, datasets whose ``depth_source`` is not ``gt``): the measured
  whole-video frames/s at 518x518 is split into a per-distinct-frame part (encoder) and a
  per-window-frame part (temporal head) in the proportion of the measured profile; a pass of T
  frames costs ``a*T + b*32*windows(T)`` (short passes still fill a 32-frame window) and both parts
  scale with the network input pixels (:func:`stages.depth.vda.infer.network_size` of the
  image size and ``input_size``) to the power fitted through the two measured resolutions.
* **tracks** (CoTracker3, ``track_source: cotracker``): cost proportional to point-frames
  (``len(query_frames) * grid_size**2`` points x T frames, twice for the offline model's backward
  pass) at the measured point-frames/s. The model always resizes to 384x512, so the image size
  does not enter. A pass is a scene's frame sequence with scene passes (``pipeline/stage_routes.py``;
  each segment of a long scene), else a clip.
* **megasam** (``depth_source: megasam``): GPU-seconds per frame of its passes; *not measured* in
  this project. Its cache in the output store is counted at its bound
  (:func:`stages.align.megasam.cache_entry_bytes`: 2 bytes per cached depth pixel, 136 per frame).
* **CPU** (ingest, encode, write per frame, scaled linearly with the stored pixels; align per
  frame for depth-model datasets).
* **output bytes**: JPEG and depth-PNG bytes per pixel measured at several sizes (interpolated
  log-log, constant beyond the largest measured size), plus tracks (13 bytes per point-frame),
  cameras, meta and tar headers.
"""

from pipeline.capacity.costs import COSTS_PATH, Costs, CostsError, load_costs
from pipeline.capacity.from_config import capacity_report
from pipeline.capacity.from_counts import FULL_BUILD_COUNTS, full_build_markdown, projection_from_counts
from pipeline.capacity.text import format_capacity

__all__ = [
    "COSTS_PATH",
    "Costs",
    "CostsError",
    "load_costs",
    "capacity_report",
    "FULL_BUILD_COUNTS",
    "full_build_markdown",
    "projection_from_counts",
    "format_capacity",
]
