"""VDA vitl fp16 frames/s with random weights drawn on the GPU vs on the CPU (same runner, GPU machine).

    python bench/probe_random_weights.py

Alternates the two models three times over one 175-frame 360x640 video; the first round is a warm-up."""

import json
import time

import numpy as np
import torch

from stages.depth.vda.model import build_vda_empty, randomize_
from stages.depth.vda.runner import VDARunner

r = VDARunner(encoder="vitl", device="cuda", dtype="fp16", input_size=518, allow_random_weights=True)
gpu_model = r.model
cpu_model = randomize_(build_vda_empty("vitl"), seed=0).to("cuda").eval()
cpu_model.head_chunk, cpu_model.channels_last = 64, True
rng = np.random.default_rng(0)
video = rng.integers(0, 255, (175, 360, 640, 3), dtype=np.uint8)
r.warm_for([video])
res = {"gpu": [], "cpu": []}
for _ in range(3):
    for name, m in (("gpu", gpu_model), ("cpu", cpu_model)):
        r.model = r._forward = m
        torch.cuda.synchronize()
        t = time.time()
        out = r.predict([video])
        torch.cuda.synchronize()
        res[name].append(round(175 / (time.time() - t), 2))
        res[name + "_out"] = [float(np.nanmean(out[0])), float(np.isfinite(out[0]).mean())]
print(json.dumps(res))
