"""The recipe's ``guard:`` section: which memorization callbacks run, with which settings, built in one place.

Callbacks are built in producer -> consumer order (the metrics contract of :mod:`mnemoguard.callbacks.base`):
the monitor first, then the policy and the noise-gap scheduler it drives, then regularizers, early stopping, and the
dashboard and report, which read what all the others produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .base import Callback
from .dashboard import DashboardConfig, TensorBoardDashboard
from .early_stopping import EarlyStopping
from .monitor import MemorizationMonitor, MonitorConfig
from .noise_gap import NoiseGapConfig, NoiseGapScheduler
from .policy import MitigationPolicy, Rule
from .regularizers import build_regularizers
from .report import MemorizationReport, ReportConfig


def _settings(obj: Any, config_cls: type) -> Any:
    """The ``config_cls`` part of a ``*Settings`` object (its own fields, without ``enabled``)."""
    return config_cls(**{f.name: getattr(obj, f.name) for f in fields(config_cls)})


@dataclass
class MonitorSettings(MonitorConfig):
    enabled: bool = True  # the memorization monitor (probe set, per-band signals every N steps)


@dataclass
class DashboardSettings(DashboardConfig):
    enabled: bool = True  # TensorBoard custom scalars, histograms, images, alarms, hparams


@dataclass
class ReportSettings(ReportConfig):
    enabled: bool = True  # report.md + summary.json at the end; mnemoguard_* metadata in the export


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
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    noise_gap: NoiseGapSettings = field(default_factory=NoiseGapSettings)
    policy: list[RuleSettings] = field(default_factory=list)
    default_policy: bool = False  # add default_policy()'s rule (needs the monitor with monitor.heldout_data)
    # name -> settings, e.g. {wen_filter: {threshold: 4.0}, iet_agc: {enabled: false}}; names are those of
    # mnemoguard.callbacks.REGULARIZERS, settings the fields of each one's config class.
    regularizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    early_stopping: EarlyStoppingSettings = field(default_factory=EarlyStoppingSettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    report: ReportSettings = field(default_factory=ReportSettings)


@dataclass
class DefaultPolicy:
    """The guard's default mitigation: rules, plus the settings of the actions they switch on (off until then)."""

    rules: list[RuleSettings]
    regularizers: dict[str, dict[str, Any]]  # name -> settings, with enabled: false (the rules turn them on)
    needs_noise_gap: bool  # a rule drives the noise-gap scheduler


def default_policy() -> DefaultPolicy:
    """The default rule, chosen on the testbed (docs/guard.md, "Defaults and the evidence behind them"): when the
    held-out − training probe-loss gap at low noise (``mem/probe_loss/band=low/contrast``, held-out image probes)
    stays at or above 0.1 for 2 checks, turn on IET-AGC's low-loss gating (drop the samples whose loss falls below
    the running mean of their timestep / 1.25, the authors' SD setting); below 0.08 for 2 checks, turn it off. The
    gating reads the training loss only: no extra forward pass, and its table is kept warm while it is off."""
    rule = RuleSettings(signal="mem/probe_loss/band=low/contrast", action="iet_agc", threshold=0.1, patience=2,
                        release_patience=2)
    return DefaultPolicy(rules=[rule], regularizers={"iet_agc": {"enabled": False}}, needs_noise_gap=False)


def build_guard_callbacks(cfg: GuardConfig) -> list[Callback]:
    """The callbacks the ``guard:`` section asks for, in the order they must run."""
    if not cfg.enabled:
        return []
    callbacks: list[Callback] = []
    monitor = MemorizationMonitor(_settings(cfg.monitor, MonitorConfig)) if cfg.monitor.enabled else None
    if monitor is not None:
        callbacks.append(monitor)
    settings, regularizers, noise_gap = list(cfg.policy), dict(cfg.regularizers), cfg.noise_gap.enabled
    if cfg.default_policy:
        if monitor is None or not cfg.monitor.heldout_data:
            raise ValueError("guard.default_policy reads mem/probe_loss/band=low/contrast, the loss gap between "
                             "held-out (image, caption) pairs and training pairs: it needs guard.monitor.enabled and "
                             f"guard.monitor.heldout_data, found enabled={cfg.monitor.enabled} and heldout_data="
                             f"{cfg.monitor.heldout_data!r}")
        default = default_policy()
        settings = [*default.rules, *settings]
        regularizers = {**default.regularizers, **regularizers}
        noise_gap = noise_gap or default.needs_noise_gap
    if settings:
        callbacks.append(MitigationPolicy([Rule(**vars(r)) for r in settings]))
    if noise_gap:
        callbacks.append(NoiseGapScheduler(_settings(cfg.noise_gap, NoiseGapConfig)))
    callbacks += build_regularizers(regularizers)
    es = cfg.early_stopping
    if es.enabled:
        if not es.monitor:
            raise ValueError("guard.early_stopping.enabled needs guard.early_stopping.monitor (a metric key)")
        callbacks.append(EarlyStopping(**{k: v for k, v in vars(es).items() if k != "enabled"}))
    if cfg.dashboard.enabled:
        callbacks.append(TensorBoardDashboard(_settings(cfg.dashboard, DashboardConfig), monitor=monitor))
    if cfg.report.enabled:
        callbacks.append(MemorizationReport(_settings(cfg.report, ReportConfig), monitor=monitor))
    return callbacks
