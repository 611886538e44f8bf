"""TensorBoardDashboard: the memorization monitor's signals laid out in TensorBoard.

It writes with the raw ``SummaryWriter`` of accelerate's TensorBoard tracker
(``accelerator.get_tracker("tensorboard", unwrap=True)``), on the main process only, and does nothing when TensorBoard
is off (``logging.report_to: none``). The scalars themselves are written by the trainer (flat ``mem/...`` tags, the
metrics contract); the dashboard adds what a flat scalar cannot carry:

- **one custom-scalars layout** (``add_custom_scalars`` may be called once per writer), written at the first step:
  per signal, a multiline chart across bands for the training probes, the held-out probes and their contrast; per
  signal, band and split a margin chart ``mean ± std`` over probes (the ``..._lo`` / ``..._hi`` bound tags are
  written here, at every check); the per-step loss flags by band; the generations' nearest-neighbour ratio and
  curvature; the policy's alarm count and action strengths; noise-gap and danger-zone tags when present; the
  training loss;
- **histograms** of the per-probe values of every signal, band and split at each check
  (``mem/<signal>/band=<b>/<split>/per_probe``) and of the per-sample loss-flag counts;
- **images** at curvature checks: per generated probe, ``generation | nearest training image | curvature-difference
  map`` side by side (``mem/probes/generation_nearest_curvature``), with the captions and ratios as text;
- **alarm text** (``mem/alarms``): every decision of a policy callback (any callback with an ``alarms`` list of
  dicts with ``step`` and ``message``, e.g. :class:`~mnemoguard.callbacks.policy.MitigationPolicy`), at its step;
- an **hparams summary** at the end: the monitor's and the recipe's main settings against the final value of every
  monitor signal, the stop step and the alarm count (values cast with ``float()``), written into the run directory
  itself (``run_name="."``).

Register it after the monitor and the policy so that it shows their values at the step they are computed (registered
before them, it shows them one step later, still at their own step). Its counters of what it has written are in
``state_dict``, so a resumed run neither repeats nor skips anything.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config.guard import DashboardConfig
from .base import Callback, TrainerControl, TrainerState

logger = logging.getLogger("mnemoguard")


def _exact(tag: str) -> str:
    """Custom-scalar multiline charts take regexes: match ``tag`` exactly."""
    return f"^{re.escape(tag)}$"


class TensorBoardDashboard(Callback):
    """Custom-scalar layout, histograms, probe images, alarm text and an hparams summary (module docstring).

    Args:
        config: the settings; keyword arguments override its fields.
        monitor: the :class:`~mnemoguard.callbacks.monitor.MemorizationMonitor` to show, or None.
        policy: the :class:`~mnemoguard.callbacks.policy.MitigationPolicy` whose alarms to show, or None.
        loss_flags: the :class:`~mnemoguard.callbacks.loss_flags.LowLossFlags` (per-step flag counts), or None.
    """

    def __init__(self, config: DashboardConfig | None = None, monitor: Any = None, policy: Any = None,
                 loss_flags: Any = None, **overrides: Any) -> None:
        self.config = replace(config or DashboardConfig(), **overrides)
        self.monitor = monitor
        self.policy = policy
        self.loss_flags = loss_flags
        self.alarms_written = 0
        self._context: Any = None
        self._layout_written = False
        self._visual_step: int | None = None
        self._check_step: int | None = None  # last check written

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

    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        self._context = context

    def on_step_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                      **kwargs: Any) -> None:
        # Trackers start after the guard is built: the layout goes out with the first step.
        if not self._layout_written:
            writer = self._writer(context)
            if writer is not None and self.config.layout:
                writer.add_custom_scalars(self.layout())
                self._layout_written = True

    def layout(self) -> dict[str, dict[str, list]]:
        """The custom-scalars layout: ``{category: {chart title: ["Multiline", [regex]] | ["Margin", [tags]]}}``."""
        layout: dict[str, dict[str, list]] = {}
        mon = self.monitor
        if mon is not None:
            for sig, parts in mon.metric_tags().items():
                charts: dict[str, list] = {}
                for split, tags in parts.items():
                    charts[f"{sig} / {split} / by band"] = ["Multiline", [_exact(t) for t in tags]]
                if self.config.margin_charts:
                    for split in mon.splits:
                        for band, tag in zip(mon.bands, parts[split]):
                            charts[f"{sig} / {split} / band={band} (mean ± std)"] = [
                                "Margin", [tag, f"{tag}_lo", f"{tag}_hi"]]
                layout[f"mem: {sig}"] = charts
            layout["mem: per-step loss flags"] = {
                "flag rate by band": ["Multiline", [_exact(f"mem/agc/flag_rate/band={b}") for b in mon.bands]],
                "flagged samples": ["Multiline", [_exact("mem/agc/flagged_samples")]],
            }
            t = mon.config.curvature_timestep
            layout["mem: probe generations"] = {
                "nearest-neighbour ratio d1/d2": ["Multiline", [_exact("mem/nn_ratio/train")]],
                "curvature difference": ["Multiline", [_exact(f"mem/curvature_diff/t={t}/train")]],
            }
        if self.policy is not None:
            layout["mem: policy"] = {
                "alarms": ["Multiline", [_exact("mem/alarm")]],
                "action strengths": ["Multiline", [r"^mem/policy/.*$"]],
            }
        layout["mem: schedule"] = {
            "noise gap": ["Multiline", [r"^mem/noise_gap/.*$"]],
            "danger zone": ["Multiline", [r"^mem/danger_zone/.*$"]],
        }
        layout["train"] = {"loss": ["Multiline", [_exact("train/loss")]], "lr": ["Multiline", [_exact("train/lr")]]}
        return layout

    # ------------------------------------------------------------------------------------------------ per step
    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    **kwargs: Any) -> None:
        writer = self._writer(context)
        if writer is None:
            return
        mon = self.monitor
        if mon is not None:
            # Every check not shown yet, at its own step (also when registered before the monitor: one step late).
            for entry in mon.history:
                if self._check_step is not None and entry["step"] <= self._check_step:
                    continue
                if self.config.margin_charts:
                    self._write_bounds(writer, entry["metrics"], entry["step"])
                if self.config.histograms:
                    self._write_histograms(writer, entry, entry["step"])
                self._check_step = entry["step"]
            vis = mon.latest_visuals
            new_visual = vis is not None and (self._visual_step is None or vis["step"] > self._visual_step)
            if self.config.images and new_visual:
                self._write_images(writer, vis, vis["step"])
                self._visual_step = vis["step"]
        if self.config.alarms:
            self._write_alarms(writer)

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

    def _write_images(self, writer: Any, vis: dict[str, Any], step: int) -> None:
        panels = probe_panels(vis, min_size=self.config.image_size, colormap=self.config.colormap)
        if panels is None:
            return
        writer.add_images("mem/probes/generation_nearest_curvature", panels, step, dataformats="NCHW")
        lines = []
        for i, caption in enumerate(vis["captions"]):
            ratio = vis["nn_ratio"][i] if i < len(vis["nn_ratio"]) else float("nan")
            own = vis["nearest_is_own"][i] if i < len(vis["nearest_is_own"]) else None
            lines.append(f"| {i} | {caption} | {ratio:.3f} | {own} | {vis['curvature'][i]:.4g} |")
        table = "| probe | caption | d1/d2 | nearest is its own image | mean Δh |\n|---|---|---|---|---|\n"
        writer.add_text("mem/probes/captions", table + "\n".join(lines), step)

    def _write_alarms(self, writer: Any) -> None:
        alarms = self.policy.alarms if self.policy is not None else []
        for alarm in alarms[self.alarms_written:]:
            writer.add_text("mem/alarms", str(alarm.get("message", alarm)), int(alarm.get("step", 0)))
        self.alarms_written = max(self.alarms_written, len(alarms))

    # ------------------------------------------------------------------------------------------------ end
    def on_train_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                     **kwargs: Any) -> None:
        writer = self._writer(context)
        if writer is None or not self.config.hparams:
            return
        hparams, metrics = self.hparams_summary(state)
        writer.add_hparams(hparams, metrics, run_name=".", global_step=state.global_step)
        writer.flush()

    def hparams_summary(self, state: TrainerState) -> tuple[dict[str, Any], dict[str, float]]:
        """``(hparam_dict, metric_dict)`` for ``add_hparams``: scalars only, metrics cast with ``float()``."""
        hp: dict[str, Any] = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                              for k, v in (getattr(self._context, "hparams", None) or {}).items()}
        mon = self.monitor
        if mon is not None:
            c = mon.config
            hp.update({
                "monitor/baseline": str(c.baseline), "monitor/every_n_steps": int(c.every_n_steps),
                "monitor/bands": str({k: list(v) for k, v in mon.bands.items()}),
                "monitor/train_probes": len([p for p in mon.probes() if p["split"] == "train"]),
                "monitor/heldout_probes": len([p for p in mon.probes() if p["split"] == "heldout"]),
            })
        metrics: dict[str, float] = {"hparam/global_step": float(state.global_step),
                                     "hparam/stopped": float(bool(state.stop_reason))}
        if state.best_step is not None:
            metrics["hparam/best_step"] = float(state.best_step)
        if self.policy is not None:
            metrics["hparam/alarms"] = float(len(self.policy.alarms))
        if mon is not None and mon.history:
            for tag, value in mon.history[-1]["metrics"].items():
                if not tag.endswith("_std") and np.isfinite(value):
                    metrics[f"hparam/{tag}"] = float(value)
        return hp, metrics

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"alarms_written": int(self.alarms_written), "check_step": self._check_step,
                "visual_step": self._visual_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..serialization import check_keys

        check_keys(state, {"alarms_written": int, "check_step": (int, type(None)),
                           "visual_step": (int, type(None))}, "TensorBoardDashboard")
        self.alarms_written = int(state.get("alarms_written", 0))
        self._check_step = state.get("check_step")
        self._visual_step = state.get("visual_step")


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in [0, 1] -> 3 channels (grey repeated; extra channels dropped)."""
    if images.shape[1] == 1:
        return images.repeat(1, 3, 1, 1)
    return images[:, :3]


def colorize(maps: torch.Tensor, colormap: str = "inferno") -> torch.Tensor:
    """``[N, H, W]`` non-negative maps -> ``[N, 3, H, W]`` colours: ``log1p``, then one min-max over all maps (as
    Kim & Lee normalise a whole evaluated set, so the panels are comparable), then a matplotlib colormap."""
    import matplotlib

    m = torch.log1p(maps.float().clamp_min(0))
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    rgba = matplotlib.colormaps[colormap](m.numpy())
    return torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(0, 3, 1, 2).float()


def probe_panels(vis: dict[str, Any], min_size: int = 96, colormap: str = "inferno") -> torch.Tensor | None:
    """``[G, 3, H, 3W]``: generation | nearest training image | curvature-difference map, per generated probe."""
    from ..signals import upsample_map

    gen = vis.get("generations")
    if gen is None or gen.numel() == 0:
        return None
    gen = _rgb(gen.float().clamp(0, 1))
    H, W = gen.shape[-2:]
    nearest = vis.get("nearest")
    nearest = _rgb(nearest.float().clamp(0, 1)) if nearest is not None else torch.zeros_like(gen)
    maps = vis.get("maps")
    if maps is not None:
        maps = maps.float()
        heat = colorize(upsample_map(maps, (H, W)) if tuple(maps.shape[-2:]) != (H, W) else maps, colormap)
    else:
        heat = torch.zeros_like(gen)
    panel = torch.cat([gen, nearest, heat], dim=-1)
    scale = max(1, -(-min_size // max(H, 1)))
    if scale > 1:
        panel = F.interpolate(panel, scale_factor=scale, mode="nearest")
    return panel.clamp(0, 1)
