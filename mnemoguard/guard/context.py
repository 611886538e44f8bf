"""What the guard's components get from the training run: one typed object, built once by :class:`mnemoguard.Guard`.

Components read what they need from it (and declare it in ``needs``, checked when the Guard is built); nothing is
discovered by scanning a trainer's attributes. The same context is built for the reference trainer and for a user's
own loop: the components cannot tell which loop drives them, nor which model family runs (the family is the
denoiser's model adapter and noise schedule, and the latent codec: :mod:`mnemoguard.family`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..callbacks.timesteps import TimestepSlot
from ..denoiser import Denoiser, _unwrap
from ..family.density import TimestepDensity
from ..family.latents import LatentCodec

__all__ = ["GuardContext"]


@dataclass
class GuardContext:
    """The run, as the guard's components see it.

    Attributes:
        accelerator: the loop's ``accelerate.Accelerator``.
        model: the trained network as the loop holds it (prepared / wrapped or not): a UNet or a transformer.
        denoiser: the unwrapped network with its adapter and noise schedule (:class:`~mnemoguard.denoiser.Denoiser`).
        timesteps: the timestep-sampler slot.
        bands: the noise bands every per-band tag uses, name -> :class:`~mnemoguard.callbacks.bands.NoiseBand`.
        codec: the latent space (:class:`~mnemoguard.family.latents.LatentCodec`; pixel space without a VAE).
        density: how the loop draws its timesteps (:class:`~mnemoguard.family.density.TimestepDensity`).
        prompts: the guard's own caption encoder (:class:`~mnemoguard.prompts.PromptEncoder`), or None.
        tokenizer: the tokenizer, or None.
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
    model: nn.Module
    denoiser: Denoiser
    timesteps: TimestepSlot
    bands: dict[str, Any]
    codec: LatentCodec = field(default_factory=LatentCodec)
    density: TimestepDensity = field(default_factory=TimestepDensity)
    prompts: Any = None
    tokenizer: Any = None
    dataset: Any = None
    ema: Any = None
    output_dir: Path | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    final_dir: Path | None = None
    exported: dict[str, Any] | None = None
    error: str | None = None

    @property
    def unet(self) -> nn.Module:
        """:attr:`model` (its name when only UNets were supported)."""
        return self.model

    @property
    def unwrapped_model(self) -> nn.Module:
        """The network without DDP / DeepSpeed / compile wrappers."""
        return _unwrap(self.model)

    unwrapped_unet = unwrapped_model

    @property
    def schedule(self) -> Any:
        """The noise schedule (:class:`~mnemoguard.family.schedule.NoiseSchedule`)."""
        return self.denoiser.schedule

    @property
    def vae(self) -> nn.Module | None:
        return self.codec.vae

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.num_train_timesteps)

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
        """Whether the network carries peft adapters (the LoRA base is then a baseline)."""
        return bool(getattr(self.unwrapped_model, "peft_config", None))

    @property
    def latent(self) -> bool:
        return self.codec.latent

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Images in [-1, 1] -> the network's sample space, deterministically (the VAE posterior *mean*)."""
        return self.codec.encode(pixels)

    def decode(self, sample: Tensor) -> Tensor:
        """The network's sample space -> images in [-1, 1]."""
        return self.codec.decode(sample)
