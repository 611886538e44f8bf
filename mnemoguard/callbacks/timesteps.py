"""Timestep samplers: the extension point a callback replaces to change which noise levels are trained.

Every sampler has one signature, ``sampler(batch_size, device, generator=None) -> (timesteps, loss_weights)``:
integer timesteps in ``[0, num_train_timesteps)`` and per-sample loss weights (ones when the distribution needs no
correction). The trainer multiplies the per-sample loss by the weights, so a sampler that under-samples a band can
re-weight to keep the expected gradient scale comparable.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class TimestepSampler(Protocol):
    num_train_timesteps: int

    def __call__(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class UniformTimestepSampler:
    """Uniform over ``[0, num_train_timesteps)``, unit loss weights: what the diffusers training scripts do."""

    def __init__(self, num_train_timesteps: int) -> None:
        if num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)

    def __call__(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device="cpu")
        return t.to(device), torch.ones(batch_size, device=device)

    def state_dict(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.num_train_timesteps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_train_timesteps = int(state["num_train_timesteps"])
