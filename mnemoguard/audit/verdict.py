"""From per-checkpoint measurements to the live guard's verdicts and the checkpoint to keep.

The measurements are replayed in step order through the danger-zone tracker's own decision
(:meth:`~mnemoguard.callbacks.danger_zone.DangerZoneTracker.decide`: the band's hysteresis at the σ the data prior
says the sampler visits), and each checkpoint gets the verdict the live guard's default rules would give:

* ``copying``: the copy rate is above the default stop rule's threshold (``default_stop()``: more than 5 % of the
  generations from the at-risk captions copy their training image; the level the audit's figures were measured
  with, on its 32 generations: the live stop watches the rate's lower bound on fewer generations) — stop here;
* ``rising``: the danger-zone band is on (the at-risk images come back at least ``on_level`` more often than
  held-out ones; the trigger of a policy rule on ``mem/danger_zone/excess``) — memorization is under way;
* ``ok`` otherwise.

The recommended checkpoint is the last one before the first ``copying`` (none when the first already copies; the
last one when none does).
"""

from __future__ import annotations

import math
from typing import Any

from ..callbacks.danger_zone.measure import ReturnProfile
from ..config.danger_zone import default_stop

__all__ = ["recommended", "replay", "verdict_of"]


def verdict_of(copy_rate: float, active: bool, threshold: float | None = None) -> str:
    """``copying`` / ``rising`` / ``ok`` (module docstring)."""
    limit = default_stop()["divergence_threshold"] if threshold is None else threshold
    if math.isfinite(copy_rate) and copy_rate > limit:
        return "copying"
    return "rising" if active else "ok"


def replay(tracker: Any, results: list[dict[str, Any]], num_train_timesteps: int) -> list[dict[str, Any]]:
    """Per result (sorted by step): the tracker's decision on its profile, in order from a fresh band, and the
    verdict. The tracker's band state is left as after the last one."""
    tracker.reset_band()
    out = []
    for r in sorted(results, key=lambda r: r["step"]):
        entry = tracker.decide(r["step"], ReturnProfile(**r["profile"]), num_train_timesteps)
        out.append({**r, "excess": entry["excess"], "active": entry["active"], "band": entry["band"],
                    "verdict": verdict_of(r["copy_rate"], entry["active"])})
    return out


def recommended(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row to keep (module docstring) among ``rows`` sorted by step; None when the first already copies."""
    keep = None
    for r in rows:
        if r["verdict"] == "copying":
            return keep
        keep = r
    return keep
