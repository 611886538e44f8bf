"""A real GuardContext for unit tests of single components (a CPU accelerator, the given model parts)."""

from __future__ import annotations

from typing import Any

from mnemoguard.callbacks.bands import default_bands
from mnemoguard.callbacks.timesteps import TimestepSlot, UniformTimestepSampler
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
    T = int(scheduler.config.num_train_timesteps)
    names = ["low", "mid", "high"]
    defaults = dict(accelerator=Accelerator(cpu=True), unet=unet, noise_scheduler=scheduler,
                    denoiser=Denoiser(unet, scheduler), timesteps=TimestepSlot(UniformTimestepSampler(T)),
                    bands=dict(zip(names, default_bands(T))))
    return GuardContext(**{**defaults, **fields})
