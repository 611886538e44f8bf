"""The danger-zone tracker's settings (``guard.danger_zone``) and the default stop rule built on it (no torch here).

The tracker (:mod:`mnemoguard.callbacks.danger_zone`) finds the noise band where the model memorizes: a data prior at
train start (Dodson et al.'s ``W_σ`` and ``C_σ`` of the training latents) and, every few monitor checks, the live
per-noise-level return rates of the monitor's probes. Every level below is a fraction of probes (a rate), so none
depends on the loss units of one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schema import ConfigError

__all__ = ["COPY_LEVEL", "DANGER_ZONE_TAGS", "DangerZoneConfig", "default_stop"]

#: the copy rate above which the default stop fires, and which the tracker's sequential rounds decide against
COPY_LEVEL = 0.05

#: the scalars the tracker writes (``mem/danger_zone/<name>``); the band edges only while a band is on
DANGER_ZONE_TAGS = ("excess", "copy_rate", "copy_rate_lower", "heldout_copy_rate", "active", "strength", "rows",
                    "t_begin", "t_end",
                    "sigma_lo", "sigma_hi", "prior_sigma_lo", "prior_sigma_hi")


@dataclass
class DangerZoneConfig:
    """The danger-zone tracker (``guard.danger_zone``); it reads the monitor's probes (``guard.monitor``)."""

    enabled: bool = False  # the tracker: a data prior at train start, live return rates every few checks
    every_n_checks: int = 5  # a live measurement at every k-th monitor check (monitor default: every 500 steps)
    num_inference_steps: int = 10  # DDIM steps (the training scheduler's spacing) of the denoising
    start_stride: int = 2  # the probes start from every k-th of those timesteps, the first (highest) included: the
    # σ grid. A measurement costs probes x draws x the sum over starts of the steps left UNet rows (10 and 2: 30)
    draws: int = 2  # fixed noise draws per probe and σ (4 and the multi-step return cost 1,648 rows; BENCHMARKS.md)
    return_steps: int = 1  # sampler steps each start runs before its image is compared: 0 all the remaining ones
    # (the multi-step return); k >= 1: k steps, ending on the last one's clean-sample estimate (1: the one-step
    # return, one network row per probe, draw and σ: 224 rows per measurement at the monitor's default probes)
    copy_draws: int = 0  # generations per at-risk probe for the copy rate (0: draws), each num_inference_steps rows
    copy_draws_max: int = 8  # sequential: while copies were seen but the lower bound below is not above copy_level,
    # one more generation per probe, up to this many (0 or <= copy_draws: never more; 224 rows while no copy is
    # seen, up to 464 when the call is close)
    copy_level: float = COPY_LEVEL  # the copy rate the sequential rounds decide against (the default stop's level)
    copy_confidence: float = 0.95  # of the copy rate's exact one-sided lower bound (Clopper-Pearson;
    # mem/danger_zone/copy_rate_lower)
    guidance_scale: float = 1.0  # guidance of the denoising (1: the conditional model, where copies show best)
    copy_ratio: float = 1.0 / 3.0  # Gu et al.: d1/d2 below this = the same image
    on_level: float = 0.5  # the band turns on when the at-risk probes return this much more often than held-out
    # images (a difference of rates) at some σ ...
    release_level: float = 0.25  # ... and off when the largest excess stays below this (hysteresis); while on, the
    # band's edges are where the excess falls below it
    release_patience: int = 2  # measurements below release_level before the band turns off
    max_strength: float = 0.8  # the noise gap's strength follows the largest excess, at most this (1 excludes)
    curvature_probes: int = 0  # Hutchinson probes of the per-σ curvature difference (Kim & Lee) beside the rates;
    # 0: off (each probe costs 2 input-gradient passes per at-risk probe and σ)
    prior: bool = True  # Dodson et al.'s W_σ and C_σ of the training latents at train start
    prior_rows: int = 2000  # training rows in the prior (a uniform subsample; copies kept as a multiplicity)
    prior_probes: int = 256  # Monte Carlo points of the curves
    prior_sigmas: int = 32  # log-spaced σ from the schedule's smallest to its largest
    weight_threshold: float = 0.5  # the prior band: W_σ at least this ... (our choice; the paper gives no rule)
    coverage_threshold: float = 0.5  # ... and C_σ at least this

    def __post_init__(self) -> None:
        w = "guard.danger_zone"
        for name in ("every_n_checks", "num_inference_steps", "start_stride", "draws", "release_patience",
                     "prior_rows", "prior_probes", "prior_sigmas"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{w}.{name} must be >= 1, found {getattr(self, name)}")
        for name in ("curvature_probes", "return_steps", "copy_draws", "copy_draws_max"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{w}.{name} must be >= 0, found {getattr(self, name)}")
        if not 0.5 <= self.copy_confidence < 1:
            raise ConfigError(f"{w}.copy_confidence must be in [0.5, 1), found {self.copy_confidence}")
        if self.curvature_probes < 0:
            raise ConfigError(f"{w}.curvature_probes must be >= 0, found {self.curvature_probes}")
        if not 0 <= self.release_level <= self.on_level <= 1:
            raise ConfigError(f"{w}: expected 0 <= release_level <= on_level <= 1 (differences of rates), found "
                              f"release_level={self.release_level}, on_level={self.on_level}")
        for name in ("copy_ratio", "copy_level", "max_strength", "weight_threshold", "coverage_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{w}.{name} must be in (0, 1], found {getattr(self, name)}")
        if self.guidance_scale < 1:
            raise ConfigError(f"{w}.guidance_scale must be >= 1, found {self.guidance_scale}")


def default_stop() -> dict[str, Any]:
    """The default stop rule (``guard.default_stop: true``), as early-stopping settings: stop when the exact one-sided
    95 % lower bound of the share of generations from the at-risk probes' captions that copy their own training image
    is above 5 % (``mem/danger_zone/copy_rate_lower``: 1 copy of 8 is no stop, 3 of 8 are; the sequential rounds draw
    more while it is close), and roll back to the last check before
    (``rollback: last_good``; export it with ``training.export: best``)."""
    return {"enabled": True, "monitor": "mem/danger_zone/copy_rate_lower", "mode": "min", "patience": None,
            "divergence_threshold": COPY_LEVEL, "divergence_patience": 1, "rollback": "last_good"}
