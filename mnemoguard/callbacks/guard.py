"""The recipe's ``guard:`` section: which memorization callbacks run, with which settings, built in one place.

Callbacks are built in producer -> consumer order (the metrics contract of :mod:`mnemoguard.callbacks.base`):
the monitor first, then the policy and the noise-gap scheduler it drives, then regularizers, early stopping, and the
dashboard and report, which read what all the others produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import Callback
from .early_stopping import EarlyStopping
from .noise_gap import NoiseGapConfig, NoiseGapScheduler
from .policy import MitigationPolicy, Rule


@dataclass
class NoiseGapSettings(NoiseGapConfig):
    enabled: bool = False  # install the noise-gap timestep scheduler (static bias and / or the policy's gap)


@dataclass
class RuleSettings:
    """One policy rule (see :class:`mnemoguard.callbacks.policy.Rule`)."""

    signal: str = ""  # metric key, band tag included, e.g. "mem/live_vs_ema/band=mid/train"
    action: str = "noise_gap"  # a registered action: "noise_gap" or a regularizer's name
    threshold: float | None = None  # absolute on-level
    rise_factor: float | None = None  # on-level = rise_factor x the first measured value
    patience: int = 1  # consecutive checks beyond the on-level before turning on
    release: float | None = None  # absolute off-level; None = release_fraction x on-level
    release_fraction: float = 0.8
    release_patience: int = 1
    direction: Literal["above", "below"] = "above"
    strength: float = 1.0
    band: tuple[int, int] | None = None  # timesteps [begin, end) passed to the action (noise_gap)


@dataclass
class EarlyStoppingSettings:
    """Lightning's ``EarlyStopping`` vocabulary; patience counts checks (fresh values of ``monitor``)."""

    enabled: bool = False
    monitor: str = ""  # a metric key, e.g. "mem/live_vs_ema/band=mid/train"
    mode: Literal["min", "max"] = "min"
    patience: int = 3
    min_delta: float = 0.0
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None  # stop at once when the metric is this bad
    check_finite: bool = True
    start_from_step: int = 0  # no stopping before this optimizer step


@dataclass
class GuardConfig:
    enabled: bool = False  # master switch: nothing below runs unless true
    noise_gap: NoiseGapSettings = field(default_factory=NoiseGapSettings)
    policy: list[RuleSettings] = field(default_factory=list)
    early_stopping: EarlyStoppingSettings = field(default_factory=EarlyStoppingSettings)


def build_guard_callbacks(cfg: GuardConfig) -> list[Callback]:
    """The callbacks the ``guard:`` section asks for, in the order they must run."""
    if not cfg.enabled:
        return []
    callbacks: list[Callback] = []
    if cfg.policy:
        rules = [Rule(**{k: v for k, v in vars(r).items()}) for r in cfg.policy]
        callbacks.append(MitigationPolicy(rules))
    if cfg.noise_gap.enabled:
        settings = {k: v for k, v in vars(cfg.noise_gap).items() if k != "enabled"}
        callbacks.append(NoiseGapScheduler(NoiseGapConfig(**settings)))
    es = cfg.early_stopping
    if es.enabled:
        if not es.monitor:
            raise ValueError("guard.early_stopping.enabled needs guard.early_stopping.monitor (a metric key)")
        callbacks.append(EarlyStopping(**{k: v for k, v in vars(es).items() if k != "enabled"}))
    return callbacks
