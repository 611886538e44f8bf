"""What the guard's components get from the training run: one typed object, built once by :class:`mnemoguard.Guard`.

Components read what they need from it (and declare it in ``needs``, checked when the Guard is built); nothing is
discovered by scanning a trainer's attributes. The same context is built for the reference trainer and for a user's
own loop: the components cannot tell which loop drives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..callbacks.timesteps import TimestepSlot
from ..denoiser import Denoiser, _unwrap

__all__ = ["GuardContext"]

@dataclass
class GuardContext:
    """The run, as the guard's components see it.

    Attributes:
        accelerator: the loop's ``accelerate.Accelerator``.
        unet: the trained UNet as the loop holds it (prepared / wrapped or not).
        noise_scheduler: the training noise scheduler.
        denoiser: the unwrapped UNet with that schedule (:class:`~mnemoguard.denoiser.Denoiser`).
        timesteps: the timestep-sampler slot.
        bands: the noise bands every per-band tag uses, name -> ``[t_lo, t_hi)``.
        prompts: the guard's own caption encoder (:class:`~mnemoguard.prompts.PromptEncoder`), or None.
        tokenizer: the tokenizer, or None.
        vae: the VAE of a latent model (None in pixel space).
        dataset: the training data as the guard reads it (:class:`~mnemoguard.guard.data.ProbeDataset`), or None.
        ema: the EMA baseline: an object with ``names``, ``weights(source)``, ``snapshots`` (our
            :class:`~mnemoguard.ema.EMAModel`, or a diffusers ``EMAModel`` seen through
            :func:`~mnemoguard.ema.as_ema_weights`), or None.
        output_dir: where the report goes.
        hparams: the run's settings, for the dashboard's hparams summary.
        final_dir: the exported weights (set by ``Guard.end(final_dir=...)``).
        exported: what the exported weights are (``{"source": "last" | "best" | "ema", "step": int}``), if known.
        error: why the run failed, when ``Guard.end(error=...)`` reports a failed run.
    """

    accelerator: Any
    unet: nn.Module
    noise_scheduler: Any
    denoiser: Denoiser
    timesteps: TimestepSlot
    bands: dict[str, tuple[int, int]]
    prompts: Any = None
    tokenizer: Any = None
    vae: nn.Module | None = None
    dataset: Any = None
    ema: Any = None
    output_dir: Path | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    final_dir: Path | None = None
    exported: dict[str, Any] | None = None
    error: str | None = None

    @property
    def unwrapped_unet(self) -> nn.Module:
        """The UNet without DDP / DeepSpeed / compile wrappers."""
        return _unwrap(self.unet)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def num_processes(self) -> int:
        return int(getattr(self.accelerator, "num_processes", 1))

    @property
    def process_index(self) -> int:
        return int(getattr(self.accelerator, "process_index", 0))

    @property
    def is_main_process(self) -> bool:
        return bool(getattr(self.accelerator, "is_main_process", True))

    @property
    def is_lora(self) -> bool:
        """Whether the UNet carries peft adapters (the LoRA base is then a baseline)."""
        return bool(getattr(self.unwrapped_unet, "peft_config", None))

    @property
    def latent(self) -> bool:
        return self.vae is not None

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Images in [-1, 1] -> the UNet's input space, deterministically (the VAE posterior *mean*, no sampling)."""
        if self.vae is None:
            return pixels.float()
        vae = self.vae
        dist = vae.encode(pixels.to(device=next(vae.parameters()).device, dtype=vae.dtype)).latent_dist
        return (dist.mode() * vae.config.scaling_factor).float()

    def decode(self, sample: Tensor) -> Tensor:
        """The UNet's sample space -> images in [-1, 1]."""
        if self.vae is None:
            return sample
        return self.vae.decode(sample.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
