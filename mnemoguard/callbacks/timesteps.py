"""Timestep samplers: the extension point a component replaces to change which noise levels are trained.

Every sampler has one signature, ``sampler(batch_size, device, generator=None) -> (timesteps, loss_weights)``:
integer timesteps in ``[0, num_train_timesteps)`` and per-sample loss weights (ones when the distribution needs no
correction). :meth:`mnemoguard.Guard.sample_timesteps` draws from the run's :class:`TimestepSlot` and hands the
weights to the loss, so a sampler that under-samples a band can re-weight to keep the expected gradient scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["TimestepSampler", "TimestepSlot", "UniformTimestepSampler"]


class TimestepSampler(Protocol):
    num_train_timesteps: int

    def __call__(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]: ...


class UniformTimestepSampler:
    """Uniform over ``[0, num_train_timesteps)``, unit loss weights, drawn on the CPU exactly as
    ``torch.randint(0, T, (batch_size,))`` (what the diffusers training scripts do)."""

    def __init__(self, num_train_timesteps: int) -> None:
        if int(num_train_timesteps) <= 0:
            raise ValueError(f"num_train_timesteps must be positive, found {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)

    def __call__(self, batch_size: int, device: torch.device | str,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device="cpu")
        return t.to(device), torch.ones(batch_size, device=device)


@dataclass
class TimestepSlot:
    """The sampler the run draws from: uniform until a component (the noise-gap scheduler) installs itself."""

    sampler: TimestepSampler
    owner: str = "uniform"  # who installed it (for messages)

    def install(self, sampler: TimestepSampler, owner: str) -> None:
        if self.owner not in ("uniform", owner):
            raise ValueError(f"{owner} cannot install a timestep sampler: {self.owner} already did (one per run)")
        self.sampler, self.owner = sampler, owner
