"""Noise-gap timestep scheduling: train less (or not at all) on a band of noise levels, on top of the loop's own
timestep density.

Dodson et al. (2026, "Two Calm Ends and the Wild Middle") find a *danger zone* at medium noise where memorization
is induced and propose under-training it ("gap training"); Vu et al. (2026) show that moving the timestep
distribution away from uniform changes how much a model memorizes. :class:`NoiseGapScheduler` is the timestep
sampler that does this (installed in the run's timestep slot, which ``Guard.sample_timesteps`` draws from), with
diffusers' SDXL vocabulary ``timestep_bias_{strategy,begin,end,multiplier,portion}`` plus a ``gap`` strategy:

=========  ==========================================================================================================
strategy   per-level weight ``m(t)`` before normalisation (``T`` levels, :mod:`mnemoguard.family.schedule`; all bands
           are ``[a, b)`` of levels: the DDPM timesteps, the flow-matching training timesteps by increasing σ)
=========  ==========================================================================================================
none       1 everywhere (the loop's own density, drawn exactly as the loop draws it: :class:`DensitySampler`)
earlier    ``multiplier`` on ``[0, int(portion·T))`` (low noise), 1 elsewhere — as diffusers
later      ``multiplier`` on ``[T − int(portion·T), T)`` (high noise), 1 elsewhere — as diffusers
range      ``multiplier`` on ``[begin, end)``, 1 elsewhere — as diffusers
gap        ``multiplier`` ∈ [0, 1) on ``[begin, end)`` (0 excludes the band), 1 elsewhere
=========  ==========================================================================================================

The weights multiply the loop's timestep density ``p(t)`` (:class:`~mnemoguard.family.density.TimestepDensity`:
uniform for DDPM scripts, diffusers' ``weighting_scheme`` — ``logit_normal``, ``mode``, ``cosmap`` … — for flow
matching), so a flow model keeps its logit-normal shape outside the gap.

Adaptive mode: the policy calls :meth:`NoiseGapScheduler.activate` ``(band, strength)`` and
:meth:`~NoiseGapScheduler.deactivate`; ``follow_danger_zone`` is such a rule (:func:`mnemoguard.config.plan.
follow_danger_zone_rule`: the danger-zone tracker's live band and strength while it is on, released when it turns
off).
While active, the weights inside ``band`` are multiplied by
``1 − strength`` on top of the static ones (strength 1 excludes the band, 0.5 halves its share). Levels are drawn
with ``torch.multinomial`` over ``q(t) = p(t) m(t) / Σ p m`` and handed out as the schedule's timesteps.

**The loss-weight rule.** A band can be under-trained in two ways: draw fewer of its timesteps (sampling), or draw
as the loop does and weight their loss less (weighting). In expectation they are the same objective —
``E_p[m(t)/E_p[m] · ℓ(t)] = E_q[ℓ(t)]`` — but weighting spends forward passes on samples that count little or
nothing, so we sample. The per-sample loss weights returned with the timesteps are then

    ``w(t) = (p(t) / q(t))^importance / Z``,  ``Z = E_q[(p/q)^importance]`` (so that ``E_q[w] = 1``),

with ``p`` the loop's own density. The normalisation keeps the average per-sample weight of a batch at 1, as with
the loop's own draw, so the loop's batch mean — hence the effective learning rate and the gradient-clipping scale
— stays comparable whatever the band and strength. With ``importance = 0`` (the default) every weight is 1 and the
gradient is that of the biased objective ``E_q[ℓ]``: the band *is* under-trained, which is the point. With
``importance = 1`` the weights are the full importance ratios ``p/q`` and ``E_q[(p/q)·ℓ] = E_p[ℓ]``: the estimator
is unbiased for the loop's *own* objective, so the band gets back exactly the expected gradient it had before (from
fewer, heavier samples) — the under-training is undone and only variance is added. That is how to move compute
without changing the objective, not how to mitigate memorization; values in between trade the two. Inside an
excluded band (``q = 0``) nothing is drawn, so no weight can restore it. Note that ``train/loss`` shifts when a band
is gapped: it is a mean over a different mix of timesteps, whose losses differ in scale.

The scheduler is also a :class:`Callback`: ``on_train_begin`` installs it in ``context.timesteps`` (taking the schedule
and the loop's density from the run) and ``on_step_end`` logs the active distribution as floats:
``mem/noise_gap/strength``, ``mem/noise_gap/band_begin``, ``mem/noise_gap/band_end`` (the adaptive band; the
static band when none is active; levels) and ``mem/noise_gap/band_mass`` (the probability of drawing a timestep inside
it). :meth:`~NoiseGapScheduler.distribution` gives the per-level probabilities for a histogram.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..config.guard import STRATEGIES, NoiseGapConfig
from ..family.density import TimestepDensity
from .bands import as_band
from .base import Callback, TrainerControl, TrainerState

logger = logging.getLogger("mnemoguard")

class NoiseGapScheduler(Callback):
    """A timestep sampler with a static bias and an adaptive gap, installed by ``on_train_begin``.

    Call signature as every sampler: ``sampler(batch_size, device, generator=None) -> (timesteps, loss_weights)``.
    Keyword arguments override fields of ``config`` (``NoiseGapScheduler(timestep_bias_strategy="gap", ...)``).
    See the module docstring for the strategies and the loss-weight rule.

    Args:
        num_train_timesteps: the schedule's number of levels when it is used before a run hands over its schedule
            (then a DDPM-like one: the timesteps are the levels, the density uniform).
    """

    def __init__(self, config: NoiseGapConfig | None = None, num_train_timesteps: int | None = None,
                 **overrides: Any) -> None:
        self.config = dataclasses.replace(config or NoiseGapConfig(), **overrides)
        c = self.config
        if c.timestep_bias_strategy not in STRATEGIES:
            raise ValueError(f"timestep_bias_strategy must be one of {STRATEGIES}, found {c.timestep_bias_strategy!r}")
        self.active = False
        self.band: tuple[int, int] | None = None
        self.strength = 0.0
        self.num_train_timesteps = 0
        self.schedule: Any = None  # the run's NoiseSchedule (None: timesteps are the levels)
        self.density = TimestepDensity()
        self._base: torch.Tensor | None = None  # the loop's own density over the levels
        self._probs: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._uniform = True
        self._changed = True
        if num_train_timesteps is not None:
            self._set_num_train_timesteps(num_train_timesteps)

    # -------------------------------------------------------------------------------- distribution
    def _set_num_train_timesteps(self, n: int) -> None:
        if int(n) <= 0:
            raise ValueError(f"num_train_timesteps must be positive, found {n}")
        self.num_train_timesteps = int(n)
        self._base = self.density.probabilities(self.schedule) if self.schedule is not None else \
            torch.full((self.num_train_timesteps,), 1.0 / self.num_train_timesteps, dtype=torch.float64)
        self._static_weights()  # validates the static configuration against T
        if self.config.adaptive_band is not None:
            self._check_band(as_band(self.config.adaptive_band))
        self._rebuild()

    def _need_t(self) -> int:
        if not self.num_train_timesteps:
            raise RuntimeError(
                "NoiseGapScheduler does not know num_train_timesteps yet: pass it to the constructor, or let "
                "on_train_begin take it from the run"
            )
        return self.num_train_timesteps

    def _check_band(self, band: tuple[int, int]) -> tuple[int, int]:
        T = self._need_t()
        begin, end = band
        if not 0 <= begin < end <= T:
            raise ValueError(
                f"a band must satisfy 0 <= begin < end <= num_train_timesteps={T}; found [{begin}, {end})"
            )
        return begin, end

    def _static_band(self) -> tuple[int, int] | None:
        c, T = self.config, self._need_t()
        if c.timestep_bias_strategy in ("range", "gap"):
            return self._check_band((c.timestep_bias_begin, min(c.timestep_bias_end, T)))
        n = int(c.timestep_bias_portion * T)
        if c.timestep_bias_strategy == "earlier":
            return (0, n)
        if c.timestep_bias_strategy == "later":
            return (T - n, T)
        return None

    def _static_weights(self) -> torch.Tensor:
        c, T = self.config, self._need_t()
        m = torch.ones(T, dtype=torch.float64)
        strategy, mult = c.timestep_bias_strategy, float(c.timestep_bias_multiplier)
        if strategy == "none":
            return m
        if strategy == "gap":
            if not 0.0 <= mult < 1.0:
                raise ValueError(
                    "timestep_bias_strategy='gap' needs timestep_bias_multiplier in [0, 1) (the weight kept inside "
                    f"the band; 0 excludes it), found {mult}"
                )
        elif mult <= 0.0:
            raise ValueError(
                f"timestep_bias_multiplier must be > 0 for strategy {strategy!r} (found {mult}); to exclude a band "
                "use strategy 'gap' with multiplier 0"
            )
        if strategy in ("earlier", "later") and not 0.0 < c.timestep_bias_portion <= 1.0:
            raise ValueError(f"timestep_bias_portion must be in (0, 1], found {c.timestep_bias_portion}")
        band = self._static_band()
        assert band is not None
        m[band[0]:band[1]] *= mult
        if m.sum() <= 0:
            raise ValueError(f"the static distribution excludes every timestep (strategy {strategy!r}, band {band})")
        return m

    def _rebuild(self) -> None:
        m = self._static_weights()
        if self.active and self.band is not None:
            m[self.band[0]:self.band[1]] *= 1.0 - self.strength
        mass = self._base * m
        total = mass.sum()
        if total <= 0:
            raise ValueError(
                f"the active gap [{self.band[0]}, {self.band[1]}) with strength {self.strength} leaves no timestep "
                "to sample"
            )
        q = mass / total
        a = self.config.importance
        w = torch.zeros_like(q)
        support = q > 0
        if a == 0.0:
            w[support] = 1.0
        else:
            w[support] = (self._base[support] / q[support]) ** a
            w[support] /= (q[support] * w[support]).sum()  # E_q[w] = 1
        self._probs, self._weights = q, w
        self._uniform = bool(torch.all(m == m[0]))  # the loop's own density, unchanged
        self._changed = True

    def distribution(self) -> torch.Tensor:
        """Current per-level sampling probabilities ``q(t)`` (float64, length ``num_train_timesteps``)."""
        self._need_t()
        return self._probs.clone()

    def loss_weight_table(self) -> torch.Tensor:
        """Current per-level loss weights ``w(t)`` (0 where ``q(t) = 0``); ``Σ q·w = 1``."""
        self._need_t()
        return self._weights.clone()

    def __call__(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` levels from ``q`` and return their timesteps with their loss weights."""
        T = self._need_t()
        if self._uniform:  # the loop's own draw (DensitySampler's): installing the scheduler changes nothing
            if self.schedule is not None:
                levels = self.density.draw_levels(self.schedule, batch_size, generator)
            else:
                levels = torch.randint(0, T, (batch_size,), generator=generator, device="cpu")
        else:
            levels = torch.multinomial(self._probs, batch_size, replacement=True, generator=generator)
        t = self.schedule.timesteps_at(levels) if self.schedule is not None else levels
        return t.to(device), self._weights[levels].float().to(device)

    # -------------------------------------------------------------------------------- adaptive mode
    def activate(self, band: Any = None, strength: float = 1.0) -> None:
        """Gap ``band`` (``(begin, end)`` or a DangerZone; None: ``adaptive_band`` or ``[begin, end)``) by
        ``strength`` ∈ [0, 1]: its weights are multiplied by ``1 − strength``."""
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1] (1 excludes the band), found {strength}")
        if band is None:
            c = self.config
            band = c.adaptive_band if c.adaptive_band is not None else (c.timestep_bias_begin, c.timestep_bias_end)
            band = (band[0], min(band[1], self._need_t()))
        new_band = self._check_band(as_band(band))
        old = (self.active, self.band, self.strength)
        self.active, self.band, self.strength = True, new_band, float(strength)
        try:
            self._rebuild()
        except ValueError:
            self.active, self.band, self.strength = old
            self._rebuild()
            raise

    def deactivate(self) -> None:
        """Back to the static distribution."""
        self.active, self.band, self.strength = False, None, 0.0
        if self.num_train_timesteps:
            self._rebuild()

    def current_band(self) -> tuple[int, int] | None:
        """The adaptive band while active, else the static band (None for strategy 'none')."""
        if self.active:
            return self.band
        return self._static_band() if self.num_train_timesteps else None

    def band_mass(self) -> float:
        """Probability that a draw lands in :meth:`current_band` (0 when there is none)."""
        band = self.current_band()
        return float(self._probs[band[0]:band[1]].sum()) if band else 0.0

    # -------------------------------------------------------------------------------- callback hooks
    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        n = context.num_train_timesteps
        if self.num_train_timesteps and self.num_train_timesteps != n:
            raise ValueError(f"NoiseGapScheduler was built for num_train_timesteps={self.num_train_timesteps}, the "
                             f"run's noise scheduler has {n}")
        self.schedule, self.density = context.schedule, context.density
        self._set_num_train_timesteps(n)
        context.timesteps.install(self, "noise_gap")
        self._changed = True

    def metrics(self) -> dict[str, float]:
        """The logged description of the active distribution (floats)."""
        band = self.current_band() or (0, self.num_train_timesteps)
        return {
            "mem/noise_gap/strength": float(self.strength if self.active else 0.0),
            "mem/noise_gap/band_begin": float(band[0]),
            "mem/noise_gap/band_end": float(band[1]),
            "mem/noise_gap/band_mass": self.band_mass(),
        }

    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    logs: dict | None = None, **kwargs: Any) -> None:
        if not self.num_train_timesteps:
            return
        values = self.metrics()
        state.update_metrics(values)
        if logs is not None:
            logs.update(values)
        if self._changed:  # write the curve's change points even between the loop's log steps
            control.should_log = True
            self._changed = False

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "active": self.active,
            "band": list(self.band) if self.band is not None else None,
            "strength": self.strength,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..serialization import check_keys

        check_keys(state, {"num_train_timesteps": int, "active": bool, "band": (list, type(None)),
                           "strength": (int, float), "config": dict}, "NoiseGapScheduler",
                   required=("active", "band", "strength"))
        saved = state.get("config", {})
        now = dataclasses.asdict(self.config)
        changed = {k: (saved[k], now[k]) for k in saved if k in now and saved[k] != now[k] and k != "adaptive_band"}
        if changed:
            logger.warning("NoiseGapScheduler: the static configuration differs from the checkpoint's (checkpoint, "
                           "now): %s; using the current one", changed)
        if state.get("num_train_timesteps"):
            if self.num_train_timesteps and self.num_train_timesteps != state["num_train_timesteps"]:
                raise ValueError(
                    f"the checkpoint's NoiseGapScheduler has num_train_timesteps={state['num_train_timesteps']}, "
                    f"this one {self.num_train_timesteps}"
                )
        self.active = bool(state["active"])
        self.band = tuple(state["band"]) if state.get("band") is not None else None
        self.strength = float(state["strength"])
        n = int(state.get("num_train_timesteps") or self.num_train_timesteps)
        if n:
            self._set_num_train_timesteps(n)  # the run's density replaces the uniform one in on_train_begin

