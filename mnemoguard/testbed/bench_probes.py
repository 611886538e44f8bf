"""Model-side measurements of the benchmark: sampling with recorded trajectories, copy and template-verbatim ground
truth, per-band losses and denoising from noised training images.

Everything here is deterministic given its seeds and never touches the global RNG (initial noise comes from one
``torch.Generator`` per generated image, so a caption's noise does not depend on how captions are batched).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..baselines import Baseline
from ..denoiser import Denoiser
from ..evaluation import (
    GU_RATIO_THRESHOLD,
    KIM_LEE_TV_THRESHOLD,
    bootstrap_mean,
    nearest_neighbour_ratio,
    template_verbatim,
)
from ..parameterisation import denoising_loss
from ..sampling import ddim_scheduler, generate
from .ground_truth import GroundTruth

__all__ = [
    "ProbeModel",
    "Trajectory",
    "band_losses",
    "copy_ground_truth",
    "denoise_from",
    "probe_latents",
    "sample_with_trajectory",
    "template_threshold",
    "template_verbatim_rate",
]


@dataclass
class ProbeModel:
    """What every measurement needs: the live UNet (pixel space), its schedule and the less-trained baseline.

    Attributes:
        unet: the live (unwrapped) UNet, in eval mode while probed.
        scheduler: the training noise scheduler (DDPM config; the samplers derive DDIM from it).
        denoiser: ``Denoiser(unet, scheduler)``.
        ema: the EMA weights as a baseline (:func:`mnemoguard.baselines.ema_baseline`), or ``None``.
        encode: captions -> ``[B, L, D]`` text embeddings (a :class:`~mnemoguard.prompts.PromptEncoder`).
        uncond: the empty-caption embedding ``[1, L, D]``.
    """

    unet: nn.Module
    scheduler: Any
    denoiser: Denoiser
    ema: Baseline | None
    encode: Callable[[list[str]], Tensor]
    uncond: Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the UNet's samples (pixel space: the images)."""
        cfg = self.unet.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))


@dataclass
class Trajectory:
    """A DDIM sampling run with every UNet call recorded.

    Attributes:
        timesteps: the DDIM timesteps, in sampling order (``S`` of them).
        x: ``[S, B, C, H, W]`` the model input x_t at each step.
        eps_cond: ``[S, B, C, H, W]`` conditional noise predictions.
        eps_uncond: the same for the empty caption (guided runs only), else ``None``.
        images: ``[B, C, H, W]`` final images in [0, 1].
        seconds: wall time of the run.
    """

    timesteps: list[int]
    x: Tensor
    eps_cond: Tensor
    eps_uncond: Tensor | None
    images: Tensor
    seconds: float


def probe_latents(seeds: Sequence[int], shape: tuple[int, int, int]) -> Tensor:
    """``[len(seeds), C, H, W]`` standard normal noise; row ``i`` comes from its own generator seeded ``seeds[i]``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class _Recorder:
    """Forward hook that keeps (t, x_t, output) of every UNet call made inside the ``with`` block."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.calls: list[tuple[int, Tensor, Tensor]] = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        out = output[0] if isinstance(output, (tuple, list)) else output.sample
        step = int(torch.as_tensor(t).reshape(-1)[0])
        self.calls.append((step, x.detach().float().cpu(), out.detach().float().cpu()))

    def __enter__(self) -> _Recorder:
        self.handle = self.unet.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


@torch.no_grad()
def sample_with_trajectory(
    model: ProbeModel,
    cond: Tensor,
    latents: Tensor,
    guidance_scale: float,
    num_inference_steps: int,
    batch_size: int = 64,
) -> Trajectory:
    """Images from :func:`mnemoguard.sampling.generate` (DDIM + CFG) with every UNet call of the run recorded.

    ``cond`` is ``[B, L, D]``, ``latents`` the initial noise ``[B, C, H, W]``; rows are processed ``batch_size`` at
    a time (the result does not depend on it).
    """
    import time

    start = time.perf_counter()
    parts: list[tuple[list[int], Tensor, Tensor, Tensor | None, Tensor]] = []
    guided = guidance_scale != 1.0
    for lo in range(0, cond.shape[0], batch_size):
        c, z = cond[lo : lo + batch_size], latents[lo : lo + batch_size]
        with _Recorder(model.unet) as rec:
            images = generate(model.unet, model.scheduler, c, model.uncond, guidance_scale, num_inference_steps,
                              latents=z)
        ts = [t for t, _, _ in rec.calls]
        xs = torch.stack([x.chunk(2)[0] if guided else x for _, x, _ in rec.calls])
        outs = [o.chunk(2) if guided else (None, o) for _, _, o in rec.calls]
        eps_c = torch.stack([o[1] for o in outs])
        eps_u = torch.stack([o[0] for o in outs]) if guided else None
        parts.append((ts, xs, eps_c, eps_u, images))
    return Trajectory(
        timesteps=parts[0][0],
        x=torch.cat([p[1] for p in parts], dim=1),
        eps_cond=torch.cat([p[2] for p in parts], dim=1),
        eps_uncond=torch.cat([p[3] for p in parts], dim=1) if guided else None,
        images=torch.cat([p[4] for p in parts]),
        seconds=time.perf_counter() - start,
    )


def copy_ground_truth(
    images01: Tensor,
    train01: Tensor,
    own_index: Sequence[int | None],
    *,
    threshold: float = GU_RATIO_THRESHOLD,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Nearest-neighbour-ratio ground truth of generations against the unique training images (both in [0, 1]).

    A generation counts as a copy when d1/d2 < ``threshold``; for a caption with its own training image
    (``own_index[i]`` not ``None``) it counts as *memorized* only if that nearest image is its own. Returns the
    per-image ratio, nearest index and flags, and both fractions with percentile-bootstrap intervals.
    """
    nn_ratio = nearest_neighbour_ratio(images01, train01, value_range=(0.0, 1.0))
    ratio, nearest = nn_ratio.ratio, nn_ratio.indices[:, 0]
    copy = ratio < threshold
    own = torch.tensor([o is not None and int(n) == o for o, n in zip(own_index, nearest.tolist())])
    memorized = copy & own if any(o is not None for o in own_index) else copy

    def frac(flags: Tensor) -> dict[str, float]:
        est = bootstrap_mean(flags.double(), n_resamples=n_resamples, seed=seed)
        return {"fraction": est.estimate, "low": est.low, "high": est.high, "n": est.n}

    return {
        "ratio": ratio.tolist(),
        "nearest": nearest.tolist(),
        "memorized": memorized.tolist(),
        "copy": copy.tolist(),
        "median_ratio": float(ratio.median()),
        "memorized_fraction": frac(memorized),
        "copy_fraction": frac(copy),
    }


def template_threshold(gt: GroundTruth) -> float:
    """Kim & Lee's template-verbatim threshold at the testbed's size (masked MSE kept at 2500 / 196608)."""
    return KIM_LEE_TV_THRESHOLD * gt.channels * gt.resolution**2 / 196_608


def template_verbatim_rate(gt: GroundTruth, images01: Tensor) -> float:
    """Fraction of generations that reproduce the template stamp under its mask."""
    hits = template_verbatim(images01, gt.template_reference(), gt.template_mask()[None], template_threshold(gt))
    return float(hits.float().mean())


@torch.no_grad()
def band_losses(
    model: ProbeModel,
    images: Tensor,
    cond: Tensor,
    bands: Sequence[Sequence[int]],
    *,
    draws: int = 4,
    seed: int = 0,
    batch_size: int = 256,
) -> Tensor:
    """Denoising loss of the live model per noise band: ``[N, len(bands)]``, mean over ``draws`` fixed draws.

    For each image and band, timesteps are spread evenly over the band and noise comes from ``seed``; the loss is the
    training loss (:func:`~mnemoguard.denoiser.denoising_loss` of the network output against
    :meth:`~mnemoguard.denoiser.Denoiser.target`: the MSE to the noise for epsilon models) averaged over pixels.
    Images are in [-1, 1] (what the trainer sees).
    """
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    out = torch.zeros(n, len(bands))
    for j, (lo, hi) in enumerate(bands):
        ts = torch.linspace(lo, hi - 1, draws).round().long()
        x0 = images.repeat(draws, 1, 1, 1)
        c = cond.repeat(draws, 1, 1)
        t = ts.repeat_interleave(n)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = model.scheduler.add_noise(x0, noise, t)
        errs = []
        for s in range(0, x_t.shape[0], batch_size):
            rows = slice(s, s + batch_size)
            pred = model.denoiser.raw(x_t[rows], t[rows], c[rows])
            errs.append(denoising_loss(pred, model.denoiser.target(x0[rows], noise[rows], t[rows])))
        out[:, j] = torch.cat(errs).reshape(draws, n).mean(0)
    return out


@torch.no_grad()
def denoise_from(
    model: ProbeModel,
    images: Tensor,
    cond: Tensor,
    start_index: int,
    num_inference_steps: int,
    *,
    seed: int = 0,
    guidance_scale: float = 1.0,
) -> tuple[Tensor, int]:
    """Noise training images (in [-1, 1]) to DDIM timestep ``timesteps[start_index]`` and denoise them back with
    DDIM (+ CFG): Dodson et al.'s per-noise-level memorization probe. Returns (images in [0, 1], the start t)."""
    ddim = ddim_scheduler(model.scheduler, num_inference_steps)
    timesteps = ddim.timesteps[start_index:]
    t0 = int(timesteps[0])
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    x = model.scheduler.add_noise(images, noise, torch.full((images.shape[0],), t0, dtype=torch.long))
    for t in timesteps:
        if guidance_scale == 1.0:
            eps = model.denoiser.eps(x, t, cond)
        else:
            eps_c, eps_u = model.denoiser.eps_cond_uncond(x, t, cond, model.uncond)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = ddim.step(eps, t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1), t0

