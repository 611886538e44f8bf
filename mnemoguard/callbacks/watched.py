"""What the guard's decisions watch, and the levels they compare against: one answer for the dashboard and the
report, read from the policy's rules and early stopping's settings."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DANGER_ZONE_SIGNAL", "signal_levels", "watched_signals"]


DANGER_ZONE_SIGNAL = "mem/danger_zone/excess"


def watched_signals(policy: Any, stoppers: list[Any], tracker: Any = None) -> list[tuple[str, str]]:
    """``[(signal, who)]``: the signals the danger-zone tracker's band, the policy's rules and early stopping watch,
    in that order, each once with everyone who watches it."""
    out: dict[str, list[str]] = {}
    if tracker is not None:
        out[DANGER_ZONE_SIGNAL] = ["the danger-zone band"]
    for rule in getattr(policy, "rules", []):
        out.setdefault(rule.signal, []).append(f"rule {rule.name}")
    for es in stoppers:
        out.setdefault(es.monitor, []).append(f"early stopping ({es.mode})")
    return [(signal, ", ".join(who)) for signal, who in out.items()]


def signal_levels(policy: Any, stoppers: list[Any], tracker: Any = None) -> dict[str, list[tuple[str, float]]]:
    """``{signal: [(name, value)]}`` at this moment: each rule's on-level (``threshold``) and ``release`` level (a rule
    with only a rise factor has them once it measured its first value), the tracker's ``on_level`` and
    ``release_level``, early stopping's ``best`` value so far, its ``stopping_threshold`` (``threshold``) and
    ``divergence_threshold`` (``divergence``). A level two watchers share (the band's and the default policy's
    on-level) is listed once."""
    levels: dict[str, list[tuple[str, float]]] = {}
    if tracker is not None:
        levels[DANGER_ZONE_SIGNAL] = [("threshold", float(tracker.config.on_level)),
                                      ("release", float(tracker.config.release_level))]
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
    return {signal: list(dict.fromkeys(pairs)) for signal, pairs in levels.items()}
