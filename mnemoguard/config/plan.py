"""Which components a ``guard:`` section runs, decided once (no torch).

:func:`plan_components` is read by the builder (:func:`mnemoguard.guard.build.build_components`) and by the tag list
the config checks use (:func:`mnemoguard.config.checks.guard_tags`), so what is built and what is promised to a rule
or to early stopping can never disagree. The danger-zone tracker reaches the noise gap by one route: a policy rule
(``band: danger_zone``, ``strength: danger_zone``); ``noise_gap.follow_danger_zone`` is that rule written for you
(:func:`follow_danger_zone_rule`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .danger_zone import default_stop
from .guard import EarlyStoppingSettings, GuardConfig, Rule, default_policy

__all__ = ["ComponentPlan", "follow_danger_zone_rule", "plan_components"]


def follow_danger_zone_rule() -> Rule:
    """``noise_gap.follow_danger_zone: true`` as a rule: while the tracker's band is on (``mem/danger_zone/active``
    is 1), gap its live band at its strength (``min(max_strength, excess)``); off when the tracker turns the band
    off. The tracker's own hysteresis decides both, so the rule has none of its own."""
    return Rule(signal="mem/danger_zone/active", action="noise_gap", threshold=0.5, release=0.5, band="danger_zone",
                strength="danger_zone", name="noise_gap<-danger_zone")


@dataclass(frozen=True)
class ComponentPlan:
    """What runs: each component on or off, the policy's rules and the regularizers' settings (the default policy's
    and ``follow_danger_zone``'s included), the early stopping that runs."""

    loss_flags: bool = False
    monitor: bool = False
    danger_zone: bool = False
    noise_gap: bool = False
    rules: list[Rule] = field(default_factory=list)
    regularizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    early_stopping: EarlyStoppingSettings = field(default_factory=EarlyStoppingSettings)
    dashboard: bool = False
    report: bool = False


def plan_components(cfg: GuardConfig) -> ComponentPlan:
    """The :class:`ComponentPlan` of ``cfg`` (module docstring)."""
    if not cfg.enabled:
        return ComponentPlan()
    rules, regularizers = list(cfg.policy), dict(cfg.regularizers)
    if cfg.noise_gap.follow_danger_zone:
        rules.append(follow_danger_zone_rule())
    if cfg.default_policy:
        default = default_policy()
        rules = [*default.rules, *rules]
        regularizers = {**default.regularizers, **regularizers}
    tracker = cfg.monitor.enabled and (cfg.danger_zone.enabled or cfg.default_stop)
    stopping = EarlyStoppingSettings(**default_stop()) if cfg.default_stop else cfg.early_stopping
    return ComponentPlan(
        loss_flags=True, monitor=cfg.monitor.enabled, danger_zone=tracker,
        noise_gap=cfg.noise_gap.enabled or any(r.action == "noise_gap" for r in rules), rules=rules,
        regularizers=regularizers, early_stopping=stopping, dashboard=cfg.dashboard.enabled,
        report=cfg.report.enabled)
