"""Timestep samplers: the extension point a component replaces to change which noise levels are trained.

Every sampler has one signature, ``sampler(batch_size, device, generator=None) -> (timesteps, loss_weights)``: the
timesteps the loop passes to the network (integers for DDPM, ``σ·T`` floats for flow matching) and per-sample loss
weights (ones when the distribution needs no correction). :meth:`mnemoguard.Guard.sample_timesteps` draws from the
run's :class:`TimestepSlot` and hands the weights to the loss, so a sampler that under-samples a band can re-weight to
keep the expected gradient scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..family.density import TimestepDensity

__all__ = ["DensitySampler", "TimestepSampler", "TimestepSlot"]


class TimestepSampler(Protocol):
    num_train_timesteps: int

    def __call__(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]: ...


class DensitySampler:
    """The loop's own draw (:class:`~mnemoguard.family.density.TimestepDensity`), unit loss weights: for DDPM
    ``torch.randint(0, T, (batch_size,))`` on the CPU, for flow matching diffusers' ``weighting_scheme`` draw and
    ``scheduler.timesteps[i]`` — exactly what the diffusers training scripts do, so drawing through the guard changes
    nothing."""

    def __init__(self, schedule: Any, density: TimestepDensity | None = None) -> None:
        self.schedule = schedule
        self.density = density or TimestepDensity()
        self.density.check(schedule)
        self.num_train_timesteps = int(schedule.num_train_timesteps)

    def __call__(self, batch_size: int, device: torch.device | str,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        levels = self.density.draw_levels(self.schedule, batch_size, generator)
        return self.schedule.timesteps_at(levels).to(device), torch.ones(batch_size, device=device)


@dataclass
class TimestepSlot:
    """The sampler the run draws from: the loop's own draw until a component (the noise-gap scheduler) installs
    itself."""

    sampler: TimestepSampler
    owner: str = "uniform"  # who installed it (for messages)

    def install(self, sampler: TimestepSampler, owner: str) -> None:
        if self.owner not in ("uniform", owner):
            raise ValueError(f"{owner} cannot install a timestep sampler: {self.owner} already did (one per run)")
        self.sampler, self.owner = sampler, owner
