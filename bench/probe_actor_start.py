"""Where a VDA depth actor's start-up goes: each step timed in a fresh process (GPU machine).

    OMP_NUM_THREADS=1 taskset -c 3 python bench/probe_actor_start.py   # one core, as an actor of 1 CPU

Prints the seconds of each step: import torch, CUDA, the empty vitl build, a CPU random fill, the
copy to the GPU, then the build's own path (``VDARunner`` with random weights) and its warm-up."""

# ruff: noqa: E402, I001 - the imports are among the steps timed, in this order
import json
import time

t = {"start": time.time()}
import torch

t["import_torch"] = time.time()
torch.cuda.is_available()
t["cuda_available"] = time.time()
from stages.depth.vda.model import build_vda_empty, randomize_

t["import_vda"] = time.time()
m = build_vda_empty("vitl", metric=False)
t["build_empty"] = time.time()
randomize_(m, seed=0)
t["randomize_cpu"] = time.time()
m = m.to("cuda").eval()
torch.cuda.synchronize()
t["to_cuda"] = time.time()
from stages.depth.vda.runner import VDARunner

t["import_runner"] = time.time()
r = VDARunner(encoder="vitl", device="cuda", dtype="fp16", input_size=518, allow_random_weights=True)
torch.cuda.synchronize()
t["runner_again"] = time.time()
import numpy as np

r.predict([np.zeros((32, 518, 518, 3), np.uint8)])
torch.cuda.synchronize()
t["warm_up"] = time.time()
ks = list(t)
print(json.dumps({k: round(t[k] - t[ks[i - 1]], 3) for i, k in enumerate(ks) if i}))
