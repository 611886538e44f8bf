"""Per-probe verdicts of the report.

Per training probe (held-out probes are the reference):

- ``memorized``: its last generation's nearest training image is its own and Gu et al.'s ratio ``d1/d2`` is below
  ``nn_ratio_threshold`` (1/3): output-space evidence of a copy;
- ``suspect``: the per-step low-loss flags flagged its row at least ``min_flags`` times, or at the last check, in
  some band, its live-vs-baseline or Wen gap exceeds ``heldout_factor`` × the largest held-out value, or its probe
  loss is below the smallest held-out loss / ``heldout_factor``;
- ``ok`` otherwise. The run's verdict is the worst probe verdict (``unknown`` without a check), or ``diverged`` when
  the run stopped on a non-finite loss or gradient.
"""

from __future__ import annotations

import math
from typing import Any

from ...config.guard import ReportConfig

__all__ = ["VERDICT_RANK", "overall_verdict", "probe_verdicts"]

VERDICT_RANK = {"unknown": -1, "ok": 0, "suspect": 1, "memorized": 2, "diverged": 3}


def probe_verdicts(monitor: Any, config: ReportConfig | None = None, loss_flags: Any = None,
                   entry: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per probe: ``{"id", "split", "kind", "index", "caption", "verdict", "reasons", "flags", "seen", "nn_ratio",
    "values": {signal: {band: value}}}`` (see the module docstring for the rules), from the check ``entry`` (default:
    the last check of the live weights; an end check of exported weights gives their verdicts, with their own
    generations); ``flags`` / ``seen``: how often the per-step low-loss flags flagged the probe's row, out of how
    often it was trained on (None without the rows: ``before_forward`` got no ``indices``)."""
    config = config or ReportConfig()
    if monitor is None or not monitor.probes():
        return []
    live = [h for h in monitor.history if "weights" not in h]
    last = entry if entry is not None else (live[-1] if live else None)
    visual: dict[int, tuple[float, bool]] = {}
    sources = [last] if last is not None and "weights" in last else live
    for check in sources:
        v = check.get("visual")
        if v:
            for pid, ratio, own in zip(v["probe_ids"], v["nn_ratio"], v["nearest_is_own"]):
                visual[pid] = (float(ratio), bool(own))
    out = []
    train_ids = [p["id"] for p in monitor.probes() if p["split"] == "train"]
    P = len(train_ids)
    for probe in monitor.probes():
        pid, reasons = probe["id"], []
        values: dict[str, dict[str, float]] = {}
        if last is not None:
            for sig, bands in last["per_probe"].items():
                for band, groups in bands.items():
                    vals = groups.get(probe["split"], [])
                    j = pid if probe["split"] == "train" else pid - P
                    if 0 <= j < len(vals):
                        values.setdefault(sig, {})[band] = float(vals[j])
        flags, seen = _row_flags(loss_flags, probe)
        ratio, own = visual.get(pid, (None, None))
        if probe["split"] != "train":
            verdict = "held-out"
        else:
            verdict = "ok"
            if ratio is not None and own and ratio < config.nn_ratio_threshold:
                verdict = "memorized"
                reasons.append(f"its generation copies its training image (d1/d2 = {ratio:.3f} < "
                               f"{config.nn_ratio_threshold:.3f})")
            if flags is not None and flags >= config.min_flags:
                reasons.append(f"the per-step loss flagged it {flags} of the {seen} times it was trained on")
            if last is not None and monitor.has_heldout:
                reasons += _heldout_reasons(last, pid, monitor, config)
            if verdict == "ok" and reasons:
                verdict = "suspect"
        out.append({**probe, "verdict": verdict, "reasons": reasons, "flags": flags, "seen": seen, "nn_ratio": ratio,
                    "values": values})
    return out


def _heldout_reasons(entry: dict[str, Any], pid: int, monitor: Any, config: ReportConfig) -> list[str]:
    reasons = []
    f = config.heldout_factor
    for sig, bands in entry["per_probe"].items():
        kind = "loss" if sig == "probe_loss" else ("gap" if sig.startswith("live_vs_") or sig == "wen_gap" else None)
        if kind is None:
            continue
        for band, groups in bands.items():
            held = [v for v in groups.get("heldout", []) if math.isfinite(v)]
            vals = groups.get("train", [])
            if not held or pid >= len(vals) or not math.isfinite(vals[pid]):
                continue
            v = vals[pid]
            if kind == "gap" and max(held) > 0 and v > f * max(held):
                reasons.append(f"{sig} in band {band} = {v:.4g} > {f:g} x held-out max {max(held):.4g}")
            if kind == "loss" and min(held) > 0 and v < min(held) / f:
                reasons.append(f"{sig} in band {band} = {v:.4g} < held-out min {min(held):.4g} / {f:g}")
    return reasons


def overall_verdict(verdicts: list[dict[str, Any]]) -> str:
    """The worst training-probe verdict: ``memorized`` > ``suspect`` > ``ok``; ``unknown`` without probes."""
    ranks = [v["verdict"] for v in verdicts if v["verdict"] in VERDICT_RANK]
    return max(ranks, key=VERDICT_RANK.get) if ranks else "unknown"


def _row_flags(loss_flags: Any, probe: dict[str, Any]) -> tuple[int | None, int | None]:
    counts = getattr(loss_flags, "row_counts", None)
    if probe["split"] != "train" or counts is None or not counts.shape[1] or not counts[1].sum():
        return None, None
    row = int(probe["index"])
    return int(counts[0, row]), int(counts[1, row])
