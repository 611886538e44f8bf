"""DangerZoneTracker: where in the noise schedule the model memorizes, during training.

* **Data prior** (``on_train_begin``, once; kept in the state): Dodson et al.'s ``W_σ`` and ``C_σ`` of a subsample of
  the training latents and the band they imply (:mod:`.prior`).
* **Live measurement** at every ``every_n_checks``-th check of the monitor: the monitor's probes (at-risk and random
  training probes, held-out images) are noised to every ``start_stride``-th timestep of a few-step DDIM schedule
  (the scheduler's own spacing, as its generations use; ``trailing`` would start at the last timestep, where an
  ε-model's x₀ estimate is ill-conditioned) with fixed noise, denoised by the live model (the remaining steps, or
  ``return_steps`` of them ending on that step's clean-sample estimate: 1 is the one-step return) and compared with a
  reference set of training (and held-out) images (:mod:`.measure`): per σ, the return rate of each kind of probe;
  the *excess* ``r_at_risk(σ) − r_heldout(σ)`` (the held-out images' self-return; without held-out images the random
  training probes' return stands in, :meth:`.measure.ReturnProfile.excess`); the *copy rate*: the share of
  generations from the at-risk probes' captions (DDIM from fixed pure noise, the same steps and guidance,
  ``copy_draws`` per probe) that copy their own training image — the ground truth's criterion on fewer samples and
  steps — and its one-sided exact (Clopper–Pearson) lower bound at ``copy_confidence``; beside it, per σ, Kim &
  Lee's curvature difference (live vs the monitor's baseline) at the at-risk probes' noisy inputs, to see whether it
  marks the same band.
* **The live band**, with hysteresis, decided at the σ the data prior says the sampler visits (``C_σ`` ≥
  ``coverage_threshold``: below that every trained image comes back and no held-out one does — plain fitting at the
  calm low-noise end, which must not raise an alarm on clean data): on when the largest excess there reaches
  ``on_level``; off after ``release_patience`` measurements below ``release_level``; while on, the band is the run of
  grid σ around that peak where the excess (at any σ, down to the grid's anchor at t ≈ 0) is at least
  ``release_level``, mapped to a ``[t_begin, t_end)`` timestep band (:attr:`zone`) with a strength
  ``min(max_strength, largest excess)`` (:attr:`strength`) that a policy rule follows (``band`` / ``strength:
  danger_zone``; ``noise_gap.follow_danger_zone`` is such a rule).

Scalars (``mem/danger_zone/*``, the metrics contract): ``excess``, ``copy_rate``, ``copy_rate_lower``,
``heldout_copy_rate``, ``active``, ``strength``, ``rows`` (the network rows the measurement took) at every
measurement; ``t_begin``, ``t_end``, ``sigma_lo``, ``sigma_hi`` while a band is on;
``prior_sigma_lo`` / ``prior_sigma_hi`` once, with the first measurement. Every level is a difference or a share
of probes: nothing depends on one model's loss units. Every rank makes the same UNet calls (ZeRO-3 needs that);
rank 0's flags are broadcast so every rank decides the same.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from ...config.danger_zone import DangerZoneConfig
from ...evaluation import binomial_lower_bound
from ...isolation import eval_mode, preserved_rng_state
from ...serialization import check_keys
from ..bands import NoiseBand
from ..base import Callback, TrainerControl, TrainerState
from ..copies import from_rank_zero, own_copies
from ..monitor.tensors import AT_RISK_KINDS, ProbeSet
from .measure import (
    ReturnProfile,
    band_from_excess,
    band_timesteps,
    return_flags,
    return_profile,
    sequential_copies,
)
from .prior import data_prior

logger = logging.getLogger("mnemoguard")

__all__ = ["DangerZoneTracker"]

class DangerZoneTracker(Callback):
    """The data prior, the live per-σ return rates and the live band (module docstring).

    Args:
        config: the settings (``guard.danger_zone``).
        monitor: the :class:`~mnemoguard.callbacks.monitor.MemorizationMonitor` whose probes and checks it uses
            (registered before the tracker).

    Attributes:
        prior: the data prior (None until ``on_train_begin``, or with ``prior: false``).
        history: one dict per live measurement: ``{"step", "profile", "excess", "copy_rate", "copy_rate_lower",
            "rows", "heldout_copy_rate", "active", "band", "strength", "curvature"}``.
        zone: the live band as a :class:`~mnemoguard.callbacks.bands.NoiseBand` (levels ``[lo, hi)`` and their σ) while
            on.
    """

    needs = frozenset({"dataset", "prompts"})

    def __init__(self, config: DangerZoneConfig | None = None, monitor: Any = None) -> None:
        if monitor is None:
            raise ValueError("DangerZoneTracker measures the monitor's probes: pass monitor=")
        self.config = config or DangerZoneConfig()
        self.monitor = monitor
        self.prior: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.active = False
        self.strength = 0.0
        self.zone: NoiseBand | None = None
        self.checks_seen = 0
        self.seconds = {"prior": 0.0, "measure": 0.0}
        self._below = 0
        self._inputs: dict[str, Any] | None = None
        self._context: Any = None
        self._prior_logged = False

    # ------------------------------------------------------------------------------------------------ set-up
    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        self._context = context
        start = time.perf_counter()
        with preserved_rng_state():
            self._inputs = self._build_inputs(context)
            groups = {k: bool(v.any()) for k, v in self._inputs["groups"].items()}
            if not (groups["heldout"] or (groups["at_risk"] and groups["random"])):
                state.warn("DangerZoneTracker: no held-out images (guard.monitor.heldout_data) and no random training "
                           "probes beside the at-risk ones: the excess, and so the live band, cannot be measured; "
                           "only the copy rate is")
            if self.config.prior and self.prior is None:
                seed = self.monitor.probe_set.seed + 11
                self.prior = data_prior(context, self.config, seed, self._inputs["heldout_x0"])
        self.seconds["prior"] += time.perf_counter() - start

    def _build_inputs(self, context: Any) -> dict[str, Any]:
        """Per (probe, draw) clean samples, noise, captions and own image, from the monitor's probe set."""
        probes: ProbeSet = self.monitor.probe_set
        Q, D = len(probes.kinds), self.config.draws
        g = torch.Generator().manual_seed(probes.seed + 12)
        noise = torch.randn((Q * D, *probes.x0.shape[1:]), generator=g)
        gen_noise = torch.randn((Q * D, *context.denoiser.adapter.sample_shape), generator=g)
        rep = torch.arange(Q).repeat_interleave(D)
        kind = [probes.kinds[i] for i in rep.tolist()]
        held = probes.heldout_pixels.shape[0] > 0
        # The copy rate's generations, round-major (round r: one per copy probe: the at-risk ones, else every training
        # probe); rounds below `draws` use gen_noise's draws, further sequential rounds more noise from the same seed.
        copy_probes = [q for q, k in enumerate(probes.kinds) if k in AT_RISK_KINDS] or \
            [q for q, k in enumerate(probes.kinds) if k != "heldout"]
        rounds = self._copy_rounds()[1]
        extra = torch.randn((len(copy_probes) * max(0, rounds - D), *context.denoiser.adapter.sample_shape),
                            generator=g)
        copy_noise = [gen_noise[q * D + r] if r < D else extra[(r - D) * len(copy_probes) + i]
                      for r in range(rounds) for i, q in enumerate(copy_probes)]
        copy_probe = torch.tensor([q for _ in range(rounds) for q in copy_probes], dtype=torch.long)
        return {
            "x0": probes.x0[rep.to(probes.x0.device)], "cond": probes.cond[rep], "noise": noise,
            "own": probes.own[rep], "reference": probes.reference, "is_training": probes.is_training,
            "groups": {"at_risk": torch.tensor([k in AT_RISK_KINDS for k in kind]),
                       "random": torch.tensor([k == "random" for k in kind]),
                       "train": torch.tensor([k != "heldout" for k in kind]),
                       "heldout": torch.tensor([k == "heldout" for k in kind])},
            "uncond": probes.uncond,
            "heldout_x0": probes.x0[probes.num_train_probes:].detach().cpu() if held else None,
            "copy_probes": len(copy_probes), "copy_cond": probes.cond[copy_probe], "copy_own": probes.own[copy_probe],
            "copy_noise": torch.stack(copy_noise) if copy_noise else torch.zeros((0, *gen_noise.shape[1:])),
        }

    def _copy_rounds(self) -> tuple[int, int]:
        """``(first, most)``: generations per copy probe always drawn, and at most (sequential rounds)."""
        c = self.config
        first = c.copy_draws or c.draws
        return first, max(first, c.copy_draws_max)

    # ------------------------------------------------------------------------------------------------ per step
    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    logs: dict | None = None, **kwargs: Any) -> None:
        values: dict[str, float] = {}
        if self._inputs is not None and self.monitor.last_check_step == state.global_step and (
                not self.history or self.history[-1]["step"] != state.global_step):
            self.checks_seen += 1
            if self.checks_seen % self.config.every_n_checks == 0:
                values.update(self.measure(state.global_step))
        if values and not self._prior_logged and self.prior is not None:  # with the first measurement (a scalar of
            self._prior_logged = True  # this producer alone would tell early stopping its metric is missing)
            band = self.prior["band"]
            if not band["empty"]:
                values.update({"mem/danger_zone/prior_sigma_lo": band["sigma_lo"],
                               "mem/danger_zone/prior_sigma_hi": band["sigma_hi"]})
        if values:
            state.update_metrics(values)
            if logs is not None:
                logs.update(values)
            control.should_log = True

    def grid(self) -> tuple[list[int], list[float | int], list[int], list[float]]:
        """``(starts, timesteps, levels, sigmas)`` of the measurement's starting points: every ``start_stride``-th
        step of the ``num_inference_steps`` sampler and its last (t ≈ 0, where everything comes back: the band's lower
        anchor), leaving out a start of pure noise (flow matching's σ = 1: that is a generation, which the copy rate
        measures); their timesteps, levels and VE-equivalent σ."""
        from ...sampling import sampling_steps

        c, schedule = self.config, self._context.schedule
        steps = sampling_steps(self._context.denoiser, c.num_inference_steps)
        starts, timesteps, levels, sigmas = [], [], [], []
        for s in sorted({*range(0, c.num_inference_steps, c.start_stride), c.num_inference_steps - 1}):
            t = steps[s][0]
            sigma = float(schedule.ve_sigma(torch.tensor(t)))
            if math.isfinite(sigma):
                starts.append(s)
                timesteps.append(t)
                levels.append(int(schedule.levels_of(torch.tensor(t))))
                sigmas.append(sigma)
        return starts, timesteps, levels, sigmas

    def measure(self, step: int) -> dict[str, float]:
        """One live measurement at ``step``: recorded in :attr:`history`, the band updated; returns the scalars."""
        from ...sampling import denoise_from

        start = time.perf_counter()
        c, context, inp = self.config, self._context, self._inputs
        adapter = context.denoiser.adapter
        rows_before = adapter.rows
        starts, timesteps, levels, sigmas = self.grid()
        with preserved_rng_state(), eval_mode(context.unwrapped_model):
            images = denoise_from(context.denoiser, inp["x0"], inp["noise"], starts, inp["cond"], inp["uncond"],
                                  c.guidance_scale, c.num_inference_steps, decode=context.decode,
                                  batch_size=self.monitor.config.batch_size * 4, num_steps=c.return_steps or None)
            returns, lands = return_flags(images, inp["reference"], inp["own"], inp["is_training"], c.copy_ratio)
            (returns, lands), copies = from_rank_zero(context, returns, lands), self._generation_copies()
            curvature = _ascending(self._curvature(timesteps), levels) if c.curvature_probes else None
        profile = return_profile(levels, sigmas, returns, lands, inp["groups"])
        entry = self.decide(step, profile, context.num_train_timesteps, curvature)
        entry["copy_rate"] = float(copies.float().mean()) if copies.numel() else float("nan")
        entry["copy_rate_lower"] = binomial_lower_bound(int(copies.sum()), copies.numel(), c.copy_confidence)
        entry["rows"] = int(adapter.rows - rows_before)
        self.history.append(entry)
        self.seconds["measure"] += time.perf_counter() - start
        values = {"mem/danger_zone/excess": entry["excess"], "mem/danger_zone/copy_rate": entry["copy_rate"],
                  "mem/danger_zone/copy_rate_lower": entry["copy_rate_lower"],
                  "mem/danger_zone/active": float(self.active), "mem/danger_zone/strength": self.strength,
                  "mem/danger_zone/rows": entry["rows"]}
        if entry["heldout_copy_rate"] is not None:
            values["mem/danger_zone/heldout_copy_rate"] = entry["heldout_copy_rate"]
        if self.active and entry["band"] is not None:
            b = entry["band"]
            values.update({"mem/danger_zone/t_begin": b["t_begin"], "mem/danger_zone/t_end": b["t_end"],
                           "mem/danger_zone/sigma_lo": b["sigma_lo"], "mem/danger_zone/sigma_hi": b["sigma_hi"]})
        return {k: float(v) for k, v in values.items()}

    def _generation_copies(self) -> torch.Tensor:
        """Per generation from a copy probe's caption (DDIM from fixed pure noise, the tracker's steps and guidance):
        does it copy its own training image (the nearest reference is its own, d1/d2 < ``copy_ratio``)? The ground
        truth's criterion, on fewer samples and steps. ``copy_draws`` rounds of one generation per probe, then, while
        copies were seen but the copy rate's lower bound is not above ``copy_level``, one round more, up to
        ``copy_draws_max`` (every rank takes rank 0's flags, so all make the same calls)."""
        from ...sampling import generate

        c, context, inp = self.config, self._context, self._inputs
        A = inp["copy_probes"]

        def draw(start: int, count: int) -> torch.Tensor:
            rows = slice(start * A, (start + count) * A)
            images = generate(context.denoiser, inp["copy_cond"][rows], inp["uncond"], c.guidance_scale,
                              c.num_inference_steps, latents=inp["copy_noise"][rows], decode=context.decode)
            return from_rank_zero(context, own_copies(images, inp["reference"], inp["copy_own"][rows],
                                                      c.copy_ratio).copies)[0]

        if A == 0:
            return torch.zeros(0, dtype=torch.bool)
        return sequential_copies(draw, *self._copy_rounds(), c.copy_level, c.copy_confidence)

    def _curvature(self, timesteps: list[float | int]) -> list[float]:
        """Per grid t (in the sampler's order of ``timesteps``): mean Kim & Lee Δh of the at-risk probes (first draw
        each), live vs the monitor's baseline, at ``x_t = α_t x0 + σ_t ε``."""
        from ...signals import curvature_diff_map

        context, inp = self._context, self._inputs
        den, schedule = context.denoiser, context.schedule
        mask = inp["groups"]["at_risk"] if bool(inp["groups"]["at_risk"].any()) else inp["groups"]["train"]
        rows = torch.nonzero(mask).reshape(-1)[:: self.config.draws][:8].to(inp["x0"].device)
        if rows.numel() == 0:
            return [float("nan")] * len(timesteps)
        x0, noise, cond = inp["x0"][rows], inp["noise"][rows.cpu()].to(inp["x0"].device), inp["cond"][rows.cpu()]
        baseline = self.monitor.curvature_baseline()
        out = []
        for k, t in enumerate(timesteps):
            tt = torch.full((rows.numel(),), t, dtype=schedule.timestep_dtype, device=x0.device)
            x = schedule.add_noise(x0, noise.to(x0.dtype), tt)
            base_fn = baseline.eps_fn(tt, cond)
            maps = curvature_diff_map(den.eps_fn(tt, cond), base_fn, x, num_probes=self.config.curvature_probes,
                                      generator=torch.Generator().manual_seed(self.monitor.probe_set.seed + 13 + k),
                                      method="vjp")
            out.append(float(maps.detach().float().mean()))
        return out

    def coverage_floor(self) -> float:
        """The smallest σ at which the data prior's coverage ``C_σ`` reaches ``coverage_threshold`` (0 without a
        prior): below it the sampler does not visit the inputs training saw (Dodson et al.'s calm low-noise end), so
        training images coming back from there is plain fitting, not the memorization that reaches generations."""
        prior = self.prior
        if not prior:
            return 0.0
        covered = [s for s, cov in zip(prior["sigmas"], prior["coverage"]) if cov >= self.config.coverage_threshold]
        return float(covered[0]) if covered else 0.0

    def reset_band(self) -> None:
        """The band off, as before the first measurement (to replay recorded measurements through :meth:`decide`)."""
        self.active, self._below, self.zone, self.strength = False, 0, None, 0.0

    def decide(self, step: int, profile: ReturnProfile, num_train_timesteps: int,
               curvature: list[float] | None = None) -> dict[str, Any]:
        """Update the band from one measurement's ``profile`` (also used to replay recorded measurements): hysteresis
        on the largest excess at covered σ (above :meth:`coverage_floor`: no alarm from plain fitting at low noise);
        while on, the band is the run around that peak where the excess (at any σ) holds, in timesteps of a
        ``num_train_timesteps``-level schedule. Returns the history entry (its ``copy_rate`` still NaN)."""
        c = self.config
        floor = self.coverage_floor()
        full = profile.excess()
        excess = [e if s >= floor else float("nan") for e, s in zip(full, profile.sigmas)]
        finite = [e for e in excess if math.isfinite(e)]
        top = max(finite) if finite else float("nan")
        if not self.active and top >= c.on_level:
            self.active, self._below = True, 0
            logger.info("DangerZoneTracker: step %d: the at-risk probes return %.2f more often than held-out images "
                        "at some noise level: band on", step, top)
        elif self.active:
            self._below = self._below + 1 if not top >= c.release_level else 0
            if self._below >= c.release_patience:
                self.active, self._below = False, 0
                logger.info("DangerZoneTracker: step %d: excess %.2f below %.2f for %d measurements: band off", step,
                            top, c.release_level, c.release_patience)
        band = None
        peak = max((k for k, e in enumerate(excess) if math.isfinite(e)), key=lambda k: excess[k], default=None)
        # Where: around the covered peak, as far as the excess holds, below the coverage onset too (where the
        # planted images come back and held-out ones do not: memorization reaches down to the calm end).
        run = band_from_excess(full, c.release_level, peak) if self.active and peak is not None else None
        if run is not None:
            lo, hi = run
            t_begin, t_end = band_timesteps(profile.timesteps, lo, hi, num_train_timesteps)
            band = {"sigma_lo": profile.sigmas[lo], "sigma_hi": profile.sigmas[hi], "t_begin": t_begin,
                    "t_end": t_end}
            self.zone = NoiseBand(t_begin, t_end, band["sigma_lo"], band["sigma_hi"])
            self.strength = float(min(c.max_strength, top))
        elif not self.active:
            self.zone, self.strength = None, 0.0
        held = profile.rates.get("heldout_copy")
        return {
            "step": int(step), "profile": profile.to_dict(), "excess": float(top), "copy_rate": float("nan"),
            "heldout_copy_rate": float(max(held)) if held else None, "active": self.active, "band": band,
            "strength": self.strength, "curvature": curvature,
        }

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        zone = None if self.zone is None else {"sigma_lo": self.zone.sigma_lo, "sigma_hi": self.zone.sigma_hi,
                                               "lo": self.zone.lo, "hi": self.zone.hi}
        return {"prior": self.prior, "history": self.history, "active": self.active, "below": self._below,
                "strength": self.strength, "zone": zone, "checks_seen": self.checks_seen,
                "seconds": dict(self.seconds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_keys(state, {"prior": (dict, type(None)), "history": list, "active": bool, "below": int,
                           "strength": (int, float), "zone": (dict, type(None)), "checks_seen": int,
                           "seconds": dict}, "DangerZoneTracker", required=("history", "active"))
        self.prior = state.get("prior")
        self.history = list(state["history"])
        self.active = bool(state["active"])
        self._below = int(state.get("below", 0))
        self.strength = float(state.get("strength", 0.0))
        zone = state.get("zone")
        if zone is not None and "t_lo" in zone:  # saved before bands were NoiseBands: inclusive t_lo..t_hi
            zone = {"sigma_lo": zone["sigma_lo"], "sigma_hi": zone["sigma_hi"], "lo": zone["t_lo"],
                    "hi": zone["t_hi"] + 1}
        self.zone = None if zone is None else NoiseBand(**zone)
        self.checks_seen = int(state.get("checks_seen", 0))
        self.seconds = {**self.seconds, **{k: float(v) for k, v in state.get("seconds", {}).items()}}
        self._prior_logged = True


def _ascending(values: list[float], levels: list[int]) -> list[float]:
    """``values`` given in the sampler's order (descending noise) -> ascending levels (the profile's order)."""
    return [v for _, v in sorted(zip(levels, values))]
