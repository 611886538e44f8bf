"""Per training image, at one checkpoint: how strongly the model reproduces it.

Three measurements per distinct training image (an :class:`~mnemoguard.audit.data.ImageRecord`), each with fixed
noise so that checkpoints are compared on the same draws:

* ``self_return``: the one-step self-return score (:func:`mnemoguard.signals.self_return_score`) at the noise levels
  where the danger-zone tracker decides (its grid above the data prior's coverage floor), in the network's sample
  space, against every training image (its duplicates excluded from its neighbours);
* ``generation``: one generation from the image's caption (the tracker's sampler, steps and guidance) and its
  nearest training image: ``generation_ratio`` = distance to the image itself / to its nearest other training image
  (Gu et al.'s ratio, below ``copy_ratio`` a copy), ``nearest`` the nearest image overall; in pixels;
* ``wen``: Wen et al.'s first-step text-conditional gap from pure noise (:func:`mnemoguard.signals.wen_norm`) of
  the network's output (ε for an ε-model as in the paper; the velocity for a flow model, whose ε at σ = 1 is the
  input itself and carries no gap).

The images are split across the processes of an ``accelerate launch`` and gathered: every process returns the
whole table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..family.conditioning import Conditioning
from ..signals import self_return_ratio, self_return_score, wen_norm

__all__ = ["ImageSet", "THUMB", "build_image_set", "image_scores"]

THUMB = 64  # pixel comparisons at most this side (area average): bounded memory for 1024 px training sets


@dataclass
class ImageSet:
    """The tensors of the per-image measurement, built once per audit.

    Attributes:
        x0: ``[R, ...]`` each image in the network's sample space (on the device).
        pixels: ``[R, C, h, w]`` each image in [0, 1], at most :data:`THUMB` px (CPU).
        cond: each image's caption; ``uncond``: the empty caption (batch 1).
        identical: ``[R, R]`` images of the same duplicate group (not each other's neighbours).
        noise: ``[L, R, ...]`` the self-return noise per level; ``gen_noise``: ``[R, ...]`` the generations' noise.
        timesteps: the self-return levels (the tracker's decision grid).
    """

    x0: Tensor
    pixels: Tensor
    cond: Conditioning
    uncond: Conditioning
    identical: Tensor
    noise: Tensor
    gen_noise: Tensor
    timesteps: list[float | int]


def thumbnails(images01: Tensor) -> Tensor:
    """``[N, C, H, W]`` in [0, 1] -> at most :data:`THUMB` px on the long side (area average)."""
    side = max(images01.shape[-2:])
    if side <= THUMB:
        return images01.float().cpu()
    size = (max(1, images01.shape[-2] * THUMB // side), max(1, images01.shape[-1] * THUMB // side))
    return F.adaptive_avg_pool2d(images01.float(), size).cpu()


def build_image_set(guard: Any, records: list[Any], groups: list[int], timesteps: list[float | int],
                    seed: int) -> ImageSet:
    """The :class:`ImageSet` of ``records`` (each one's first row) with duplicate group ids ``groups`` (-1: none)."""
    from ..callbacks.monitor.tensors import encode_pixels

    context = guard.context
    px = [context.dataset.canonical_image(r.rows[0]) for r in records]
    x0 = encode_pixels(context, px)
    cond = guard.encode_captions([r.caption for r in records])
    uncond = guard.encode_captions([""])
    g = torch.tensor(groups)
    identical = (g[:, None] == g[None, :]) & (g[:, None] >= 0)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(timesteps), *x0.shape), generator=gen)
    gen_noise = torch.randn((len(records), *context.denoiser.adapter.sample_shape), generator=gen)
    return ImageSet(x0, thumbnails((torch.stack(px) + 1) / 2), cond, uncond, identical, noise, gen_noise,
                    list(timesteps))


@torch.no_grad()
def _rows_scores(guard: Any, s: ImageSet, rows: Tensor, config: Any, batch_size: int) -> dict[str, Tensor]:
    from ..sampling import generate

    context = guard.context
    den, schedule = context.denoiser, context.schedule
    x0_all = s.x0.float()
    ratios = []
    for k, t in enumerate(s.timesteps):
        out = []
        for lo in range(0, rows.numel(), batch_size):
            r = rows[lo:lo + batch_size]
            tt = torch.full((r.numel(),), t, dtype=schedule.timestep_dtype, device=s.x0.device)
            x_t = schedule.add_noise(s.x0[r.to(s.x0.device)], s.noise[k][r].to(s.x0.device, s.x0.dtype), tt)
            out.append(den.x0(x_t, tt, s.cond[r]).float())
        ratios.append(self_return_ratio(torch.cat(out), x0_all, rows, s.identical[rows]))
    self_return = self_return_score(torch.stack(ratios)) if ratios else torch.full((rows.numel(),), math.nan)
    images, wen = [], []
    t_first = schedule.sampling_timesteps(config.num_inference_steps)[0]
    for lo in range(0, rows.numel(), batch_size):
        r = rows[lo:lo + batch_size]
        images.append(thumbnails(generate(den, s.cond[r], s.uncond, config.guidance_scale,
                                          config.num_inference_steps, latents=s.gen_noise[r], decode=context.decode)))
        x_T = s.gen_noise[r].to(s.x0.device)
        tt = torch.full((r.numel(),), t_first, dtype=schedule.timestep_dtype, device=s.x0.device)
        # the network's own output (ε of an ε-model, a flow model's velocity: at σ = 1 its ε is x_T itself)
        out_c, out_u = den.raw_cond_uncond(x_T, tt, s.cond[r], s.uncond)
        wen.append(wen_norm(out_c.float(), out_u.float()).cpu())
    images = torch.cat(images)
    ref = s.pixels.reshape(s.pixels.shape[0], -1).double()
    d = torch.cdist(images.reshape(images.shape[0], -1).double(), ref)
    generation_ratio = self_return_ratio(images, s.pixels, rows, s.identical[rows])
    return {"self_return": self_return.cpu(), "generation_ratio": generation_ratio.cpu(),
            "nearest": d.argmin(dim=1).cpu(), "wen": torch.cat(wen), "generations": images}


def image_scores(guard: Any, s: ImageSet, config: Any, batch_size: int) -> dict[str, Any]:
    """Per image (lists in record order): ``self_return``, ``generation_ratio``, ``nearest`` (record index),
    ``wen``, and ``generations`` (``[R, C, h, w]`` thumbnails in [0, 1]). ``config``: the tracker's settings
    (``num_inference_steps``, ``guidance_scale``). Split across processes, gathered on every one."""
    context = guard.context
    n, world, rank = s.x0.shape[0], context.num_processes, context.process_index
    mine = torch.arange(rank, n, world)
    part = _rows_scores(guard, s, mine, config, batch_size)
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([{"rows": mine.tolist(), **{k: v.tolist() for k, v in part.items()}}])
    else:
        parts = [{"rows": mine.tolist(), **{k: v.tolist() for k, v in part.items()}}]
    out: dict[str, list[Any]] = {k: [None] * n for k in ("self_return", "generation_ratio", "nearest", "wen",
                                                         "generations")}
    for p in parts:
        for i, row in enumerate(p["rows"]):
            for k in out:
                out[k][row] = p[k][i]
    out["generations"] = torch.tensor(out["generations"], dtype=torch.float32)
    return out
