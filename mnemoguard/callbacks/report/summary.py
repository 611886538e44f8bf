"""The report's JSON summary: what the run did and saw, in plain types."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from ...serialization import to_jsonable
from ..base import TrainerState
from ..watched import signal_levels, watched_signals
from .verdicts import overall_verdict

logger = logging.getLogger("mnemoguard")

__all__ = ["build_summary"]


def build_summary(state: TrainerState, verdicts: list[dict[str, Any]], monitor: Any = None, policy: Any = None,
                  stoppers: Any = (), loss_flags: Any = None, extras: Any = (), final_dir: Any = None,
                  exported: dict[str, Any] | None = None, last_verdicts: list[dict[str, Any]] | None = None,
                  status: str = "complete", danger_zone: Any = None) -> dict[str, Any]:
    """The JSON summary of a run: its status, the verdict about the exported weights (``verdicts``: per probe, from
    the check of those weights) next to what the run saw at its last step (``last_verdicts``), curves, alarms,
    actions, early stopping, the monitor's settings and checks, the low-loss flags, the probe generations, warnings,
    the watched signals with their levels, and ``report_summary()`` of ``extras``; plain types only (non-finite
    numbers as None)."""
    curves: dict[str, list[list[float]]] = {}
    for row in state.log_history:
        step = row.get("step")
        for tag, value in row.items():
            if tag == "step" or not (tag.startswith("mem/") or tag.startswith("val/") or tag == "train/loss"):
                continue
            curves.setdefault(tag, []).append([int(step), float(value)])
    alarms = list(policy.alarms) if policy is not None else []
    actions = {k: dict(v) for k, v in policy.applied.items()} if policy is not None else {}
    stopping = [{"monitor": es.monitor, "stopped_step": es.stopped_step, "best_step": es.best_step,
                 "best_score": es.best_score, "stop_reason": es.stop_reason} for es in stoppers]
    watched = watched_signals(policy, list(stoppers), danger_zone)
    levels = signal_levels(policy, list(stoppers), danger_zone)
    callbacks = {}
    for cb in extras:
        try:
            callbacks[cb.state_key] = cb.report_summary()
        except Exception as err:  # a summary must never lose the report
            logger.warning("MemorizationReport: %s.report_summary() failed: %s", type(cb).__name__, err)
    summary: dict[str, Any] = {
        "run": {
            "global_step": int(state.global_step), "max_steps": int(state.max_steps),
            "stopped": bool(state.stop_reason), "stop_step": int(state.global_step) if state.stop_reason else None,
            "stop_reason": state.stop_reason, "best_step": state.best_step, "best_metric": state.best_metric,
            "best_checkpoint": state.best_checkpoint, "exported": None if final_dir is None else str(final_dir),
            "nonfinite_steps": state.nonfinite_steps, "diverged_step": state.diverged_step,
            "finite_checkpoint": state.finite_checkpoint,
        },
        "status": status,
        "verdict": "diverged" if state.diverged_step is not None else overall_verdict(verdicts),
        "exported": {**(exported or {"source": "last", "step": int(state.global_step)}),
                     "verdict": overall_verdict(verdicts)},
        "last_step": {"step": int(state.global_step),
                      "verdict": overall_verdict(verdicts if last_verdicts is None else last_verdicts)},
        "warnings": list(state.warnings),
        "curves": curves,
        "watched": [{"signal": sig, "by": who, "levels": dict(levels.get(sig, []))} for sig, who in watched],
        "alarms": alarms,
        "actions": actions,
        "early_stopping": stopping,
        "verdicts": verdicts,
        "callbacks": callbacks,
        "loss_flags": None if loss_flags is None else {
            "rows_known": bool(loss_flags.row_counts is not None and loss_flags.row_counts.shape[1]
                               and loss_flags.row_counts[1].sum()),
            "flagged_rows": len(loss_flags.flagged_rows()), "top": loss_flags.flagged_rows(top=20)},
    }
    if danger_zone is not None:
        summary["danger_zone"] = {
            "prior": None if danger_zone.prior is None else {
                k: danger_zone.prior[k] for k in ("band", "rows", "distinct", "population")},
            "measurements": [{k: h[k] for k in ("step", "excess", "copy_rate", "heldout_copy_rate", "active", "band",
                                                "strength")} for h in danger_zone.history],
            "active": danger_zone.active,
        }
    if monitor is not None:
        live = monitor.training_history
        last = live[-1] if live else None
        end = monitor.history[-1] if monitor.history and "weights" in monitor.history[-1] else None
        summary["monitor"] = {
            "config": asdict(monitor.config), "bands": {k: list(v) for k, v in monitor.bands.items()},
            "band_sigmas": {k: [getattr(v, "sigma_lo", None), getattr(v, "sigma_hi", None)]
                            for k, v in monitor.bands.items()},
            "signals": monitor.signal_names, "splits": monitor.splits, "checks": len(live),
            "caveats": monitor.contrast_caveats(),
            "probes": monitor.probes(), "probe_sets": monitor.probe_sets,
            "last_check": None if last is None else {"step": last["step"], "metrics": dict(last["metrics"])},
            "exported_check": None if end is None else {"weights": end["weights"], "metrics": dict(end["metrics"])},
        }
        vis = monitor.latest_visuals
        if vis is not None:
            summary["monitor"]["generations"] = {
                "step": vis.get("step"), "captions": vis["captions"], "nn_ratio": vis["nn_ratio"],
                "nearest_is_own": vis["nearest_is_own"], "nearest_rows": vis.get("nearest_rows", []),
                "curvature": vis["curvature"]}
    return to_jsonable(summary)
