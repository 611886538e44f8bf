"""MemorizationReport: the end-of-run report, its JSON summary, and the memorization metadata of the export.

At ``on_train_end``, on the main process, it writes into ``<output_dir>/report/``: ``summary.json`` (the run, the
monitor's settings, bands and probes, every logged ``mem/...``, ``train/loss`` and ``val/...`` curve, the alarms and
actions, early-stopping outcomes, the low-loss flags, the last probe generations, per-probe verdicts), ``report.md``
with PNG plots, and, with ``stamp_export``, :func:`~.metadata.memorization_metadata` in the exported weights'
safetensors metadata (``Guard.end(final_dir=...)``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...config.guard import ReportConfig
from ..base import Callback, TrainerControl, TrainerState
from .markdown import render_markdown
from .metadata import exported_weight_files, memorization_metadata, stamp_safetensors
from .plots import write_plots
from .summary import build_summary
from .verdicts import probe_verdicts

logger = logging.getLogger("mnemoguard")

__all__ = ["MemorizationReport"]


class MemorizationReport(Callback):
    """Writes ``report/report.md`` (+ PNG plots) and ``report/summary.json`` at the end of training, and stamps the
    exported weights (module docstring).

    Args:
        config: the settings; keyword arguments override its fields.
        monitor, policy, loss_flags: the guard's components to report on (None when absent).
        stoppers: the early-stopping callbacks.
        extras: callbacks with a ``report_summary()``, reported under their state key.
        danger_zone: the :class:`~mnemoguard.callbacks.danger_zone.DangerZoneTracker` (its prior, live band and
            figure), or None.
    """

    def __init__(self, config: ReportConfig | None = None, monitor: Any = None, policy: Any = None,
                 loss_flags: Any = None, stoppers: Any = (), extras: Any = (), danger_zone: Any = None,
                 **overrides: Any) -> None:
        self.config = replace(config or ReportConfig(), **overrides)
        self.monitor, self.policy, self.loss_flags = monitor, policy, loss_flags
        self.danger_zone = danger_zone
        self.stoppers, self.extras = list(stoppers), list(extras)
        self.directory: Path | None = None
        self.summary: dict[str, Any] | None = None

    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    **kwargs: Any) -> None:
        """After each check, an interim report (no plots, marked in progress): a run that crashes or is killed still
        leaves one."""
        mon = self.monitor
        if mon is not None and mon.last_check_step == state.global_step and context is not None \
                and context.is_main_process and context.output_dir is not None:
            self.write(state, context.output_dir, status=f"in progress (step {state.global_step})", plots=False)

    def on_train_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                     **kwargs: Any) -> None:
        if context is None or not context.is_main_process:
            return
        if context.output_dir is None:
            raise ValueError("MemorizationReport: the run has no output directory (Guard(output_dir=...))")
        error = getattr(context, "error", None)
        status = f"failed at step {state.global_step}: {error}" if error else "complete"
        self.write(state, context.output_dir, final_dir=context.final_dir, exported=context.exported, status=status)

    def write(self, state: TrainerState, output_dir: str | Path, final_dir: str | Path | None = None,
              exported: dict[str, Any] | None = None, status: str = "complete", plots: bool = True) -> Path:
        """Write the report into ``output_dir/<directory>``; returns that folder. The verdict is about the exported
        weights (the monitor's check of them, when ``Guard.end`` ran one), next to what the run saw at its last
        step."""
        directory = Path(output_dir) / self.config.directory
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        end = self.monitor.history[-1] if self.monitor is not None and self.monitor.history else None
        end = end if end is not None and "weights" in end else None
        verdicts = probe_verdicts(self.monitor, self.config, self.loss_flags, entry=end)
        last = probe_verdicts(self.monitor, self.config, self.loss_flags) if end is not None else verdicts
        summary = build_summary(state, verdicts, self.monitor, self.policy, self.stoppers, self.loss_flags,
                                self.extras, final_dir, exported, last, status, danger_zone=self.danger_zone)
        figures: dict[str, str] = {}
        if self.config.plots and plots:
            try:
                figures = write_plots(directory, summary, self.monitor, self.config.nn_ratio_threshold)
                if self.danger_zone is not None:
                    from ..danger_zone.plot import danger_zone_figure

                    tracker = self.danger_zone
                    fig = danger_zone_figure(tracker.prior, tracker.history[-1] if tracker.history else None)
                    if fig is not None:
                        fig.savefig(directory / "danger_zone.png", dpi=100)
                        figures["danger_zone"] = "danger_zone.png"
            except Exception as err:  # a plot must never lose the report
                logger.warning("MemorizationReport: plotting failed (%s); writing the report without plots", err)
        summary["plots"] = sorted(figures.values())
        (directory / "summary.json").write_text(json.dumps(summary, indent=2))
        (directory / "report.md").write_text(render_markdown(summary, figures))
        self.summary = summary
        if self.config.stamp_export and final_dir is not None:
            meta = memorization_metadata(state, self.monitor, self.policy, verdicts, self.loss_flags, summary)
            meta["mnemoguard_report"] = str(Path(self.config.directory) / "report.md")
            for path in exported_weight_files(final_dir):
                stamp_safetensors(path, meta)
        return directory
