"""The danger-zone tables (issue 13) from ``mnemoguard bench`` runs with the tracker on.

    python scripts/summarize_danger_zone.py outputs/dz/digits/*_s? --out docs/bench --name digits

* **Where**: per run, the data prior's band, the tracker's live band at its last measurement, the σ up to which the
  at-risk probes still came back, beside the bench's own end-of-training per-noise-level memorization (planted
  images noised and denoised back, an independent implementation of the same protocol).
* **When**: the default stop rule (``guard.default_stop``: ``mem/danger_zone/copy_rate_lower`` above 0.05, rollback
  to the last check before; or the same level on the copy rate itself, the rule before issue 19) replayed with the
  real :class:`~mnemoguard.callbacks.early_stopping.EarlyStopping` on each unmitigated run's tracker curve, beside
  the oracle (first checkpoint with ≥ 5 % of the planted captions' generations copying at w = 1) and the step where
  the ground truth passes 10 %.
* **False alarms**: on runs without duplicated images (``testbed.duplicated.copies=1``): whether the live band
  turned on (the level the IET-AGC rule of the guard's former default policy acted at), whether the stop fired.
* **Cost**: the tracker's seconds (inside its hooks) as a share of the training time of the run.
"""

from __future__ import annotations

from typing import Any

from ..config.danger_zone import default_stop
from .mitigation_summary import early_stop_step
from .summary import onset_step

__all__ = ["cost_markdown", "false_alarm_markdown", "replay_band", "stop_markdown", "where_markdown"]

COPY_RATE = "mem/danger_zone/copy_rate"


def _tracker(run: dict[str, Any]) -> dict[str, Any]:
    """The run's tracker record, its band decisions replayed on the recorded return profiles with the tracker's
    current rule (the live decisions of a run are only for the arms that act on them)."""
    tracker = run.get("danger_zone_tracker")
    if not tracker or not tracker.get("history"):
        raise ValueError(f"run seed {run['seed']}: expected the danger-zone tracker's history in bench.json "
                         "(train.danger_zone=true), found none")
    return {**tracker, "history": replay_band(tracker)}


def replay_band(tracker: dict[str, Any], config: Any = None, num_train_timesteps: int = 1000
                ) -> list[dict[str, Any]]:
    """The band decisions (excess, active, band, strength) of :class:`DangerZoneTracker` replayed on recorded
    measurements (their profiles, the prior); the copy rate and the rest as recorded. ``num_train_timesteps``: the
    run's noise schedule (the bench's UNets train on 1,000 steps)."""
    from types import SimpleNamespace

    from ..callbacks.danger_zone import DangerZoneTracker, ReturnProfile

    replay = DangerZoneTracker(config, monitor=SimpleNamespace())
    replay.prior = tracker.get("prior")
    out = []
    for h in tracker["history"]:
        p = h["profile"]
        profile = ReturnProfile(p["timesteps"], p["sigmas"], p["rates"], p["counts"])
        entry = replay.decide(h["step"], profile, num_train_timesteps)
        out.append({**h, **{k: entry[k] for k in ("excess", "active", "band", "strength")}})
    return out


def _band(band: dict[str, Any] | None, sigma: tuple[str, str] = ("sigma_lo", "sigma_hi")) -> str:
    if not band or band.get("empty"):
        return "none"
    return f"σ {band[sigma[0]]:.2g}–{band[sigma[1]]:.2g}"


def _return_horizon(sigmas: list[float], rates: list[float], level: float = 0.5) -> str:
    """The largest σ from which at least ``level`` of the probes came back."""
    back = [s for s, r in zip(sigmas, rates) if r >= level]
    return f"{max(back):.2g}" if back else "none"


def where_markdown(runs: list[dict[str, Any]]) -> str:
    lines = ["| run | seed | data prior | live band (last) | at-risk return ≥ 50 % up to σ | bench: planted return "
             "≥ 50 % up to σ | bench: per σ (σ: planted / plain) |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        tracker = _tracker(run)
        last = tracker["history"][-1]
        prof = last["profile"]
        rates = prof["rates"].get("at_risk") or prof["rates"].get("train")
        dz = run.get("danger_zone")
        bench = per_sigma = "n/a"
        if dz:
            glob, plain = dz["memorization_rate"].get("global", []), dz["memorization_rate"].get("plain", [])
            bench = _return_horizon(dz["start_sigmas"], glob)
            per_sigma = ", ".join(f"{s:.2g}: {g:.2f}/{p:.2f}" for s, g, p in
                                  zip(dz["start_sigmas"], glob, plain or [float("nan")] * len(glob)))
        live = last["band"]
        live_txt = "off" if not live else f"t [{live['t_begin']}, {live['t_end']}) (σ {live['sigma_lo']:.2g}–" \
                                          f"{live['sigma_hi']:.2g})"
        lines.append(f"| {run['config']['train'].get('mitigation', 'none')} | {run['seed']} | "
                     f"{_band(tracker['prior']['band']) if tracker.get('prior') else 'n/a'} | {live_txt} | "
                     f"{_return_horizon(prof['sigmas'], rates)} | {bench} | {per_sigma} |")
    return "\n".join(lines)


def stop_markdown(runs: list[dict[str, Any]], thresholds: list[float] | None = None,
                  statistic: str = COPY_RATE) -> str:
    """Per unmitigated run: the oracle, and the stop (with its rollback) of the default rule at each threshold
    (default: the rule's own) on ``statistic`` (the copy rate, or its lower bound
    ``mem/danger_zone/copy_rate_lower``)."""
    levels = thresholds or [default_stop()["divergence_threshold"]]
    name = statistic.removeprefix("mem/danger_zone/").replace("_", " ")
    head = " | ".join(f"stop at {name} > {t:g} (rollback): within ±10 % and before 10 %?" for t in levels)
    lines = [f"| seed | oracle (5 %) | passes 10 % | band on at (steps before the oracle) | {head} | "
             "copy rate by measurement |", "|" + "---|" * (5 + len(levels))]
    for run in runs:
        oracle, ten = onset_step(run, 0.05), onset_step(run, 0.10)
        history = _tracker(run)["history"]
        on = next((h["step"] for h in history if h["active"]), None)
        lead = "never" if on is None else f"{on} ({oracle - on})" if oracle is not None else f"{on} (no onset)"
        cells = []
        for level in levels:
            stop, back = early_stop_step(run["monitor"], statistic, level, rollback="last_good")
            if stop is None:
                cells.append("no stop")
            elif oracle is None:
                cells.append(f"{stop} ({back}): no onset")
            else:
                ok = abs(stop - oracle) <= 0.1 * oracle and (ten is None or stop < ten)
                cells.append(f"{stop} ({back}): {stop / oracle - 1:+.0%}, {'yes' if ok else 'no'}")
        curve = ", ".join(f"{h['step']}: {h['copy_rate']:.2f}" for h in history)
        lines.append(f"| {run['seed']} | {oracle} | {ten} | {lead} | {' | '.join(cells)} | {curve} |")
    return "\n".join(lines)


def false_alarm_markdown(runs: list[dict[str, Any]], statistic: str = COPY_RATE) -> str:
    """Per clean run: whether the live band turned on and whether the default stop's level on ``statistic`` fired."""
    name = statistic.removeprefix("mem/danger_zone/").replace("_", " ")
    lines = [f"| seed | live band turned on | stop ({name} > 0.05) | largest excess | largest copy rate | ground "
             "truth at the end (w=1) |", "|---|---|---|---|---|---|"]
    rule = default_stop()
    for run in runs:
        history = _tracker(run)["history"]
        on = next((h["step"] for h in history if h["active"]), None)
        stop, _ = early_stop_step(run["monitor"], statistic, rule["divergence_threshold"], rollback="last_good")
        gt = run["checkpoints"][-1]["ground_truth"]["w=1"]["planted"]["memorized_fraction"]["fraction"]
        lines.append(f"| {run['seed']} | {on or 'no'} | {stop or 'no'} | "
                     f"{max(h['excess'] for h in history):.2f} | {max(h['copy_rate'] for h in history):.2f} | "
                     f"{100 * gt:.1f} % |")
    return "\n".join(lines)


def cost_markdown(runs: list[dict[str, Any]]) -> str:
    lines = ["| run | seed | measurements | tracker s (prior + live) | training s | share |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        t = run["timing"]
        spent = t.get("danger_zone_prior", 0.0) + t.get("danger_zone_measure", 0.0)
        lines.append(f"| {run['config']['train'].get('mitigation', 'none')} | {run['seed']} | "
                     f"{len(_tracker(run)['history'])} | {spent:.1f} | {t['training']:.0f} | "
                     f"{100 * spent / t['training']:.1f} % |")
    return "\n".join(lines)
