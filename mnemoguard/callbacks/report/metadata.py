"""The memorization summary written into the exported weights' safetensors metadata (``mnemoguard_*`` keys, all
strings, kohya's ``ss_*`` convention)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..base import TrainerState
from .verdicts import overall_verdict, probe_verdicts

__all__ = ["exported_weight_files", "memorization_metadata", "stamp_safetensors"]


def memorization_metadata(state: TrainerState, monitor: Any = None, policy: Any = None,
                          verdicts: list[dict[str, Any]] | None = None, loss_flags: Any = None,
                          summary: dict[str, Any] | None = None) -> dict[str, str]:
    """``mnemoguard_*`` metadata for the exported safetensors (every value a string, kohya's ``ss_*`` style): which
    weights they are (``mnemoguard_exported_source`` / ``_step``) and the verdict about them, next to the run's last
    step.

    Args:
        state: the run's state (steps, stop, best step).
        monitor, policy, loss_flags: the guard's components (None when absent).
        verdicts: from :func:`~.verdicts.probe_verdicts` of the exported weights (computed when omitted).
        summary: the report's summary (status, exported weights, last step); without it the export is taken to be
            the last weights.
    """
    from ... import __version__

    if verdicts is None:
        verdicts = probe_verdicts(monitor, loss_flags=loss_flags)
    alarms = list(policy.alarms) if policy is not None else []
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
    stopped = bool(state.stop_reason)
    meta = {
        "mnemoguard_version": str(__version__),
        "mnemoguard_global_step": str(int(state.global_step)),
        "mnemoguard_stop_step": str(int(state.global_step)) if stopped else "none",
        "mnemoguard_stop_reason": str(state.stop_reason or "none"),
        "mnemoguard_best_step": "none" if state.best_step is None else str(int(state.best_step)),
        "mnemoguard_verdict": summary["verdict"] if summary else overall_verdict(verdicts),
        "mnemoguard_exported_source": str((summary or {}).get("exported", {}).get("source", "last")),
        "mnemoguard_exported_step": str((summary or {}).get("exported", {}).get("step", int(state.global_step))),
        "mnemoguard_last_step_verdict": str((summary or {}).get("last_step", {}).get("verdict",
                                                                                      overall_verdict(verdicts))),
        "mnemoguard_probe_verdicts": json.dumps(counts, sort_keys=True),
        "mnemoguard_alarms": str(len(alarms)),
        "mnemoguard_actions": json.dumps([{"step": a.get("step"), "action": a.get("action"), "on": a.get("on")}
                                          for a in alarms]),
    }
    if monitor is not None:
        meta["mnemoguard_baseline"] = str(monitor.config.baseline)
        meta["mnemoguard_bands"] = json.dumps({k: list(v) for k, v in monitor.bands.items()})
        meta["mnemoguard_checks"] = str(len(monitor.training_history))
        if monitor.history:
            last = monitor.history[-1]  # the check of the exported weights when there was one
            meta["mnemoguard_last_check_step"] = str(int(last["step"]))
            meta["mnemoguard_signals"] = json.dumps(
                {k: round(float(v), 6) for k, v in last["metrics"].items() if not k.endswith("_std")}, sort_keys=True)
    if loss_flags is not None and loss_flags.flagged_rows():
        meta["mnemoguard_flagged_samples"] = str(len(loss_flags.flagged_rows()))
    return meta


def stamp_safetensors(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Rewrite a ``.safetensors`` file with ``metadata`` merged into its header metadata (existing keys such as
    ``format`` are kept; ``metadata`` wins on a clash). Written to a temporary file, then renamed into place."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(path)
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; found {bad}")
    with safe_open(str(path), framework="pt") as f:
        old = dict(f.metadata() or {})
    tensors = load_file(str(path))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={**old, **metadata})
    os.replace(tmp, path)


def exported_weight_files(final_dir: str | os.PathLike) -> list[Path]:
    """The fine-tuned weights of an export: its top-level ``*.safetensors`` (a LoRA file) and ``unet/*.safetensors``
    (a full model; the frozen text encoder and VAE are left alone)."""
    root = Path(final_dir)
    return sorted([*root.glob("*.safetensors"), *(root / "unet").glob("*.safetensors")])
