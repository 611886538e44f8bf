"""TensorBoardDashboard: a TensorBoard view that opens on the verdict.

It writes with the raw ``SummaryWriter`` of accelerate's TensorBoard tracker
(``accelerator.get_tracker("tensorboard", unwrap=True)``), on the main process only, and does nothing when TensorBoard
is off (``logging.report_to: none``). The flat ``mem/...`` scalars are logged by the Guard (the metrics contract);
the dashboard arranges them so that a user looks rather than reads:

- **the verdict first** (the ``guard/`` group, first in TensorBoard's Time Series and in Custom Scalars): every signal
  a policy rule or early stopping watches, as ``guard/<signal>``, with its on-level, release level and early
  stopping's best value and thresholds drawn beside it as lines of their own (the sub-runs ``threshold``, ``release``,
  ``best`` and ``divergence``: TensorBoard colours and names lines by run); ``guard/alarm`` (1 while a rule is
  on), ``guard/action/<name>`` (the strength applied) and ``guard/stop`` (1 from the step the run stops), written at
  every optimizer step so they draw as steps, not ramps between checks;
- **bands told apart**: every logged ``.../band=<b>/...`` scalar is also written without the band into the sub-run
  ``band=<b>`` (``mem/probe_loss/contrast`` shows one coloured line per band, named in the legend), next to the
  per-band cards;
- **one custom-scalars layout**: the verdict, then each signal by band (watched signals first; the contrasts known to
  run negative are named so in their chart titles), the loss flags, the generations, the schedule, the loss;
- **probe panels**: at curvature checks, a labelled figure (caption, d1/d2 and whether it is a copy, step) of
  ``generation | nearest training image | curvature-difference map`` per generated probe, small images enlarged;
- **histograms** of the per-probe values at each check and of the per-sample loss-flag counts; **alarm text**;
- **hparams** in the training run itself (no extra run): written at the first step with the watched tags as its
  metrics, its end status at the end. Nothing is written as ``hparam/*`` scalars.

A resumed run appends to the same runs (the sub-runs purge what the checkpoint had not reached, as the trainer's
tracker does). Register it after the monitor, the policy and early stopping. Its counters are in ``state_dict``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from typing import Any

import numpy as np

from ..config.guard import DashboardConfig
from .base import Callback, TrainerControl, TrainerState
from .panels import figure_to_array, probe_figure
from .watched import signal_levels, watched_signals

logger = logging.getLogger("mnemoguard")

_BAND = re.compile(r"/band=([^/]+)")


def _exact(tag: str) -> str:
    """Custom-scalar multiline charts take regexes: match ``tag`` exactly."""
    return f"^{re.escape(tag)}$"


def verdict_tag(signal: str) -> str:
    """The ``guard/`` copy of a watched signal: ``mem/probe_loss/band=low/contrast`` -> ``guard/probe_loss/...``."""
    return "guard/" + (signal[4:] if signal.startswith("mem/") else signal)


class TensorBoardDashboard(Callback):
    """The verdict, bands by colour, probe panels, histograms, alarm text and hparams (module docstring).

    Args:
        config: the settings; keyword arguments override its fields.
        monitor: the :class:`~mnemoguard.callbacks.monitor.MemorizationMonitor` to show, or None.
        policy: the :class:`~mnemoguard.callbacks.policy.MitigationPolicy` (rules, alarms, actions), or None.
        loss_flags: the :class:`~mnemoguard.callbacks.regularizers.agc_table.LowLossFlags` (per-sample flag counts),
            or None.
        early_stopping: the :class:`~mnemoguard.callbacks.early_stopping.EarlyStopping` callbacks whose monitored
            metric and best value to show.
        copy_ratio: the nearest-neighbour ratio below which a generation counts as a copy (the report's
            ``nn_ratio_threshold``), printed on the probe panels.
        danger_zone: the :class:`~mnemoguard.callbacks.danger_zone.DangerZoneTracker` (its band is an alarm, its
            excess a watched signal, its figure shown), or None.
        noise_gap: the :class:`~mnemoguard.callbacks.noise_gap.NoiseGapScheduler` (its strength is an action when
            it follows the danger zone), or None.
    """

    def __init__(self, config: DashboardConfig | None = None, monitor: Any = None, policy: Any = None,
                 loss_flags: Any = None, early_stopping: list[Any] | None = None, copy_ratio: float = 1.0 / 3.0,
                 danger_zone: Any = None, noise_gap: Any = None, **overrides: Any) -> None:
        self.config = replace(config or DashboardConfig(), **overrides)
        self.monitor = monitor
        self.policy = policy
        self.loss_flags = loss_flags
        self.early_stopping = list(early_stopping or [])
        self.copy_ratio = float(copy_ratio)
        self.danger_zone = danger_zone
        self.noise_gap = noise_gap
        self._zone_written = 0  # tracker measurements shown (the prior with the first)
        self.alarms_written = 0
        self._context: Any = None
        self._started = False
        self._runs: dict[str, Any] = {}
        self._purge: int | None = None
        self._visual_step: int | None = None
        self._check_step: int | None = None  # last check written
        self._stopped = False  # not in the state: a resumed run is running again

    # ------------------------------------------------------------------------------------------------ plumbing
    def _writer(self, context: Any) -> Any:
        """The raw SummaryWriter on the main process, or None (TensorBoard off, other rank, trackers not started)."""
        accelerator = getattr(context, "accelerator", None)
        if accelerator is None or not accelerator.is_main_process:
            return None
        if not any(getattr(t, "name", None) == "tensorboard" for t in getattr(accelerator, "trackers", [])):
            return None
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        return writer if hasattr(writer, "add_scalar") else None

    def _run(self, writer: Any, name: str) -> Any:
        """The sub-run ``name`` next to the training run's scalars (a directory below its log dir)."""
        run = self._runs.get(name)
        if run is None:
            from torch.utils.tensorboard import SummaryWriter

            run = SummaryWriter(os.path.join(writer.log_dir, name), purge_step=self._purge)
            self._runs[name] = run
        return run

    def watched(self) -> list[tuple[str, str]]:
        """``[(signal, who)]``: what the policy's rules and early stopping watch."""
        return watched_signals(self.policy, self.early_stopping, self.danger_zone)

    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        self._context = context
        self._purge = state.global_step + 1 if state.global_step > 0 else None

    def on_step_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                      **kwargs: Any) -> None:
        # Trackers start after the guard is built: the layout and the hparams go out with the first step.
        if self._started:
            return
        writer = self._writer(context)
        if writer is None:
            return
        self._started = True
        if self.config.layout:
            writer.add_custom_scalars(self.layout())
        if self.config.hparams:
            from torch.utils.tensorboard.summary import hparams

            exp, ssi, _ = hparams(*self.hparams_summary())
            for summary in (exp, ssi):
                writer.file_writer.add_summary(summary, state.global_step)

    def layout(self) -> dict[str, dict[str, list]]:
        """The custom-scalars layout: ``{category: {chart title: ["Multiline", [regex]] | ["Margin", [tags]]}}``,
        the verdict first (TensorBoard keeps the order)."""
        verdict: dict[str, list] = {}
        for signal, who in self.watched():
            verdict[f"{signal} ({who}) with its levels"] = ["Multiline", [_exact(verdict_tag(signal))]]
        if self.policy is not None or self.danger_zone is not None:
            verdict["alarm (1 while a rule or the danger zone is on)"] = ["Multiline", [_exact("guard/alarm")]]
            verdict["actions (strength applied)"] = ["Multiline", [r"^guard/action/.*$"]]
        verdict["stop (1 from the stop step)"] = ["Multiline", [_exact("guard/stop")]]
        layout: dict[str, dict[str, list]] = {"guard: verdict": verdict}
        mon = self.monitor
        if mon is not None:
            watched = [s for s, _ in self.watched()]
            order = sorted(mon.metric_tags().items(),
                           key=lambda kv: not any(s.startswith(f"mem/{kv[0]}/") for s in watched))
            caveats = mon.contrast_caveats()
            for sig, parts in order:
                charts: dict[str, list] = {}
                for split in parts:
                    title = f"{sig} / {split} (one line per band)"
                    if split == "contrast" and sig in caveats:
                        title += f" [{caveats[sig].split(':')[0]}]"
                    charts[title] = ["Multiline", [_exact(f"mem/{sig}/{split}")]]
                if self.config.margin_charts:
                    for split in mon.splits:
                        for band, tag in zip(mon.bands, parts[split]):
                            charts[f"{sig} / {split} / band={band} (mean ± std)"] = [
                                "Margin", [tag, f"{tag}_lo", f"{tag}_hi"]]
                layout[f"mem: {sig}"] = charts
            layout["mem: per-step loss flags"] = {
                "flag rate (one line per band)": ["Multiline", [_exact("mem/agc/flag_rate")]],
                "flagged samples": ["Multiline", [_exact("mem/agc/flagged_samples")]],
            }
            t = mon.config.curvature_timestep
            layout["mem: probe generations"] = {
                "nearest-neighbour ratio d1/d2 (< 1/3: a copy)": ["Multiline", [_exact("mem/nn_ratio/train")]],
                "curvature difference": ["Multiline", [_exact(f"mem/curvature_diff/t={t}/train")]],
            }
        layout["mem: schedule"] = {
            "noise gap": ["Multiline", [r"^mem/noise_gap/.*$"]],
            "danger zone: rates (excess, copy rate, held-out copy rate)": [
                "Multiline", [r"^mem/danger_zone/(excess|copy_rate|heldout_copy_rate|active|strength)$"]],
            "danger zone: live band (timesteps)": ["Multiline", [r"^mem/danger_zone/t_(begin|end)$"]],
        }
        layout["train"] = {"loss": ["Multiline", [_exact("train/loss")]], "lr": ["Multiline", [_exact("train/lr")]]}
        return layout

    # ------------------------------------------------------------------------------------------------ per step
    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    logs: dict | None = None, **kwargs: Any) -> None:
        writer = self._writer(context)
        if writer is None:
            return
        step = state.global_step
        self._write_verdict(writer, state, control, step)
        for tag, value in (logs or {}).items():
            match = _BAND.search(tag)
            if match is not None:
                self._run(writer, f"band={match.group(1)}").add_scalar(_BAND.sub("", tag, count=1), value, step)
        mon = self.monitor
        if mon is not None:
            # Every check not shown yet, at its own step.
            for entry in mon.history:
                if "weights" in entry or (self._check_step is not None and entry["step"] <= self._check_step):
                    continue
                if self.config.margin_charts:
                    self._write_bounds(writer, entry["metrics"], entry["step"])
                if self.config.histograms:
                    self._write_histograms(writer, entry, entry["step"])
                self._check_step = entry["step"]
            self._write_visuals(writer)
        if self.danger_zone is not None and self.config.images:
            self._write_danger_zone(writer, step)
        if self.config.alarms:
            self._write_alarms(writer)
        if logs:
            for run in self._runs.values():
                run.flush()

    def _write_verdict(self, writer: Any, state: TrainerState, control: TrainerControl, step: int) -> None:
        """The ``guard/`` group: watched signals with their levels when fresh; switches at every step."""
        levels = signal_levels(self.policy, self.early_stopping, self.danger_zone)
        for signal, _ in self.watched():
            if state.is_fresh(signal):
                tag = verdict_tag(signal)
                writer.add_scalar(tag, float(state.metrics[signal]), step)
                for run, value in levels.get(signal, []):
                    self._run(writer, run).add_scalar(tag, float(value), step)
        for name, value in self._switches().items():
            writer.add_scalar(name, value, step)
        self._stopped = self._stopped or bool(control.should_training_stop)
        writer.add_scalar("guard/stop", float(self._stopped), step)

    def _switches(self) -> dict[str, float]:
        """``guard/alarm`` (1 while a policy rule or the danger-zone band is on) and ``guard/action/<name>`` (the
        strength each action applies: the policy's, and the noise gap's while it follows the danger zone)."""
        policy, tracker = self.policy, self.danger_zone
        if policy is None and tracker is None:
            return {}
        alarm = any(rs.on for rs in policy.rule_states.values()) if policy is not None else False
        out = {"guard/alarm": float(alarm or bool(tracker is not None and tracker.active))}
        if policy is not None:
            for name in sorted({r.action for r in policy.rules}):
                out[f"guard/action/{name}"] = float(policy.applied.get(name, {}).get("strength", 0.0))
        gap = self.noise_gap
        if gap is not None and getattr(gap, "zone", None) is not None:
            out["guard/action/noise_gap"] = float(gap.strength if gap.active else 0.0)
        return out

    def _write_bounds(self, writer: Any, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            std = metrics.get(f"{tag}_std")
            if std is not None:
                writer.add_scalar(f"{tag}_lo", float(value - std), step)
                writer.add_scalar(f"{tag}_hi", float(value + std), step)

    def _write_histograms(self, writer: Any, entry: dict[str, Any], step: int) -> None:
        for sig, bands in entry["per_probe"].items():
            for band, groups in bands.items():
                for split, values in groups.items():
                    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
                    if arr.size:
                        writer.add_histogram(f"mem/{sig}/band={band}/{split}/per_probe", arr, step)
        if self.loss_flags is not None:
            counts = np.asarray([r["flagged"] for r in self.loss_flags.flagged_rows()], dtype=np.float64)
            if counts.size:
                writer.add_histogram("mem/agc/flag_counts", counts, step)

    def _write_visuals(self, writer: Any) -> None:
        vis = self.monitor.latest_visuals
        seen = self._visual_step is not None and vis is not None and vis["step"] <= self._visual_step
        if not self.config.images or vis is None or seen:
            return
        self._visual_step = vis["step"]
        exported = vis.get("weights")
        label = None if not exported else f"of the exported weights ({exported['source']}, step {exported['step']})"
        fig = probe_figure(vis, step=vis["step"], label=label, colormap=self.config.colormap,
                           copy_ratio=self.copy_ratio)
        if fig is not None:
            writer.add_image("mem/probes/generation_nearest_curvature", figure_to_array(fig), vis["step"],
                             dataformats="HWC")

    def _write_danger_zone(self, writer: Any, step: int) -> None:
        """The prior beside each new live measurement (``mem/danger_zone/profile``), at the measurement's step."""
        from .danger_zone.plot import danger_zone_figure

        tracker = self.danger_zone
        history = tracker.history
        if self._zone_written == 0 and not history and tracker.prior is not None:
            fig = danger_zone_figure(tracker.prior, None)
            writer.add_image("mem/danger_zone/profile", figure_to_array(fig), step, dataformats="HWC")
            self._zone_written = -1  # the prior alone is shown; measurements follow
        for entry in history[max(self._zone_written, 0):]:
            fig = danger_zone_figure(tracker.prior, entry)
            writer.add_image("mem/danger_zone/profile", figure_to_array(fig), entry["step"], dataformats="HWC")
        self._zone_written = max(self._zone_written, len(history)) if history else self._zone_written

    def _write_alarms(self, writer: Any) -> None:
        alarms = self.policy.alarms if self.policy is not None else []
        for alarm in alarms[self.alarms_written:]:
            writer.add_text("mem/alarms", str(alarm.get("message", alarm)), int(alarm.get("step", 0)))
        self.alarms_written = max(self.alarms_written, len(alarms))

    # ------------------------------------------------------------------------------------------------ end
    def on_train_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                     **kwargs: Any) -> None:
        writer = self._writer(context)
        if writer is None:
            return
        if self.monitor is not None:
            self._write_visuals(writer)  # the end check's panels (of the exported weights)
        if self.config.hparams and self._started:
            from torch.utils.tensorboard.summary import hparams

            _, _, sei = hparams(*self.hparams_summary())
            writer.file_writer.add_summary(sei, state.global_step)
        writer.flush()
        for run in self._runs.values():
            run.close()
        self._runs.clear()

    def hparams_summary(self) -> tuple[dict[str, Any], dict[str, float]]:
        """``(hparam_dict, metric_dict)`` for TensorBoard's HParams: the run's settings (scalars only) and the tags
        whose last value the table shows (the verdict's; the metric values here are placeholders)."""
        hp: dict[str, Any] = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                              for k, v in (getattr(self._context, "hparams", None) or {}).items()}
        mon = self.monitor
        if mon is not None:
            c = mon.config
            hp.update({"monitor/baseline": str(c.baseline), "monitor/every_n_steps": int(c.every_n_steps),
                       "monitor/bands": str({k: list(v) for k, v in mon.bands.items()})})
        metrics = {verdict_tag(signal): 0.0 for signal, _ in self.watched()}
        if self.policy is not None or self.danger_zone is not None:
            metrics["guard/alarm"] = 0.0
        metrics["guard/stop"] = 0.0
        if mon is not None and mon.config.curvature_every_k_checks and mon.config.curvature_num_probes:
            metrics["mem/nn_ratio/train"] = 0.0
        return hp, metrics

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"alarms_written": int(self.alarms_written), "check_step": self._check_step,
                "visual_step": self._visual_step, "zone_written": self._zone_written}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..serialization import check_keys

        check_keys(state, {"alarms_written": int, "check_step": (int, type(None)),
                           "visual_step": (int, type(None)), "zone_written": int}, "TensorBoardDashboard")
        self.alarms_written = int(state.get("alarms_written", 0))
        self._check_step = state.get("check_step")
        self._visual_step = state.get("visual_step")
        self._zone_written = int(state.get("zone_written", 0))
