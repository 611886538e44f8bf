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
from ..family.conditioning import Conditioning
from ..parameterisation import denoising_loss
from ..sampling import generate, sampling_steps
from ..testbed.ground_truth import GroundTruth

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
    """What every measurement needs: the live model (pixel space, any family), its schedule and the less-trained
    baseline.

    Attributes:
        denoiser: the live (unwrapped) model with its adapter and noise schedule, in eval mode while probed.
        ema: the EMA weights as a baseline (:func:`mnemoguard.baselines.ema_baseline`), or ``None``.
        encode: captions -> their conditioning (a :class:`~mnemoguard.prompts.PromptEncoder`).
        uncond: the empty caption's conditioning (batch 1).
    """

    denoiser: Denoiser
    ema: Baseline | None
    encode: Callable[[list[str]], Conditioning]
    uncond: Conditioning

    @property
    def model(self) -> nn.Module:
        return self.denoiser.model

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the model's samples (pixel space: the images)."""
        return self.denoiser.adapter.sample_shape


@dataclass
class Trajectory:
    """A sampling run with every network call recorded (outputs as noise predictions, whatever the family).

    Attributes:
        timesteps: the sampler's timesteps, in sampling order (``S`` of them).
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
    """The denoiser's adapter, keeping ``(t, x_t, ε̂)`` of every call (the raw output converted to a noise prediction
    by the denoiser's parameterisation); everything else is the adapter's."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.inner_adapter, self.denoiser = denoiser.adapter, denoiser
        self.calls: list[tuple[float, Tensor, Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner_adapter"], name)

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None, **kwargs: Any) -> Tensor:
        out = self.inner_adapter(x, t, cond, **kwargs)
        eps = self.denoiser.to_eps(out.float(), x.float(), t)
        step = torch.as_tensor(t).reshape(-1)[0].item()
        self.calls.append((step, x.detach().float().cpu(), eps.detach().float().cpu()))
        return out


@torch.no_grad()
def sample_with_trajectory(
    model: ProbeModel,
    cond: Tensor,
    latents: Tensor,
    guidance_scale: float,
    num_inference_steps: int,
    batch_size: int = 64,
) -> Trajectory:
    """Images from :func:`mnemoguard.sampling.generate` (the family's sampler + CFG) with every network call of the
    run recorded.

    ``cond`` is the captions' conditioning, ``latents`` the initial noise ``[B, C, H, W]``; rows are processed
    ``batch_size`` at a time (the result does not depend on it).
    """
    import time

    start = time.perf_counter()
    parts: list[tuple[list[float], Tensor, Tensor, Tensor | None, Tensor]] = []
    guided = guidance_scale != 1.0
    for lo in range(0, len(cond), batch_size):
        c, z = cond[lo : lo + batch_size], latents[lo : lo + batch_size]
        rec = _Recorder(model.denoiser)
        images = generate(model.denoiser.with_adapter(rec), c, model.uncond, guidance_scale, num_inference_steps,
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
    cond: Conditioning,
    bands: Sequence[Sequence[int]],
    *,
    draws: int = 4,
    seed: int = 0,
    batch_size: int = 256,
) -> Tensor:
    """Denoising loss of the live model per noise band: ``[N, len(bands)]``, mean over ``draws`` fixed draws.

    For each image and band (levels ``[lo, hi)`` of the schedule), levels are spread evenly over the band and noise
    comes from ``seed``; the loss is the training loss (:func:`~mnemoguard.denoiser.denoising_loss` of the network
    output against :meth:`~mnemoguard.denoiser.Denoiser.target`: the MSE to the noise for epsilon models, to
    ``ε − x₀`` for flow models) averaged over pixels. Images are in [-1, 1] (what the trainer sees).
    """
    den = model.denoiser
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    out = torch.zeros(n, len(bands))
    for j, (lo, hi) in enumerate(bands):
        levels = torch.linspace(lo, hi - 1, draws).round().long()
        x0 = images.repeat(draws, 1, 1, 1)
        c = cond.repeat(draws)
        t = den.schedule.timesteps_at(levels.repeat_interleave(n))
        noise = torch.randn(x0.shape, generator=gen)
        x_t = den.schedule.add_noise(x0, noise, t)
        errs = []
        for s in range(0, x_t.shape[0], batch_size):
            rows = slice(s, s + batch_size)
            pred = den.raw(x_t[rows], t[rows], c[rows])
            errs.append(denoising_loss(pred, den.target(x0[rows], noise[rows], t[rows])))
        out[:, j] = torch.cat(errs).reshape(draws, n).mean(0)
    return out


@torch.no_grad()
def denoise_from(
    model: ProbeModel,
    images: Tensor,
    cond: Conditioning,
    start_index: int,
    num_inference_steps: int,
    *,
    seed: int = 0,
    guidance_scale: float = 1.0,
) -> tuple[Tensor, float | int]:
    """Noise training images (in [-1, 1]) to the sampler's step ``start_index`` and denoise them back (+ CFG):
    Dodson et al.'s per-noise-level memorization probe (:func:`mnemoguard.sampling.denoise_from` with one start).
    Returns (images in [0, 1], the start timestep)."""
    from ..sampling import denoise_from as sample_from

    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    out = sample_from(model.denoiser, images, noise, [start_index], cond, model.uncond, guidance_scale,
                      num_inference_steps)
    return out[0], sampling_steps(model.denoiser, num_inference_steps)[start_index][0]
