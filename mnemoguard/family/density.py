"""How a training loop draws its timesteps: a density over the schedule's levels, in diffusers' vocabulary.

=====================  =============================================================================================
``weighting_scheme``   draw (exactly as diffusers' scripts do, so the guard can draw for them and change nothing)
=====================  =============================================================================================
``none`` (DDPM)        ``t = torch.randint(0, T, (B,))`` (SD 1.x/2.x and SDXL scripts): uniform over levels
``none``, ``sigma_sqrt``, ``cosmap`` (flow)   ``u = torch.rand(B)``: uniform (the last two only re-weight the loss)
``logit_normal``       ``u = sigmoid(N(logit_mean, logit_std))`` (SD3, Esser et al. 2024 §3.1)
``mode``               ``u = 1 − r − mode_scale·(cos²(πr/2) − 1 + r)``, ``r ~ U[0, 1)``
=====================  =============================================================================================

For flow matching the scripts then take ``i = ⌊u·T⌋`` and ``t = scheduler.timesteps[i]`` (descending), i.e. level
``T − 1 − i`` (``diffusers.training_utils.compute_density_for_timestep_sampling`` draws ``u``).
:meth:`TimestepDensity.probabilities` is the exact probability of every level under that draw (the noise gap
multiplies it by its band weights); the logit-normal one in closed form, ``P(i) = Φ((logit((i+1)/T) − μ)/s) −
Φ((logit(i/T) − μ)/s)``, the mode one by quadrature of ``r`` on a fine grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config.recipe import WEIGHTING_SCHEMES
from .schedule import NoiseSchedule

__all__ = ["WEIGHTING_SCHEMES", "TimestepDensity"]

_UNIFORM = ("none", "uniform", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class TimestepDensity:
    """The loop's timestep density (module docstring), with diffusers' argument names and SD3-script defaults."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, found {self.weighting_scheme!r}")
        if self.weighting_scheme == "logit_normal" and not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, found {self.logit_std}")

    @property
    def uniform(self) -> bool:
        return self.weighting_scheme in _UNIFORM

    def check(self, schedule: NoiseSchedule) -> None:
        if schedule.kind == "ddpm" and not self.uniform:
            raise ValueError(f"weighting_scheme={self.weighting_scheme!r} is a flow-matching density; a DDPM loop "
                             "draws its timesteps uniformly (torch.randint)")

    def draw_levels(self, schedule: NoiseSchedule, batch_size: int,
                    generator: torch.Generator | None = None) -> Tensor:
        """``[batch_size]`` levels on the CPU, drawn with the random numbers the loop's own code would use."""
        self.check(schedule)
        T = schedule.num_train_timesteps
        if schedule.kind == "ddpm":
            return torch.randint(0, T, (batch_size,), generator=generator, device="cpu")
        from diffusers.training_utils import compute_density_for_timestep_sampling

        extra = {} if generator is None else {"generator": generator}
        u = compute_density_for_timestep_sampling(self.weighting_scheme, batch_size, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale, **extra)
        index = (u * T).long().clamp(0, T - 1)  # index into the descending training timesteps
        return T - 1 - index

    def probabilities(self, schedule: NoiseSchedule) -> Tensor:
        """``[T]`` probability of each level under :meth:`draw_levels` (float64)."""
        self.check(schedule)
        T = schedule.num_train_timesteps
        if self.uniform:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        if self.weighting_scheme == "logit_normal":
            edges = torch.arange(T + 1, dtype=torch.float64) / T
            logit = torch.log(edges) - torch.log1p(-edges)  # -inf .. inf
            z = (logit - self.logit_mean) / self.logit_std
            cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
            per_index = (cdf[1:] - cdf[:-1]).clamp_min(0)
        else:  # mode: u(r) on the midpoints of a fine grid of r
            n = 1 << 20
            r = (torch.arange(n, dtype=torch.float64) + 0.5) / n
            u = 1 - r - self.mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
            index = (u * T).floor().long().clamp(0, T - 1)
            per_index = torch.bincount(index, minlength=T).double()
        per_index = per_index / per_index.sum()
        return per_index.flip(0)  # level k = T - 1 - index
