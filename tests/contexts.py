"""A real GuardContext for unit tests of single components (a CPU accelerator, the given model parts)."""

from __future__ import annotations

from typing import Any

from mnemoguard.callbacks.bands import NoiseBand, default_bands
from mnemoguard.callbacks.timesteps import DensitySampler, TimestepSlot
from mnemoguard.denoiser import Denoiser
from mnemoguard.guard.context import GuardContext


def make_context(unet: Any = None, scheduler: Any = None, **fields: Any) -> GuardContext:
    """``GuardContext`` on a CPU ``Accelerator`` with the low / mid / high bands; ``fields`` override the rest
    (``prompts=``, ``tokenizer=``, ``dataset=``, ``ema=`` ...). Defaults: the tiny test UNet and a DDPM schedule."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from .conftest import make_tiny_unet

    unet = unet if unet is not None else make_tiny_unet()
    scheduler = scheduler if scheduler is not None else DDPMScheduler(num_train_timesteps=1000)
    den = Denoiser(unet, scheduler)
    T = den.num_train_timesteps
    names = ["low", "mid", "high"]
    bands = {name: NoiseBand.of(den.schedule, lo, hi) for name, (lo, hi) in zip(names, default_bands(T))}
    defaults = dict(accelerator=Accelerator(cpu=True), model=unet, denoiser=den,
                    timesteps=TimestepSlot(DensitySampler(den.schedule)), bands=bands)
    return GuardContext(**{**defaults, **fields})
