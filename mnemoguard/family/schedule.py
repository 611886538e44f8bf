"""The noise schedule of a model family: the one place that knows how a timestep becomes a noise level.

Every family noises the same way, ``x_t = α_t x_0 + σ_t ε``; they differ in what α and σ are and in the number the
network receives (the *timestep* ``t``, exactly as the training loop holds it):

==================  ==========================================  ================================================
family              α_t, σ_t                                    timestep ``t``
==================  ==========================================  ================================================
DDPM (SD 1.x/2.x,   ``α = sqrt(ᾱ_t)``, ``σ = sqrt(1 − ᾱ_t)``,    the integer ``t ∈ [0, T)`` of
SDXL)               ``ᾱ_t`` = ``scheduler.alphas_cumprod[t]``    ``torch.randint(0, T, ...)``
flow matching       ``σ = t / T``, ``α = 1 − σ`` (the linear       the float ``scheduler.timesteps[i]`` (= σ·T,
(SD3, Flux, ...)    interpolant of rectified flow)              with the scheduler's shift) the scripts draw
==================  ==========================================  ================================================

Around that, one vocabulary for both:

* **levels**: the ``T`` training timesteps sorted by increasing noise, indexed ``0 .. T − 1``. For DDPM the level *is*
  the timestep; for flow matching level ``k`` is ``scheduler.timesteps[T − 1 − k]``. Bands, loss-flag buckets and
  timestep densities are over levels, so they mean "the k-th least noisy training timestep" in every family;
* the **VE-equivalent σ**, ``σ_t / α_t``: ``x_t / α_t = x_0 + (σ_t/α_t) ε``, so a noise level of one family and of
  another are the same when their σ/α agree (the danger zone's axis; Dodson et al. 2026 work in VE form);
* ``SNR = α² / σ²``;
* one deterministic sampler step for both: ``x_prev = α_prev x̂_0 + σ_prev ε̂`` — DDIM with η = 0 (Song et al. 2021)
  for DDPM, and for the linear interpolant exactly the Euler step ``x + (σ_prev − σ) v`` of rectified flow.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["DDPMSchedule", "FlowMatchSchedule", "NoiseSchedule", "noise_schedule"]


def _per_sample(coef: Tensor, x: Tensor) -> Tensor:
    """A ``[B]`` coefficient reshaped to broadcast against ``x`` ``[B, ...]``."""
    return coef.reshape(-1, *([1] * (x.ndim - 1)))


class NoiseSchedule:
    """Interface of a family's noise schedule (module docstring). Subclasses: :class:`DDPMSchedule`,
    :class:`FlowMatchSchedule`."""

    kind: str = ""
    prediction_type: str = "epsilon"  # what its networks are trained to output
    num_train_timesteps: int = 0
    timestep_dtype: torch.dtype = torch.long  # of the timesteps the training loop passes to the network

    # ------------------------------------------------------------------ noise levels
    def alpha_sigma(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32,
                    device: Any = None) -> tuple[Tensor, Tensor]:
        """``(α_t, σ_t)``, each of ``t``'s shape."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = α_t x_0 + σ_t ε`` per sample (``t``: ``[B]`` timesteps), in ``x0``'s dtype."""
        raise NotImplementedError

    def ve_sigma(self, t: Tensor | float) -> Tensor:
        """The VE-equivalent noise level ``σ_t / α_t`` (float64; ``inf`` where α = 0)."""
        alpha, sigma = self.alpha_sigma(t, dtype=torch.float64)
        return torch.where(alpha > 0, sigma / alpha.clamp_min(1e-300), torch.full_like(sigma, math.inf))

    def snr(self, t: Tensor | float) -> Tensor:
        """``SNR_t = α_t² / σ_t²`` (float32)."""
        alpha, sigma = self.alpha_sigma(t, dtype=torch.float64)
        return (alpha**2 / sigma**2).float()

    # ------------------------------------------------------------------ levels <-> timesteps
    def timesteps_at(self, levels: Tensor) -> Tensor:
        """The training timesteps of the given levels (the values a training loop passes to the network)."""
        raise NotImplementedError

    def levels_of(self, t: Tensor) -> Tensor:
        """The level (``0 .. T − 1``, increasing noise) nearest each timestep, int64, on ``t``'s device."""
        raise NotImplementedError

    def level_sigmas(self) -> Tensor:
        """``[T]`` VE-equivalent σ of every level, ascending (float64)."""
        return self.ve_sigma(self.timesteps_at(torch.arange(self.num_train_timesteps)))

    def level_of_ve_sigma(self, sigma: float | Tensor) -> Tensor:
        """The level whose VE-equivalent σ is nearest ``sigma`` in log scale, int64."""
        table = self.level_sigmas().clamp(1e-12, 1e12).log()
        s = torch.as_tensor(sigma, dtype=torch.float64).clamp(1e-12, 1e12).log()
        return (s.reshape(-1, 1) - table[None]).abs().argmin(1).reshape(s.shape)

    # ------------------------------------------------------------------ the deterministic sampler
    def sampling_timesteps(self, num_steps: int, spacing: str | None = None) -> list[float | int]:
        """The ``num_steps`` timesteps of the deterministic sampler, from the noisiest down."""
        raise NotImplementedError

    def sampler_coefs(self, t: float | int | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(α, σ)`` of a sampler timestep (``None``: where sampling ends), scalars in ``like``'s dtype/device."""
        raise NotImplementedError

    def previous_timestep(self, timesteps: list[float | int], k: int) -> float | int | None:
        """The timestep step ``k`` of ``timesteps`` goes to (None: the end of sampling)."""
        return timesteps[k + 1] if k + 1 < len(timesteps) else None

    def step(self, x0: Tensor, eps: Tensor, t_prev: float | int | None) -> Tensor:
        """One deterministic step: ``x_prev = α_prev x̂_0 + σ_prev ε̂`` (DDIM, η = 0; the Euler step of the linear
        interpolant), from the clean-sample and noise predictions at the current timestep."""
        alpha, sigma = self.sampler_coefs(t_prev, x0)
        return alpha * x0 + sigma * eps

    def check_prediction_type(self, prediction_type: str) -> None:
        """A ``ValueError`` when a network trained this way cannot run on this schedule."""


# ---------------------------------------------------------------------------------------------------- DDPM
class DDPMSchedule(NoiseSchedule):
    """The DDPM family (SD 1.x/2.x, SDXL): ``ᾱ_t`` from a table, integer timesteps.

    Args:
        alphas_cumprod: the ``ᾱ`` table (``scheduler.alphas_cumprod``), ``[T]``.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        config: the scheduler's config (timestep spacing of the sampler: ``timestep_spacing``, ``steps_offset``).

    Float timesteps between two table entries use linear interpolation of ``ᾱ`` (differentiable in t).
    """

    kind = "ddpm"

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon", config: Any = None) -> None:
        ac = torch.as_tensor(alphas_cumprod).detach().cpu()
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table, found shape {tuple(ac.shape)}")
        if (ac <= 0).any() or (ac > 1).any():
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        self.table = ac.to(torch.float64)  # conversions (float64, as the signals need)
        self.table32 = ac.to(torch.float32)  # noising and sampling, in the dtype diffusers' schedulers use
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(ac.numel())
        self.config = config
        self.check_prediction_type(prediction_type)

    @classmethod
    def from_scheduler(cls, scheduler: Any, prediction_type: str | None = None) -> DDPMSchedule:
        config = scheduler.config
        return cls(scheduler.alphas_cumprod, prediction_type or getattr(config, "prediction_type", None) or "epsilon",
                   config)

    def check_prediction_type(self, prediction_type: str) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"a DDPM schedule runs networks that predict epsilon, v_prediction or sample; found "
                             f"{prediction_type!r}")

    def alpha_bar(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """``ᾱ_t``, same shape as ``t`` (linear interpolation for fractional float t)."""
        t = torch.as_tensor(t)
        device = t.device if device is None else device
        T = self.num_train_timesteps
        if not t.is_floating_point():
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
                raise ValueError(f"timesteps must lie in [0, {T - 1}], found range [{int(t.min())}, {int(t.max())}]")
            return self.table.to(t.device)[t.long()].to(device=device, dtype=dtype)
        if t.numel() and (float(t.detach().min()) < 0 or float(t.detach().max()) > T - 1):
            raise ValueError(f"timesteps must lie in [0, {T - 1}], found {t.detach().min()}..{t.detach().max()}")
        table = self.table.to(device=t.device)
        lo = t.detach().floor().long().clamp(0, T - 2)
        frac = t.to(torch.float64) - lo.to(torch.float64)
        ab = table[lo] + frac * (table[lo + 1] - table[lo])
        return ab.to(device=device, dtype=dtype)

    def alpha_sigma(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32,
                    device: Any = None) -> tuple[Tensor, Tensor]:
        ab = self.alpha_bar(t, dtype=dtype, device=device)
        return ab.sqrt(), (1 - ab).sqrt()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        # diffusers' DDPMScheduler.add_noise, term for term (a run that noises with either gets the same numbers).
        ac = self.table32.to(device=x0.device, dtype=x0.dtype)[torch.as_tensor(t, device=x0.device).long()]
        return _per_sample(ac**0.5, x0) * x0 + _per_sample((1 - ac) ** 0.5, x0) * noise.to(x0.dtype)

    def timesteps_at(self, levels: Tensor) -> Tensor:
        return torch.as_tensor(levels).long()

    def levels_of(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        return (t.round() if t.is_floating_point() else t).long().clamp(0, self.num_train_timesteps - 1)

    def sampling_timesteps(self, num_steps: int, spacing: str | None = None) -> list[int]:
        """DDIM's timesteps for ``num_steps`` steps with the scheduler's ``timestep_spacing`` (``leading`` +
        ``steps_offset`` for Stable Diffusion) or ``spacing``."""
        from diffusers import DDIMScheduler

        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, found {num_steps}")
        config = dict(self.config) if self.config is not None else {}
        config.update({"num_train_timesteps": self.num_train_timesteps, "clip_sample": False,
                       "set_alpha_to_one": False})
        if spacing is not None:
            config["timestep_spacing"] = spacing
        ddim = DDIMScheduler.from_config(config)
        ddim.set_timesteps(int(num_steps))
        return [int(t) for t in ddim.timesteps]

    def previous_timestep(self, timesteps: list[int], k: int) -> int | None:
        # DDIM's own rule (diffusers): the previous timestep is t − T // n, the end of sampling below 0.
        prev = int(timesteps[k]) - self.num_train_timesteps // len(timesteps)
        return prev if prev >= 0 else None

    def sampler_coefs(self, t: float | int | None, like: Tensor) -> tuple[Tensor, Tensor]:
        # set_alpha_to_one=False: sampling ends at ᾱ_0 (Stable Diffusion's DDIM setting).
        ac = self.table32[0 if t is None else int(t)].to(device=like.device, dtype=like.dtype)
        return ac**0.5, (1 - ac) ** 0.5

    def __repr__(self) -> str:
        return f"DDPMSchedule(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r})"


# ---------------------------------------------------------------------------------------------------- flow matching
class FlowMatchSchedule(NoiseSchedule):
    """Flow matching with the linear interpolant (rectified flow: SD3/3.5, Flux, Qwen-Image, Z-Image, ...):
    ``x_t = (1 − σ) x_0 + σ ε`` with ``σ = t / T``; the network predicts the velocity ``v = ε − x_0``.

    Args:
        timesteps: the training timesteps, ``FlowMatchEulerDiscreteScheduler().timesteps`` as the scheduler makes them
            at construction (descending, ``σ·T``, its ``shift`` applied unless it shifts dynamically).
        num_train_timesteps: ``T``.
    """

    kind = "flow_matching"
    prediction_type = "flow_prediction"
    timestep_dtype = torch.float32

    def __init__(self, timesteps: Tensor, num_train_timesteps: int) -> None:
        ts = torch.as_tensor(timesteps, dtype=torch.float32).detach().cpu().reshape(-1)
        T = int(num_train_timesteps)
        if ts.numel() != T or T < 2:
            raise ValueError(f"a flow-matching schedule needs its {T} training timesteps, found {ts.numel()}")
        ascending = ts.flip(0)
        if (ascending[1:] < ascending[:-1]).any() or ascending[0] <= 0 or ascending[-1] > T:
            raise ValueError(f"the training timesteps must be σ·T with σ in (0, 1], in order; found "
                             f"{float(ascending[0])}..{float(ascending[-1])}")
        self.grid = ascending  # level k -> timestep, float32 (the values the scripts draw)
        self.num_train_timesteps = T

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> FlowMatchSchedule:
        """The training grid of a ``FlowMatchEulerDiscreteScheduler`` as its ``__init__`` builds it (diffusers' SD3 /
        Flux scripts draw from a copy of it before ``set_timesteps`` is ever called)."""
        config = scheduler.config
        T = int(config.num_train_timesteps)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) != T:  # set_timesteps was called: rebuild the training grid
            timesteps = type(scheduler).from_config(config).timesteps
        return cls(timesteps, T)

    def check_prediction_type(self, prediction_type: str) -> None:
        if prediction_type != "flow_prediction":
            raise ValueError(f"a flow-matching schedule runs networks that predict the velocity (flow_prediction); "
                             f"found {prediction_type!r}")

    def sigma(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        t = torch.as_tensor(t)
        device = t.device if device is None else device
        if t.numel() and (float(t.detach().min()) < 0 or float(t.detach().max()) > self.num_train_timesteps):
            raise ValueError(f"flow-matching timesteps must lie in [0, {self.num_train_timesteps}] (σ·T), found "
                             f"{float(t.detach().min())}..{float(t.detach().max())}")
        return (t.to(torch.float64) / self.num_train_timesteps).to(device=device, dtype=dtype)

    def alpha_sigma(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32,
                    device: Any = None) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(t, dtype=torch.float64, device=device)
        return (1 - sigma).to(dtype), sigma.to(dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        sigma = _per_sample(self.sigma(t, dtype=x0.dtype, device=x0.device), x0)
        return (1.0 - sigma) * x0 + sigma * noise.to(x0.dtype)

    def timesteps_at(self, levels: Tensor) -> Tensor:
        levels = torch.as_tensor(levels).long()
        return self.grid.to(levels.device)[levels]

    def levels_of(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        grid = self.grid.to(t.device)
        tf = t.to(grid.dtype)
        hi = torch.searchsorted(grid, tf).clamp(1, grid.numel() - 1)
        lo = hi - 1
        nearer_lo = (tf - grid[lo]).abs() <= (grid[hi] - tf).abs()
        return torch.where(nearer_lo, lo, hi).long()

    def sampling_timesteps(self, num_steps: int, spacing: str | None = None) -> list[float]:
        """``num_steps`` training timesteps at evenly spaced levels from the noisiest down (so the sampler sees the σ
        grid training saw, its shift included); sampling then ends at σ = 0."""
        n = int(num_steps)
        if n < 1:
            raise ValueError(f"num_steps must be >= 1, found {num_steps}")
        if spacing not in (None, "linspace"):
            raise ValueError(f"a flow-matching sampler spaces its steps evenly over the levels (linspace); found "
                             f"timestep_spacing={spacing!r}")
        levels = torch.linspace(self.num_train_timesteps - 1, 0, n).round().long()
        return [float(t) for t in self.grid[levels]]

    def sampler_coefs(self, t: float | int | None, like: Tensor) -> tuple[Tensor, Tensor]:
        sigma = torch.zeros((), dtype=torch.float64) if t is None else self.sigma(float(t), dtype=torch.float64)
        sigma = sigma.to(device=like.device, dtype=like.dtype)
        return 1 - sigma, sigma

    def __repr__(self) -> str:
        T = self.num_train_timesteps
        return f"FlowMatchSchedule(T={T}, σ {float(self.grid[0]) / T:.4g}..{float(self.grid[-1]) / T:.4g})"


def noise_schedule(scheduler: Any, prediction_type: str | None = None) -> NoiseSchedule:
    """The schedule of a diffusers noise scheduler: a DDPM-family scheduler (``alphas_cumprod``: DDPM, DDIM, Euler,
    ...) or a flow-matching one (``FlowMatchEulerDiscreteScheduler``); a :class:`NoiseSchedule` is returned as is.
    ``prediction_type`` overrides a DDPM scheduler's ``config.prediction_type``."""
    if isinstance(scheduler, NoiseSchedule):
        if prediction_type is not None and prediction_type != scheduler.prediction_type:
            scheduler.check_prediction_type(prediction_type)
        return scheduler
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if prediction_type not in (None, "flow_prediction"):
            raise ValueError(f"a flow-matching scheduler trains velocity predictions (flow_prediction); found "
                             f"prediction_type={prediction_type!r}")
        return FlowMatchSchedule.from_scheduler(scheduler)
    if getattr(scheduler, "alphas_cumprod", None) is not None and hasattr(scheduler, "config"):
        return DDPMSchedule.from_scheduler(scheduler, prediction_type)
    raise TypeError(f"noise_scheduler: expected a diffusers DDPM-family scheduler (with alphas_cumprod) or a "
                    f"FlowMatchEulerDiscreteScheduler, found {type(scheduler).__name__}")
