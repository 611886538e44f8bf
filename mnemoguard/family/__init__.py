"""The model-family seam: what differs between SD 1.x/2.x, SDXL, SD3/3.5 and Flux, and nothing else knows.

* :mod:`.schedule` — the noise schedule (DDPM ``alphas_cumprod`` or flow matching's ``σ``): noising, levels, the
  VE-equivalent σ, SNR, one deterministic sampler step;
* :mod:`.adapters` — the model adapter: the only place the network is called;
* :mod:`.conditioning` — a caption's conditioning as one object (token + pooled embeddings, extras);
* :mod:`.latents` — the VAE's latent space (scaling and shift factors);
* :mod:`.density` — how the loop draws timesteps (diffusers' ``weighting_scheme``).
"""

from .adapters import (
    FluxAdapter,
    ModelAdapter,
    SD3Adapter,
    SDXLUNetAdapter,
    UNetAdapter,
    model_adapter,
    pack_latents,
    unpack_latents,
    unwrap_model,
)
from .conditioning import Conditioning, as_conditioning
from .density import WEIGHTING_SCHEMES, TimestepDensity
from .latents import LatentCodec
from .schedule import DDPMSchedule, FlowMatchSchedule, NoiseSchedule, noise_schedule

__all__ = ["WEIGHTING_SCHEMES", "Conditioning", "DDPMSchedule", "FlowMatchSchedule", "FluxAdapter", "LatentCodec",
           "ModelAdapter", "NoiseSchedule", "SD3Adapter", "SDXLUNetAdapter", "TimestepDensity", "UNetAdapter",
           "as_conditioning", "model_adapter", "noise_schedule", "pack_latents", "unpack_latents", "unwrap_model"]
