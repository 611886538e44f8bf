"""The monitor's visual check: where the probe generations are heading, and where in them memorization sits.

For the first ``curvature_num_probes`` training probes: a generation from the probe caption (DDIM from fixed initial
noise, so successive checks are comparable), its nearest image in a pool of training images (the probes plus
``nearest_pool_size`` random rows) with Gu et al.'s distance ratio ``d1/d2`` (below 1/3: a copy), whether that
nearest image is the probe's own, and Kim & Lee's curvature-difference map ``Δh`` (live vs the baseline,
:func:`mnemoguard.signals.curvature_diff_map`, fixed Rademacher probes) at the generation re-noised to the level
``curvature_timestep`` of the schedule. Every rank computes the same set (ZeRO-3 needs equal calls); rank 0's values
are broadcast (:func:`~mnemoguard.callbacks.copies.from_rank_zero`) so the scalars that feed decisions are identical
everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from ..copies import from_rank_zero, own_copies

__all__ = ["visual_check"]


def visual_check(context: Any, den: Any, baseline: Any, tz: Any, config: Any) -> dict[str, Any]:
    """``{"probe_ids", "captions", "generations", "maps", "curvature", "nn_ratio", "nearest_is_own", "nearest",
    "nearest_rows"}`` (images in [0, 1] and maps on the CPU)."""
    from ...sampling import generate
    from ...signals import curvature_diff_map

    c = config
    G = tz.gen_latents.shape[0]
    finals: list[torch.Tensor] = []

    def decode(z: torch.Tensor) -> torch.Tensor:
        finals.append(z.detach().float())
        return context.decode(z)

    with torch.no_grad():
        images = generate(den, tz.gen_cond, tz.uncond, c.generation_guidance_scale, c.generation_steps,
                          latents=tz.gen_latents, decode=decode)
    z = finals[-1]
    schedule = context.schedule
    t = schedule.timesteps_at(torch.full((G,), int(c.curvature_timestep), dtype=torch.long)).to(z.device)
    x = schedule.add_noise(z, tz.curv_noise.to(z.device, z.dtype), t)
    base_fn = baseline.eps_fn(t, tz.gen_cond)
    maps = curvature_diff_map(den.eps_fn(t, tz.gen_cond), base_fn, x, num_probes=c.curvature_hutchinson_probes,
                              generator=torch.Generator().manual_seed(tz.probe_set.seed + 4), method="vjp")
    maps = maps.detach().float().cpu()
    out: dict[str, Any] = {
        "probe_ids": list(range(G)), "captions": list(tz.probe_set.captions[:G]), "generations": images.float().cpu(),
        "maps": maps, "curvature": [float(m.mean()) for m in maps], "nn_ratio": [], "nearest_is_own": [],
        "nearest": None, "nearest_rows": [],
    }
    pool = tz.probe_set.pool
    if pool.shape[0] >= 2 and pool.shape[1:] == images.shape[1:]:
        check = own_copies(images, pool, tz.probe_set.own[:G], copy_ratio=1.0)
        idx = check.nearest.tolist()
        out["nearest"] = pool[idx]
        out["nearest_rows"] = [tz.pool_rows[i] for i in idx]
        curvature, ratio, is_own = from_rank_zero(context, torch.tensor(out["curvature"], dtype=torch.float64),
                                                  check.ratio, check.is_own)
        out["curvature"], out["nn_ratio"], out["nearest_is_own"] = curvature.tolist(), ratio.tolist(), is_own.tolist()
    else:
        (curvature,) = from_rank_zero(context, torch.tensor(out["curvature"], dtype=torch.float64))
        out["curvature"] = curvature.tolist()
    return out
