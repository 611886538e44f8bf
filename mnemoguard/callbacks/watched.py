"""What the guard's decisions watch, and the levels they compare against: one answer for the dashboard and the
report, read from the policy's rules and early stopping's settings."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["signal_levels", "watched_signals"]


def watched_signals(policy: Any, stoppers: list[Any]) -> list[tuple[str, str]]:
    """``[(signal, who)]``: the signals the policy's rules and early stopping watch, in that order, no repeats."""
    out: dict[str, str] = {}
    for rule in getattr(policy, "rules", []):
        out.setdefault(rule.signal, f"rule {rule.name}")
    for es in stoppers:
        out.setdefault(es.monitor, f"early stopping ({es.mode})")
    return list(out.items())


def signal_levels(policy: Any, stoppers: list[Any]) -> dict[str, list[tuple[str, float]]]:
    """``{signal: [(name, value)]}`` at this moment: each rule's on-level (``threshold``) and ``release`` level (a rule
    with only a rise factor has them once it measured its first value), early stopping's ``best`` value so far, its
    ``stopping_threshold`` (``threshold``) and ``divergence_threshold`` (``divergence``)."""
    levels: dict[str, list[tuple[str, float]]] = {}
    for rule in getattr(policy, "rules", []):
        first = policy.rule_states[rule.name].first
        if rule.threshold is not None or first is not None:
            on, off = rule.levels(first)
            levels.setdefault(rule.signal, []).extend([("threshold", float(on)), ("release", float(off))])
    for es in stoppers:
        if math.isfinite(es.best_score):
            levels.setdefault(es.monitor, []).append(("best", float(es.best_score)))
        for name, value in (("threshold", es.stopping_threshold), ("divergence", es.divergence_threshold)):
            if value is not None:
                levels.setdefault(es.monitor, []).append((name, float(value)))
    return levels
