"""Text-to-image sampling with classifier-free guidance, for pixel-space and latent UNets alike.

One loop for validation images, probe generations and the testbed's ground truth, so that they all see the same
sampler: DDIM (eta = 0) from the training scheduler's config, guidance
``eps = eps_uncond + w * (eps_cond - eps_uncond)`` (``w = 1`` is the plain conditional model).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(
    unet: nn.Module,
    noise_scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 25,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    decode=None,
) -> torch.Tensor:
    """Sample one image per row of ``cond`` (``(B, L, D)`` text embeddings); returns images in [0, 1].

    Args:
        uncond: the empty-caption embedding, ``(1, L, D)`` or ``(B, L, D)``; needed when ``guidance_scale != 1``.
        generator: a CPU generator for the initial noise (reproducible on any device).
        latents: the initial noise ``(B, C, H, W)``; drawn from ``generator`` when ``None``.
        decode: maps the UNet's sample space to images in [-1, 1] (a VAE decode); identity when ``None``.
    """
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs the unconditional embedding `uncond`")
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    cfg = unet.config
    batch = cond.shape[0]
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if latents is None:
        latents = torch.randn(shape, generator=generator, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents: expected shape {shape}, found {tuple(latents.shape)}")
    scheduler = ddim_scheduler(noise_scheduler, num_inference_steps)
    x = latents.to(device) * scheduler.init_noise_sigma
    cond = cond.to(device=device, dtype=dtype)
    uncond = uncond.to(device=device, dtype=dtype) if uncond is not None else None
    for t in scheduler.timesteps:
        x = scheduler.step(_eps(unet, x, t, cond, uncond, guidance_scale, dtype), t, x).prev_sample
    images = decode(x) if decode is not None else x
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def _eps(unet: nn.Module, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None,
         guidance_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The guided noise prediction ``eps_u + w (eps_c − eps_u)`` (one UNet call on the doubled batch), float32;
    ``w = 1``: the conditional call alone."""
    if guidance_scale == 1.0:
        return unet(x.to(dtype), t, encoder_hidden_states=cond).sample.float()
    u = uncond.expand(x.shape[0], -1, -1)
    out = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=torch.cat([u, cond])).sample.float()
    out_u, out_c = out.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


def ddim_scheduler(noise_scheduler, num_inference_steps: int, timestep_spacing: str | None = None):
    """The DDIM scheduler every sampler here uses (eta 0, no clipping), with its timesteps set; ``timestep_spacing``
    overrides the training scheduler's (diffusers' ``leading`` / ``trailing`` / ``linspace``)."""
    from diffusers import DDIMScheduler

    spacing = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
    scheduler = DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                          **spacing)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


@torch.no_grad()
def denoise_from(
    unet: nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    start_indices: list[int],
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 10,
    decode=None,
    batch_size: int = 64,
    timestep_spacing: str | None = None,
) -> torch.Tensor:
    """Noise clean samples to DDIM step ``s`` and denoise them back, for every ``s`` of ``start_indices``: the
    per-noise-level probe of Dodson et al.'s picture (does a training image come back as itself from σ?).

    Row ``b`` of ``x0`` (``[B, C, H, W]``, the UNet's sample space) is noised with its own ``noise[b]`` to
    ``x_s = add_noise(x0, noise, t_s)`` (``t_s = timesteps[s]`` of a ``num_inference_steps`` DDIM schedule) and run
    through the remaining DDIM steps with caption ``cond[b]``. All starts run as one batch per DDIM step (a
    trajectory joins when the schedule reaches its start), ``batch_size`` rows per UNet call.

    Returns:
        images in [0, 1], ``[len(start_indices), B, C', H', W']`` (after ``decode``, on the CPU).
    """
    scheduler = ddim_scheduler(noise_scheduler, num_inference_steps, timestep_spacing)
    timesteps = scheduler.timesteps
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    S, B = len(start_indices), x0.shape[0]
    starts = torch.tensor(start_indices, dtype=torch.long).repeat_interleave(B)  # [S*B], start of each trajectory
    x = torch.zeros((S * B, *x0.shape[1:]), dtype=torch.float32, device=device)
    x0_all, noise_all = x0.float().to(device).repeat(S, 1, 1, 1), noise.float().to(device).repeat(S, 1, 1, 1)
    cond_all = cond.to(device=device, dtype=dtype).repeat(S, 1, 1)
    if guidance_scale != 1.0:
        if uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs the unconditional embedding `uncond`")
        uncond = uncond.to(device=device, dtype=dtype)
    for k, t in enumerate(timesteps):
        joining = torch.nonzero(starts == k).reshape(-1).to(device)
        if joining.numel():
            t_b = torch.full((joining.numel(),), int(t), dtype=torch.long, device=device)
            x[joining] = noise_scheduler.add_noise(x0_all[joining], noise_all[joining], t_b).float()
        active = torch.nonzero(starts <= k).reshape(-1).to(device)
        for chunk in active.split(batch_size):
            xc = x[chunk]
            x[chunk] = scheduler.step(_eps(unet, xc, t, cond_all[chunk], uncond, guidance_scale, dtype), t,
                                      xc).prev_sample
    images = torch.cat([decode(c) if decode is not None else c for c in x.split(batch_size)])
    return ((images.float() + 1) / 2).clamp(0, 1).cpu().reshape(S, B, *images.shape[1:])
