"""Gaussians as a 3D Gaussian Splatting ``.ply``: the layout viewers of that format read.

One binary little-endian ``vertex`` element with float32 properties, in the order of the reference
implementation's ``save_ply`` (graphdeco-inria/gaussian-splatting, ``scene/gaussian_model.py``):
``x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3``, without
``f_rest_*`` (degree-0 colour only). Values are stored before their activations, as that format keeps
them: ``opacity`` = logit(opacity), ``scale_i`` = log(scale in metres), ``rot`` = the unit quaternion
w x y z, ``f_dc`` = the degree-0 spherical-harmonic coefficient, (colour - 0.5) / C0 with
C0 = 0.28209479177387814; normals are 0. Positions are d4s world metres: the first camera's frame,
OpenCV axes (x right, y down, z forward).

The writer is a header plus one numpy record array (no third-party dependency, so it runs wherever
d4s runs); the tests read the files back with the ``plyfile`` package.
"""

from __future__ import annotations

import numpy as np

from training.gaussians import Gaussians

SH_C0 = 0.28209479177387814
PROPERTIES = (
    "x",
    "y",
    "z",
    "nx",
    "ny",
    "nz",
    "f_dc_0",
    "f_dc_1",
    "f_dc_2",
    "opacity",
    "scale_0",
    "scale_1",
    "scale_2",
    "rot_0",
    "rot_1",
    "rot_2",
    "rot_3",
)


def ply_bytes(g: Gaussians) -> bytes:
    """The ``.ply`` file of one Gaussian set (module docs)."""
    n = len(g)
    rec = np.zeros(n, dtype=[(p, "<f4") for p in PROPERTIES])
    cols = {
        ("x", "y", "z"): g.means,
        ("f_dc_0", "f_dc_1", "f_dc_2"): (g.colours.float() - 0.5) / SH_C0,
        ("scale_0", "scale_1", "scale_2"): g.scales.float().clamp_min(1e-12).log(),
        ("rot_0", "rot_1", "rot_2", "rot_3"): g.quats.float()
        / g.quats.float().norm(dim=-1, keepdim=True).clamp_min(1e-12),
    }
    for names, values in cols.items():
        v = values.detach().float().cpu().numpy()
        for i, name in enumerate(names):
            rec[name] = v[:, i]
    o = g.opacities.detach().float().cpu().numpy().clip(1e-6, 1 - 1e-6)
    rec["opacity"] = np.log(o / (1 - o))
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {n}\n" + "".join(f"property float {p}\n" for p in PROPERTIES) + "end_header\n"
    )
    return header.encode("ascii") + rec.tobytes()
