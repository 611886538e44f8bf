"""Mitigation policy: rules that turn actions on and off from memorization signals, with hysteresis.

A :class:`Rule` watches one metric key (``signal``, e.g. ``mem/score_gap/t=500`` — the band is part of the key, so
bands are never mixed) and acts only on *fresh* values (``state.is_fresh(signal)``; the metrics contract in
:mod:`mnemoguard.callbacks.base`), so a monitor that runs every N steps gives one check every N steps. Per rule:

* **on-level** — ``threshold`` (absolute) and/or ``rise_factor`` × the first value the rule measured. With both,
  both must hold (the on-level is the stricter of the two): the threshold is a floor, so a first value near zero
  cannot make a rise factor fire on noise.
* **patience** — the value must be beyond the on-level for this many consecutive checks before the action turns on.
* **release** — hysteresis: once on, the action turns off when the value is back on the other side of the release
  level for ``release_patience`` consecutive checks. Default release level: ``release_fraction`` of the on-level
  (for ``direction="above"``: ``on − (1 − release_fraction)·|on|``, i.e. 80 % of a positive on-level).
* ``direction="below"`` mirrors everything for signals where low means memorized (then ``rise_factor`` < 1 is the
  fraction the value must fall to).

Actions are registered by name, explicitly (the Guard's builder registers the noise-gap scheduler as ``noise_gap`` and
every regularizer under its registry name): objects with ``activate(strength=...)`` / ``deactivate()`` (a rule with a
``band`` calls ``activate(band=..., strength=...)``, as :class:`~mnemoguard.callbacks.noise_gap.NoiseGapScheduler`
takes), or callables ``fn(strength)`` where strength 0.0 turns the action off. A rule whose action is not registered
is an error at ``on_train_begin``. Several rules may drive one action: it is on while any of them is on, at the
largest strength among them (and that rule's band).

Every decision is an *alarm*: a dict ``{step, rule, signal, value, level, action, on, strength, message}`` appended
to :attr:`MitigationPolicy.alarms` (kept in ``state_dict``, so it survives resume and reaches the report). The
metrics are floats only: ``mem/alarm`` (the number of alarms so far) and ``mem/policy/<action>`` (the strength
applied, 0.0 when off), written at every check; the text lives in ``alarms``. Signals are reduced across ranks by
their producer, so every rank takes the same decisions.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

from ..config.guard import Rule
from .bands import as_band
from .base import Callback, TrainerControl, TrainerState

logger = logging.getLogger("mnemoguard")


@dataclass
class _RuleState:
    first: float | None = None
    on: bool = False
    count: int = 0  # consecutive checks towards the next transition (on while off, off while on)
    last_value: float | None = None
    last_step: int | None = None
    checks: int = 0


class MitigationPolicy(Callback):
    """Turns registered actions on and off from fresh signal values (see the module docstring).

    Args:
        rules: the rules, evaluated in order at every step where their signal is fresh.
        actions: name → action (an object with ``activate`` / ``deactivate``, or a callable ``fn(strength)``).
        verbose: log every alarm at INFO level (they are always kept in :attr:`alarms`).
    """

    def __init__(self, rules: list[Rule], actions: dict[str, Any] | None = None, verbose: bool = True) -> None:
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique (they key the saved state); duplicated: {dupes}")
        self.actions: dict[str, Any] = {}
        for name, action in (actions or {}).items():
            self.register_action(name, action)
        self.verbose = verbose
        self.rule_states = {r.name: _RuleState() for r in self.rules}
        self.applied: dict[str, dict[str, Any]] = {}  # action -> {"strength", "band", "rule"} while on
        self.alarms: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        self._reapply = False

    # -------------------------------------------------------------------------------- actions
    def register_action(self, name: str, action: Any) -> None:
        """Register ``action`` under ``name`` (replacing any earlier one)."""
        has_methods = callable(getattr(action, "activate", None)) and callable(getattr(action, "deactivate", None))
        if not has_methods and not callable(action):
            raise TypeError(f"action {name!r} must have activate()/deactivate() or be a callable fn(strength); found "
                            f"{type(action).__name__}")
        self.actions[name] = action

    def _check_actions(self) -> None:
        missing = sorted({r.action for r in self.rules if r.action not in self.actions})
        if missing:
            raise ValueError(f"MitigationPolicy rules use unregistered actions {missing}; registered: "
                             f"{sorted(self.actions)} (register_action(name, obj), or configure that action)")

    def _apply(self, name: str, strength: float, band: Any) -> None:
        action = self.actions[name]
        if hasattr(action, "activate") and hasattr(action, "deactivate"):
            if strength > 0:
                action.activate(**({"band": band} if band is not None else {}), strength=strength)
            else:
                action.deactivate()
        elif band is not None:
            action(strength, band=band)
        else:
            action(strength)

    # -------------------------------------------------------------------------------- hooks
    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        self._check_actions()

    def on_step_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                      **kwargs: Any) -> None:
        if self._reapply:  # after a resume, once every action is set up (on_train_begin has run for all)
            self._reapply_actions()

    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    logs: dict | None = None, **kwargs: Any) -> None:
        self.evaluate(state, control, logs)

    def on_train_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                     **kwargs: Any) -> None:
        for rule in self.rules:
            if self.rule_states[rule.name].checks == 0:
                state.warn(f"Policy rule {rule.name!r} never acted: its signal {rule.signal!r} was never produced "
                           "in this run")

    def evaluate(self, state: TrainerState, control: TrainerControl, logs: dict | None = None) -> list[dict]:
        """Feed every fresh signal to its rules; apply the resulting action changes; return the new alarms."""
        step = state.global_step
        new: list[dict[str, Any]] = []
        checked = False
        for rule in self.rules:
            rs = self.rule_states[rule.name]
            if not state.is_fresh(rule.signal) or rs.last_step == step:
                continue
            value = float(state.metrics[rule.signal])
            rs.last_step = step
            checked = True
            if not math.isfinite(value):
                if rule.name not in self._warned:
                    self._warned.add(rule.name)
                    warnings.warn(f"rule {rule.name!r}: {rule.signal} = {value} at step {step} is not finite; "
                                  "non-finite values are skipped", RuntimeWarning, stacklevel=2)
                continue
            alarm = self._step_rule(rule, rs, value, step)
            if alarm is not None:
                new.append(alarm)
        if new:
            self._update_actions(new)
            self.alarms.extend(new)
        if checked:
            self._follow_bands()
            for alarm in new:
                if self.verbose and state.is_world_process_zero:
                    logger.info("MitigationPolicy: %s", alarm["message"])
        if checked:
            values = {"mem/alarm": float(len(self.alarms))}
            values.update({f"mem/policy/{name}": float(self.applied.get(name, {}).get("strength", 0.0))
                           for name in sorted({r.action for r in self.rules})})
            state.update_metrics(values)
            if logs is not None:
                logs.update(values)
            if new:
                control.should_log = True
        return new

    def _step_rule(self, rule: Rule, rs: _RuleState, value: float, step: int) -> dict[str, Any] | None:
        if rs.first is None:
            rs.first = value
            if rule.rise_factor is not None and rule.threshold is None and value <= 0:
                warnings.warn(f"rule {rule.name!r}: first value {value} <= 0, so a rise factor does not move the "
                              "level past it; give a threshold as a floor", RuntimeWarning, stacklevel=3)
        rs.last_value, rs.checks = value, rs.checks + 1
        on_level, release_level = rule.levels(rs.first)
        if not rs.on:
            rs.count = rs.count + 1 if rule.beyond(value, on_level) else 0
            if rs.count < rule.patience:
                return None
            rs.on, rs.count, level = True, 0, on_level
        else:
            rs.count = rs.count + 1 if rule.beyond(release_level, value) else 0  # back past the release level
            if rs.count < rule.release_patience:
                return None
            rs.on, rs.count, level = False, 0, release_level
        side = ("above" if rule.direction == "above" else "below") if rs.on else \
            ("below" if rule.direction == "above" else "above")
        checks = rule.patience if rs.on else rule.release_patience
        message = (f"step {step}: {rule.signal} = {value:.6g} {side} {level:.6g} for {checks} check(s) -> "
                   f"{rule.action} {'on' if rs.on else 'off'} (rule {rule.name})")
        return {"step": step, "rule": rule.name, "signal": rule.signal, "value": value, "level": float(level),
                "action": rule.action, "on": rs.on, "strength": 0.0, "message": message}

    def _desired(self, name: str) -> dict[str, Any] | None:
        best: tuple[Rule, float] | None = None
        for rule in self.rules:
            if rule.action == name and self.rule_states[rule.name].on:
                strength = float(rule.strength() if callable(rule.strength) else rule.strength)
                if best is None or strength > best[1]:
                    best = (rule, strength)
        if best is None:
            return None
        rule, strength = best
        band = rule.band() if callable(rule.band) else rule.band
        if band is not None and getattr(band, "t_lo", 0) is None:  # an empty danger zone: the action takes its own
            band = None
        band = as_band(band) if band is not None else None
        return {"strength": strength, "band": list(band) if band is not None else None,
                "rule": rule.name}

    def _update_actions(self, alarms: list[dict[str, Any]]) -> None:
        self._check_actions()
        for name in dict.fromkeys(a["action"] for a in alarms):
            want = self._desired(name)
            if want != self.applied.get(name):
                if want is None:
                    self._apply(name, 0.0, None)
                    self.applied.pop(name, None)
                else:
                    self._apply(name, want["strength"], tuple(want["band"]) if want["band"] else None)
                    self.applied[name] = want
        for alarm in alarms:
            alarm["strength"] = float(self.applied.get(alarm["action"], {}).get("strength", 0.0))
            alarm["message"] += f", {alarm['action']} strength now {alarm['strength']:g}"

    def _follow_bands(self) -> None:
        """Actions on with a band or strength that moves (a rule whose band or strength is a callable, e.g. the
        danger-zone tracker's live ones): re-applied when what they would get now differs from the applied one."""
        for name, applied in list(self.applied.items()):
            rule = next((r for r in self.rules if r.name == applied["rule"]), None)
            if rule is None or not (callable(rule.band) or callable(rule.strength)):
                continue
            want = self._desired(name)
            if want is not None and want != applied:
                self._apply(name, want["strength"], tuple(want["band"]) if want["band"] else None)
                self.applied[name] = want

    def _reapply_actions(self) -> None:
        """After a resume: put the actions back in the state the checkpoint had (idempotent for stateful ones)."""
        for name, want in self.applied.items():
            if name in self.actions:
                self._apply(name, want["strength"], tuple(want["band"]) if want["band"] else None)
        self._reapply = False

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "rules": {name: vars(rs).copy() for name, rs in self.rule_states.items()},
            "applied": {k: dict(v) for k, v in self.applied.items()},
            "alarms": [dict(a) for a in self.alarms],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..serialization import check_keys

        check_keys(state, {"rules": dict, "applied": dict, "alarms": list}, "MitigationPolicy",
                   required=("rules", "applied", "alarms"))
        fields = {"first": (int, float, type(None)), "on": bool, "count": int, "last_value": (int, float, type(None)),
                  "last_step": (int, type(None)), "checks": int}
        for name, saved in state["rules"].items():
            check_keys(saved, fields, f"MitigationPolicy.rules[{name!r}]", required=tuple(fields))
        unknown = sorted(set(state["rules"]) - set(self.rule_states))
        if unknown:
            logger.warning("MitigationPolicy: the checkpoint has state for rules that are not configured now: %s",
                           unknown)
        for name, saved in state["rules"].items():
            if name in self.rule_states:
                self.rule_states[name] = _RuleState(**saved)
        self.applied = {k: dict(v) for k, v in state["applied"].items()}
        self.alarms = [dict(a) for a in state["alarms"]]
        self._reapply = True

