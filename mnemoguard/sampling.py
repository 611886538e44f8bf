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
    from diffusers import DDIMScheduler

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
    scheduler = DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(num_inference_steps)
    x = latents.to(device) * scheduler.init_noise_sigma
    cond = cond.to(device=device, dtype=dtype)
    guided = guidance_scale != 1.0
    if guided:
        uncond = uncond.to(device=device, dtype=dtype).expand(batch, -1, -1)
        text = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        out = unet(model_in.to(dtype), t, encoder_hidden_states=text if guided else cond).sample.float()
        if guided:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        x = scheduler.step(out, t, x).prev_sample
    images = decode(x) if decode is not None else x
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()
