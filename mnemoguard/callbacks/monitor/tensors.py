"""The probe tensors, built from a probe spec: one *row* per (probe, band, draw) with its fixed inputs.

Images are taken in their canonical view (centre crop, no flip) and encoded with the VAE posterior mean; noise,
generation latents and curvature noise come from generators seeded by the spec; caption conditioning from a
:class:`~mnemoguard.prompts.PromptEncoder` of the monitor's own (each caption encoded alone). So no probe input
depends on any RNG but the monitor's, on the batch a caption came in, or on the rank. The spec's fixed timesteps are
*levels* of the schedule (:mod:`mnemoguard.family.schedule`); the network gets their timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...data import decode_image, preprocess_image
from ...family.conditioning import Conditioning
from .probes import heldout_item

__all__ = ["AT_RISK_KINDS", "ProbeSet", "ProbeTensors", "build_probe_tensors", "encode_pixels"]

#: the kinds of probe chosen because their image or caption is repeated in the training data
AT_RISK_KINDS = ("image_duplicate", "duplicate")


@dataclass(frozen=True)
class ProbeSet:
    """The monitor's probes, one entry per probe, as the danger-zone tracker and the visual check read them: the ``P``
    training probes first, then the held-out samples with images (held-out *captions* have no image of their own and
    are not in it)."""

    x0: Tensor  # [Q, C, H, W] clean model input of each probe (device)
    cond: Conditioning  # [Q] its caption's conditioning (device)
    uncond: Conditioning  # [1] the empty caption's (device)
    kinds: list[str]  # [Q] "image_duplicate" / "duplicate" (at risk: AT_RISK_KINDS), "random", "heldout"
    captions: list[str]  # [Q]
    pool: Tensor  # [K, C, H, W] the training images of the nearest-neighbour pool in [0, 1] (CPU), distinct
    heldout_pixels: Tensor  # [Q - P, C, H, W] the held-out probes' images in [0, 1] (CPU)
    own: Tensor  # [Q] long: each probe's own image in ``reference`` (−1: not in it)
    seed: int  # the monitor's seed (every fixed draw derives from it)

    @property
    def num_train_probes(self) -> int:
        return sum(k != "heldout" for k in self.kinds)

    @property
    def reference(self) -> Tensor:
        """``[K + Q − P, ...]``: the pool's training images, then the held-out probes' images."""
        return torch.cat([self.pool, self.heldout_pixels])

    @property
    def is_training(self) -> Tensor:
        """``[K + Q − P]`` bool: which references are training images."""
        return torch.arange(self.pool.shape[0] + self.heldout_pixels.shape[0]) < self.pool.shape[0]


@dataclass
class ProbeTensors:
    """Row-aligned probe inputs (``N`` rows = probes x bands x draws) and the visual check's inputs."""

    x0: Tensor  # [N, C, H, W] clean model input (device)
    noise: Tensor  # [N, C, H, W] fixed ε (device)
    level: Tensor  # [N] long levels of the schedule (device)
    t: Tensor  # [N] their timesteps, as the network takes them (device)
    band: Tensor  # [N] long band index (CPU)
    probe: Tensor  # [N] long probe id (CPU): training probes 0..P-1, then held-out
    cond: Conditioning  # [N] caption conditioning (device)
    uncond: Conditioning  # [1] the empty caption's (device)
    captions: list[str]  # [N]
    num_train_probes: int  # P
    pool_rows: list[int]  # dataset row of each image of probe_set.pool (the nearest-neighbour pool)
    gen_latents: Tensor  # [G, C, h, w] initial noise of the probe generations (CPU)
    gen_cond: Conditioning | None  # [G] their caption conditioning (device)
    curv_noise: Tensor  # [G, C, h, w] noise that re-noises a generation for its curvature map (CPU)
    probe_set: ProbeSet  # the same probes, one entry each

    def noisy(self, rows: Tensor, schedule: Any) -> Tensor:
        """``x_t = α_t x_0 + σ_t ε`` of the given rows (the schedule's ``add_noise``)."""
        return schedule.add_noise(self.x0[rows], self.noise[rows], self.t[rows])


def _to_pixels(image: Any, resolution: int, channels: int) -> Tensor:
    """A held-out image (PIL, a ``datasets`` image cell, or a ``[C, H, W]`` tensor in [-1, 1]) -> ``[C, H, W]``."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != channels or tuple(image.shape[1:]) != (resolution, resolution):
            raise ValueError(f"held-out image tensors must be [{channels}, {resolution}, {resolution}] in [-1, 1], "
                             f"found shape {tuple(image.shape)}")
        return image.float()
    return preprocess_image(decode_image(image), resolution, channels, center_crop=True, flip=False)


def encode_pixels(context: Any, pixels: list[Tensor]) -> Tensor:
    """Canonical images in [-1, 1] -> the network's sample space (``context.encode_images``, 16 at a time), on the
    context's device."""
    with torch.no_grad():
        return torch.cat([context.encode_images(torch.stack(pixels[i:i + 16]).to(context.device))
                          for i in range(0, len(pixels), 16)])


def build_probe_tensors(spec: dict[str, Any], context: Any, heldout: Any, curvature_num_probes: int) -> ProbeTensors:
    """The tensors of ``spec`` on ``context.device`` (module docstring)."""
    from ...prompts import PromptEncoder

    ds, device = context.dataset, context.device
    res, channels = ds.cfg.resolution, ds.channels
    train_px = [ds.canonical_image(r) for r in spec["train_rows"]]
    own_px = list(train_px)
    if spec["heldout_source"] == "samples":
        cols = (ds.cfg.image_column, ds.cfg.caption_column)
        own_px += [_to_pixels(heldout_item(heldout, j, *cols)[0], res, channels) for j in spec["heldout_rows"]]
    x0_own = encode_pixels(context, own_px)
    nb, nd = len(spec["bands"]), spec["draws_per_band"]
    per = nb * nd
    gn = torch.Generator().manual_seed(spec["seed"] + 1)
    noise = torch.randn((len(own_px) * per, *x0_own.shape[1:]), generator=gn)
    t = torch.tensor(spec["timesteps"], dtype=torch.long)  # levels
    if t.numel() != len(own_px) * per:
        raise ValueError(f"MemorizationMonitor: the probe spec has {t.numel()} timesteps, expected "
                         f"{len(own_px) * per} ({len(own_px)} probes x {nb} bands x {nd} draws)")
    x0 = x0_own.repeat_interleave(per, dim=0)
    band = torch.arange(nb).repeat_interleave(nd).repeat(len(own_px))
    probe = torch.arange(len(own_px)).repeat_interleave(per)
    P = len(spec["train_rows"])
    captions = [cap for cap in spec["train_captions"] for _ in range(per)]
    if spec["heldout_source"] == "samples":
        captions += [cap for cap in spec["heldout_captions"] for _ in range(per)]
    elif spec["heldout_source"] == "captions":  # unseen captions at the inputs of training probe h mod P
        src = torch.tensor(spec["heldout_rows"], dtype=torch.long)
        idx = (src[:, None] * per + torch.arange(per)[None]).reshape(-1)
        x0, noise, t, band = torch.cat([x0, x0[idx]]), torch.cat([noise, noise[idx]]), torch.cat([t, t[idx]]), \
            torch.cat([band, band[idx]])
        probe = torch.cat([probe, P + torch.arange(len(src)).repeat_interleave(per)])
        captions += [cap for cap in spec["heldout_captions"] for _ in range(per)]

    pool_px, pool_rows, seen = [], [], {}
    for r in [*spec["train_rows"], *spec["pool_rows"]]:
        try:
            px = ds.canonical_image(r)
        except ValueError:
            continue
        key = px.numpy().tobytes()
        if key not in seen:
            seen[key] = len(pool_px)
            pool_px.append((px + 1) / 2)
            pool_rows.append(r)
    own = [seen.get(px.numpy().tobytes(), -1) for px in train_px]
    G = min(curvature_num_probes, P)
    gg = torch.Generator().manual_seed(spec["seed"] + 2)
    gen_latents = torch.randn((G, *context.denoiser.adapter.sample_shape), generator=gg)
    curv_noise = torch.randn(gen_latents.shape, generator=gg)

    prompts = PromptEncoder(context.prompts.encode, device=device, max_bytes=0)  # the monitor's own, uncached
    unique = list(dict.fromkeys([*captions, *spec["train_captions"][:G], ""]))
    encoded = prompts(unique)
    row = {cap: i for i, cap in enumerate(unique)}
    level = t.to(device)
    pool = torch.stack(pool_px) if pool_px else torch.zeros((0, channels, res, res))
    held = len(own_px) - P  # held-out samples with images (0 for held-out captions)
    heldout_px = torch.stack([(p + 1) / 2 for p in own_px[P:]]) if held else torch.zeros((0, channels, res, res))
    K = pool.shape[0]
    probe_set = ProbeSet(
        x0=x0_own, cond=encoded[[row[cap] for cap in spec["train_captions"]]
                                + [row[cap] for cap in spec["heldout_captions"][:held]]],
        uncond=encoded[[row[""]]], kinds=[*spec["train_kinds"], *(["heldout"] * held)],
        captions=[*spec["train_captions"], *spec["heldout_captions"][:held]],
        pool=pool, heldout_pixels=heldout_px,
        own=torch.tensor([*own, *range(K, K + held)], dtype=torch.long), seed=int(spec["seed"]))
    return ProbeTensors(
        x0=x0.to(device), noise=noise.to(device), level=level, t=context.schedule.timesteps_at(level), band=band,
        probe=probe, cond=encoded[[row[cap] for cap in captions]], uncond=encoded[[row[""]]], captions=captions,
        num_train_probes=P, pool_rows=pool_rows, gen_latents=gen_latents,
        gen_cond=encoded[[row[cap] for cap in spec["train_captions"][:G]]] if G else None,
        curv_noise=curv_noise, probe_set=probe_set,
    )
