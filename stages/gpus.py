"""Which GPUs this process may use: inside a Ray task or actor, the ones Ray assigned to it.

Ray >= 2.60 no longer sets ``CUDA_VISIBLE_DEVICES`` for a task or actor given no GPU (Ray issue
54868; ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1`` restores the old override): such a worker sees
every GPU of its node, including those held by the model actors. Older Ray set it to ``""``.
So a stage never infers "I have a GPU" from CUDA visibility inside a Ray worker; it asks Ray.
"""

from __future__ import annotations

import sys


def ray_gpu_ids() -> list[str] | None:
    """The ids of the GPUs Ray assigned to the running task or actor (``[]``: none); None when
    this process is not a Ray worker (a driver, ``d4s inspect``, a test), where CUDA visibility
    decides as it always did."""
    ray = sys.modules.get("ray")  # a Ray worker has imported ray before it runs any task
    if ray is None or not ray.is_initialized():
        return None
    from ray._private import worker as ray_worker  # the mode: public API has no "am I a worker"

    if getattr(ray_worker.global_worker, "mode", None) != ray_worker.WORKER_MODE:
        return None
    return [str(g) for g in ray.get_gpu_ids()]


def cuda_visible_devices(gpu_ids) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a command given ``gpu_ids`` (``""``: no GPU visible)."""
    return ",".join(str(g) for g in gpu_ids)
