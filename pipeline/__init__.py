"""d4s pipeline: config, planning, DAG assembly, runner and CLI."""

__version__ = "0.1.0"
