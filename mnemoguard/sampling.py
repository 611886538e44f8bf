"""Text-to-image sampling with classifier-free guidance, for every family, in pixel and latent space alike.

One loop for validation images, probe generations, the danger zone's return test and the testbed's ground truth, so
that they all see the same sampler: the noise schedule's deterministic step (DDIM with η = 0 for DDPM models, the
Euler step of the linear interpolant for flow models: :meth:`mnemoguard.family.schedule.NoiseSchedule.step`),
guidance ``out_∅ + w (out_c − out_∅)`` (:meth:`mnemoguard.denoiser.Denoiser.guided`; ``w = 1`` is the plain
conditional model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .denoiser import Denoiser
from .family.conditioning import Conditioning, as_conditioning

__all__ = ["denoise_from", "generate", "sampling_steps"]


def sampling_steps(denoiser: Denoiser, num_inference_steps: int,
                   timestep_spacing: str | None = None) -> list[tuple[float | int, float | int | None]]:
    """``[(t, t_prev), ...]``: the sampler's timesteps from the noisiest down, each with where its step goes (None:
    the end of sampling). ``timestep_spacing`` overrides a DDPM scheduler's (``leading`` / ``trailing`` /
    ``linspace``)."""
    schedule = denoiser.schedule
    ts = schedule.sampling_timesteps(num_inference_steps, timestep_spacing)
    return [(t, schedule.previous_timestep(ts, k)) for k, t in enumerate(ts)]


def _predict(denoiser: Denoiser, x: Tensor, t: float | int, cond: Conditioning, uncond: Conditioning | None,
             guidance_scale: float) -> tuple[Tensor, Tensor]:
    """``(x̂_0, ε̂)`` of the guided prediction at ``t`` for the float32 samples ``x``."""
    from .parameterisation import eps_from_prediction, x0_from_prediction

    pred = denoiser.guided(x, t, cond, uncond, guidance_scale)
    alpha, sigma = denoiser.schedule.sampler_coefs(t, x)
    return (x0_from_prediction(pred, x, alpha, sigma, denoiser.prediction_type),
            eps_from_prediction(pred, x, alpha, sigma, denoiser.prediction_type))


def _step(denoiser: Denoiser, x: Tensor, t: float | int, t_prev: float | int | None, cond: Conditioning,
          uncond: Conditioning | None, guidance_scale: float) -> Tensor:
    """One guided deterministic step of the float32 samples ``x``."""
    x0, eps = _predict(denoiser, x, t, cond, uncond, guidance_scale)
    return denoiser.schedule.step(x0, eps, t_prev)


def _conds(denoiser: Denoiser, cond: Conditioning | Tensor, uncond: Conditioning | Tensor | None,
           guidance_scale: float, device: torch.device) -> tuple[Conditioning, Conditioning | None]:
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs the unconditional conditioning `uncond`")
    dtype = denoiser.adapter.dtype
    c = as_conditioning(cond, what="cond").to(device=device, dtype=dtype)
    u = None if uncond is None else as_conditioning(uncond, what="uncond").to(device=device, dtype=dtype)
    return c, u


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    cond: Conditioning | Tensor,
    uncond: Conditioning | Tensor | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 25,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Sample one image per row of ``cond`` (a caption's conditioning, or token embeddings ``(B, L, D)``); returns
    images in [0, 1] on the CPU.

    Args:
        uncond: the empty caption's conditioning (batch 1 or B); needed when ``guidance_scale != 1``.
        generator: a CPU generator for the initial noise (reproducible on any device).
        latents: the initial noise ``(B, C, H, W)``; drawn from ``generator`` when ``None``.
        decode: maps the network's sample space to images in [-1, 1] (a VAE decode); identity when ``None``.
    """
    device = denoiser.adapter.device
    c, u = _conds(denoiser, cond, uncond, guidance_scale, device)
    shape = (len(c), *denoiser.adapter.sample_shape)
    if latents is None:
        latents = torch.randn(shape, generator=generator, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents: expected shape {shape}, found {tuple(latents.shape)}")
    steps = sampling_steps(denoiser, num_inference_steps)
    # Both families start from unit-variance noise: DDPM's ᾱ at the first step is ~0, flow's σ = 1.
    x = latents.float().to(device)
    for t, t_prev in steps:
        x = _step(denoiser, x, t, t_prev, c, u, guidance_scale)
    images = decode(x) if decode is not None else x
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


@torch.no_grad()
def denoise_from(
    denoiser: Denoiser,
    x0: Tensor,
    noise: Tensor,
    start_indices: list[int],
    cond: Conditioning | Tensor,
    uncond: Conditioning | Tensor | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 10,
    decode: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 64,
    timestep_spacing: str | None = None,
    num_steps: int | None = None,
) -> Tensor:
    """Noise clean samples to sampler step ``s`` and denoise them back, for every ``s`` of ``start_indices``: the
    per-noise-level probe of Dodson et al.'s picture (does a training image come back as itself from σ?).

    Row ``b`` of ``x0`` (``[B, C, H, W]``, the network's sample space) is noised with its own ``noise[b]`` to
    ``x_s = α_s x0 + σ_s ε`` (``t_s`` the ``s``-th timestep of a ``num_inference_steps`` sampler) and run through the
    remaining steps with caption ``cond[b]`` (``num_steps``: at most that many, ending on the last one's clean-sample
    estimate ``x̂_0``; 1 is the one-step return, one network call per row and start). All starts run as one batch per
    step (a trajectory joins when the schedule reaches its start), ``batch_size`` rows per network call.

    Returns:
        images in [0, 1], ``[len(start_indices), B, C', H', W']`` (after ``decode``, on the CPU).
    """
    steps = sampling_steps(denoiser, num_inference_steps, timestep_spacing)
    device = denoiser.adapter.device
    c, u = _conds(denoiser, cond, uncond, guidance_scale, device)
    schedule = denoiser.schedule
    S, B = len(start_indices), x0.shape[0]
    starts = torch.tensor(start_indices, dtype=torch.long).repeat_interleave(B)  # [S*B], start of each trajectory
    x = torch.zeros((S * B, *x0.shape[1:]), dtype=torch.float32, device=device)
    x0_all, noise_all = x0.float().to(device).repeat(S, 1, 1, 1), noise.float().to(device).repeat(S, 1, 1, 1)
    cond_all = c.repeat(S)
    if num_steps is not None and num_steps < 1:
        raise ValueError(f"num_steps: expected None or >= 1, found {num_steps}")
    ends = starts + (num_steps if num_steps is not None else len(steps))  # the step a trajectory stops before
    for k, (t, t_prev) in enumerate(steps):
        joining = torch.nonzero(starts == k).reshape(-1).to(device)
        if joining.numel():
            t_b = torch.full((joining.numel(),), t, dtype=schedule.timestep_dtype, device=device)
            x[joining] = schedule.add_noise(x0_all[joining], noise_all[joining], t_b).float()
        active = torch.nonzero((starts <= k) & (k < ends)).reshape(-1).to(device)
        for chunk in active.split(batch_size) if active.numel() else ():
            x0_hat, eps_hat = _predict(denoiser, x[chunk], t, cond_all[chunk], u, guidance_scale)
            stepped = schedule.step(x0_hat, eps_hat, t_prev)
            if num_steps is not None:  # a trajectory on its last step ends on its clean-sample estimate
                last = (ends[chunk.cpu()] == k + 1).to(device).reshape(-1, *([1] * (x.ndim - 1)))
                stepped = torch.where(last, x0_hat, stepped)
            x[chunk] = stepped
    images = torch.cat([decode(part) if decode is not None else part for part in x.split(batch_size)])
    return ((images.float() + 1) / 2).clamp(0, 1).cpu().reshape(S, B, *images.shape[1:])
