"""MemorizationReport: the end-of-run report, its JSON summary, and the memorization metadata of the export.

At ``on_train_end`` (after the export), on the main process, it writes into ``<output_dir>/report/``:

- ``summary.json``: the run (steps, stop step and reason, best step / checkpoint, exported directory), the monitor's
  settings, bands and probes, the signal curves (every logged ``mem/...`` tag, ``train/loss`` and ``val/...`` as
  ``[step, value]`` pairs from ``state.log_history``), the alarms and actions of policy callbacks (any callback with
  an ``alarms`` list), early-stopping outcomes (callbacks with ``stopped_step``), the per-step loss flags, the last
  probe generations' ratios, per-probe verdicts, and a ``report_summary()`` dict from any callback that has one (the
  extension point for other guard callbacks, e.g. a danger-zone tracker);
- ``report.md``: the same, readable, with PNG plots (matplotlib's Agg canvas, no pyplot state): one figure per
  signal (training probes / held-out probes / contrast, one line per band, alarms and the stop marked), the verdict
  per probe, the per-step loss-flag rates, and the last generation panels;
- and, with ``stamp_export``, it adds :func:`memorization_metadata` (``mnemoguard_*`` keys, all strings, kohya's
  ``ss_*`` convention) to the metadata of the exported fine-tuned weights (the LoRA file, or ``unet/*.safetensors``
  of a full model; see :func:`exported_weight_files`).

**Verdicts** (per training probe; held-out probes are the reference):

- ``memorized``: its last generation's nearest training image is its own and Gu et al.'s ratio ``d1/d2`` is below
  ``nn_ratio_threshold`` (1/3): output-space evidence of a copy;
- ``suspect``: the per-step loss flagged it at least ``min_flags`` times, or at the last check, in some band, its
  live-vs-baseline or Wen gap exceeds ``heldout_factor`` × the largest held-out value, or its probe loss is below the
  smallest held-out loss / ``heldout_factor``;
- ``ok`` otherwise. The run's verdict is the worst probe verdict (``unknown`` without a monitor).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .base import Callback, TrainerControl, TrainerState

logger = logging.getLogger("mnemoguard")

_RANK = {"unknown": -1, "ok": 0, "suspect": 1, "memorized": 2}


@dataclass
class ReportConfig:
    """Settings of :class:`MemorizationReport` (the ``guard.report`` section of a recipe)."""

    directory: str = "report"  # relative to training.output_dir
    plots: bool = True  # PNG plots next to report.md
    stamp_export: bool = True  # add memorization_metadata to the exported *.safetensors files
    nn_ratio_threshold: float = 1.0 / 3.0  # Gu et al.: d1/d2 below this = a copy of the nearest training image
    heldout_factor: float = 1.5  # a probe value this far beyond every held-out value makes it "suspect"
    min_flags: int = 3  # per-step low-loss flags that make a probe "suspect"


# ---------------------------------------------------------------------------------------------------- verdicts
def probe_verdicts(monitor: Any, config: ReportConfig | None = None) -> list[dict[str, Any]]:
    """Per probe: ``{"id", "split", "kind", "index", "caption", "verdict", "reasons", "flags", "nn_ratio",
    "values": {signal: {band: value}}}`` (see the module docstring for the rules)."""
    config = config or ReportConfig()
    if monitor is None or not monitor.probes():
        return []
    last = monitor.history[-1] if monitor.history else None
    visual: dict[int, tuple[float, bool]] = {}
    for entry in monitor.history:
        v = entry.get("visual")
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
        flags = int(monitor.flag_counts.get(int(probe["index"]), 0)) if probe["split"] == "train" else 0
        ratio, own = visual.get(pid, (None, None))
        if probe["split"] != "train":
            verdict = "held-out"
        else:
            verdict = "ok"
            if ratio is not None and own and ratio < config.nn_ratio_threshold:
                verdict = "memorized"
                reasons.append(f"its generation copies its training image (d1/d2 = {ratio:.3f} < "
                               f"{config.nn_ratio_threshold:.3f})")
            if flags >= config.min_flags:
                reasons.append(f"the per-step loss flagged it {flags} times")
            if last is not None and monitor.has_heldout:
                reasons += _heldout_reasons(last, pid, monitor, config)
            if verdict == "ok" and reasons:
                verdict = "suspect"
        out.append({**probe, "verdict": verdict, "reasons": reasons, "flags": flags, "nn_ratio": ratio,
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
    ranks = [v["verdict"] for v in verdicts if v["verdict"] in _RANK]
    return max(ranks, key=_RANK.get) if ranks else "unknown"


# ---------------------------------------------------------------------------------------------------- metadata
def _find(callbacks: Any, predicate) -> Any:
    return next((cb for cb in callbacks or [] if predicate(cb)), None)


def _policies(callbacks: Any) -> list[Any]:
    return [cb for cb in callbacks or [] if isinstance(getattr(cb, "alarms", None), list)]


def memorization_metadata(
    state: TrainerState,
    monitor: Any = None,
    policy: Any = None,
    verdicts: list[dict[str, Any]] | None = None,
    callbacks: Any = None,
) -> dict[str, str]:
    """``mnemoguard_*`` metadata for the exported safetensors (every value a string, kohya's ``ss_*`` style).

    Args:
        state: the trainer state (steps, stop, best step).
        monitor, policy: the :class:`MemorizationMonitor` and a policy (anything with ``alarms``); taken from
            ``callbacks`` when omitted.
        verdicts: from :func:`probe_verdicts` (computed from the monitor when omitted).
        callbacks: the trainer's callbacks, to find the monitor and the policy in.
    """
    from .. import __version__
    from .monitor import MemorizationMonitor

    if monitor is None:
        monitor = _find(callbacks, lambda cb: isinstance(cb, MemorizationMonitor))
    policies = [policy] if policy is not None else _policies(callbacks)
    if verdicts is None:
        verdicts = probe_verdicts(monitor)
    alarms = [a for p in policies for a in p.alarms]
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
        "mnemoguard_verdict": overall_verdict(verdicts),
        "mnemoguard_probe_verdicts": json.dumps(counts, sort_keys=True),
        "mnemoguard_alarms": str(len(alarms)),
        "mnemoguard_actions": json.dumps([{"step": a.get("step"), "action": a.get("action"), "on": a.get("on")}
                                          for a in alarms]),
    }
    if monitor is not None:
        meta["mnemoguard_baseline"] = str(monitor.config.baseline)
        meta["mnemoguard_bands"] = json.dumps({k: list(v) for k, v in monitor.bands.items()})
        meta["mnemoguard_checks"] = str(len(monitor.history))
        if monitor.history:
            last = monitor.history[-1]
            meta["mnemoguard_last_check_step"] = str(int(last["step"]))
            meta["mnemoguard_signals"] = json.dumps(
                {k: round(float(v), 6) for k, v in last["metrics"].items() if not k.endswith("_std")}, sort_keys=True)
        meta["mnemoguard_flagged_samples"] = str(len(monitor.flag_counts))
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


# ---------------------------------------------------------------------------------------------------- report
class MemorizationReport(Callback):
    """Writes ``report/report.md`` (+ PNG plots) and ``report/summary.json`` at the end of training, and stamps the
    exported weights with :func:`memorization_metadata` (module docstring).

    Args:
        config: the settings; keyword arguments override its fields.
        monitor: the monitor to report on; default: the first :class:`MemorizationMonitor` among the callbacks.
    """

    def __init__(self, config: ReportConfig | None = None, monitor: Any = None, **overrides: Any) -> None:
        self.config = replace(config or ReportConfig(), **overrides)
        if self.config.min_flags < 1 or self.config.heldout_factor < 1 or self.config.nn_ratio_threshold <= 0:
            raise ValueError(f"ReportConfig: expected min_flags >= 1, heldout_factor >= 1, nn_ratio_threshold > 0; "
                             f"found {self.config}")
        self.monitor = monitor
        self.directory: Path | None = None
        self.summary: dict[str, Any] | None = None

    def on_train_end(self, state: TrainerState, control: TrainerControl, trainer: Any = None,
                     accelerator: Any = None, **kwargs: Any) -> None:
        if accelerator is not None and not accelerator.is_main_process:
            return
        callbacks = list(getattr(trainer, "callbacks", []) or [])
        output_dir = Path(getattr(trainer, "output_dir", None) or trainer.config.training.output_dir)
        self.write(state, output_dir, callbacks=callbacks, final_dir=getattr(trainer, "final_dir", None))

    def write(self, state: TrainerState, output_dir: str | os.PathLike, callbacks: Any = None,
              final_dir: str | os.PathLike | None = None) -> Path:
        """Write the report for ``state`` and ``callbacks`` into ``output_dir/<directory>``; returns that folder."""
        from .monitor import MemorizationMonitor

        monitor = self.monitor or _find(callbacks, lambda cb: isinstance(cb, MemorizationMonitor))
        directory = Path(output_dir) / self.config.directory
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        verdicts = probe_verdicts(monitor, self.config)
        summary = build_summary(state, monitor, callbacks, verdicts, final_dir)
        plots = {}
        if self.config.plots:
            try:
                plots = write_plots(directory, summary, monitor)
            except Exception as err:  # a plot must never lose the report
                logger.warning("MemorizationReport: plotting failed (%s); writing the report without plots", err)
        summary["plots"] = sorted(plots.values())
        (directory / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        (directory / "report.md").write_text(render_markdown(summary, plots))
        self.summary = summary
        if self.config.stamp_export and final_dir is not None:
            meta = memorization_metadata(state, monitor=monitor, verdicts=verdicts, callbacks=callbacks)
            meta["mnemoguard_report"] = str(Path(self.config.directory) / "report.md")
            for path in exported_weight_files(final_dir):
                stamp_safetensors(path, meta)
        return directory


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _finite(v: Any) -> Any:
    """JSON has no NaN / inf: map them to None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def build_summary(state: TrainerState, monitor: Any, callbacks: Any, verdicts: list[dict[str, Any]],
                  final_dir: Any = None) -> dict[str, Any]:
    """The JSON summary (see the module docstring); plain types only."""
    curves: dict[str, list[list[float]]] = {}
    for row in state.log_history:
        step = row.get("step")
        for tag, value in row.items():
            if tag == "step" or not (tag.startswith("mem/") or tag.startswith("val/") or tag == "train/loss"):
                continue
            curves.setdefault(tag, []).append([int(step), _finite(float(value))])
    policies = _policies(callbacks)
    alarms = [{k: _finite(v) for k, v in a.items()} for p in policies for a in p.alarms]
    actions = {}
    for p in policies:
        actions.update({k: dict(v) for k, v in (getattr(p, "applied", None) or {}).items()})
    stoppers = [{"callback": type(cb).__name__, "monitor": getattr(cb, "monitor", None),
                 "stopped_step": getattr(cb, "stopped_step", None), "best_step": getattr(cb, "best_step", None),
                 "best_score": _finite(getattr(cb, "best_score", None)),
                 "stop_reason": getattr(cb, "stop_reason", None)}
                for cb in callbacks or [] if hasattr(cb, "stopped_step")]
    extras = {}
    for cb in callbacks or []:
        if callable(getattr(cb, "report_summary", None)):
            try:
                extras[getattr(cb, "state_key", type(cb).__name__)] = cb.report_summary()
            except Exception as err:
                logger.warning("MemorizationReport: %s.report_summary() failed: %s", type(cb).__name__, err)
    summary: dict[str, Any] = {
        "run": {
            "global_step": int(state.global_step), "max_steps": int(state.max_steps),
            "stopped": bool(state.stop_reason), "stop_step": int(state.global_step) if state.stop_reason else None,
            "stop_reason": state.stop_reason, "best_step": state.best_step, "best_metric": _finite(state.best_metric),
            "best_checkpoint": state.best_checkpoint, "exported": None if final_dir is None else str(final_dir),
        },
        "verdict": overall_verdict(verdicts),
        "curves": curves,
        "alarms": alarms,
        "actions": actions,
        "early_stopping": stoppers,
        "verdicts": [{**v, "nn_ratio": _finite(v["nn_ratio"]),
                      "values": {s: {b: _finite(x) for b, x in d.items()} for s, d in v["values"].items()}}
                     for v in verdicts],
        "callbacks": extras,
    }
    if monitor is not None:
        last = monitor.history[-1] if monitor.history else None
        summary["monitor"] = {
            "config": asdict(monitor.config), "bands": {k: list(v) for k, v in monitor.bands.items()},
            "signals": monitor.signal_names, "splits": monitor.splits, "checks": len(monitor.history),
            "probes": monitor.probes(),
            "last_check": None if last is None else {"step": last["step"], "metrics": {
                k: _finite(v) for k, v in last["metrics"].items()}},
            "loss_flags": {"flagged_samples": len(monitor.flag_counts),
                           "top": sorted(([int(k), int(v)] for k, v in monitor.flag_counts.items()),
                                         key=lambda kv: (-kv[1], kv[0]))[:20]},
        }
        vis = monitor.latest_visuals
        if vis is not None:
            summary["monitor"]["generations"] = {
                "step": vis.get("step"), "captions": vis["captions"], "nn_ratio": vis["nn_ratio"],
                "nearest_is_own": vis["nearest_is_own"], "nearest_rows": vis.get("nearest_rows", []),
                "curvature": vis["curvature"]}
    return summary


# ---------------------------------------------------------------------------------------------------- plots
def _markers(ax: Any, summary: dict[str, Any]) -> None:
    for a in summary["alarms"]:
        ax.axvline(a["step"], color="tab:orange", linestyle="--", linewidth=0.8, alpha=0.7)
    stop = summary["run"]["stop_step"]
    if stop is not None:
        ax.axvline(stop, color="tab:red", linewidth=1.0)


def write_plots(directory: Path, summary: dict[str, Any], monitor: Any) -> dict[str, str]:
    """PNG plots (Agg canvas, no pyplot): ``{name: file name}``."""
    from matplotlib.figure import Figure

    files: dict[str, str] = {}
    curves = summary["curves"]
    if monitor is not None:
        for sig, parts in monitor.metric_tags().items():
            fig = Figure(figsize=(4.2 * len(parts), 3.2), layout="constrained")
            axes = fig.subplots(1, len(parts), squeeze=False)[0]
            for ax, (split, tags) in zip(axes, parts.items()):
                for band, tag in zip(monitor.bands, tags):
                    pts = [(s, v) for s, v in curves.get(tag, []) if v is not None]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", markersize=3, label=f"band={band}")
                _markers(ax, summary)
                ax.set_title(f"{sig}: {split}")
                ax.set_xlabel("optimizer step")
                ax.legend(fontsize=7)
            name = f"signal_{sig}.png"
            fig.savefig(directory / name, dpi=100)
            files[sig] = name
        flag_tags = [f"mem/agc/flag_rate/band={b}" for b in monitor.bands]
        if any(curves.get(t) for t in flag_tags):
            fig = Figure(figsize=(5, 3.2), layout="constrained")
            ax = fig.subplots()
            for band, tag in zip(monitor.bands, flag_tags):
                pts = [(s, v) for s, v in curves.get(tag, []) if v is not None]
                if pts:
                    ax.plot(*zip(*pts), label=f"band={band}")
            _markers(ax, summary)
            ax.set_title("per-step low-loss flag rate")
            ax.set_xlabel("optimizer step")
            ax.legend(fontsize=7)
            fig.savefig(directory / "loss_flags.png", dpi=100)
            files["loss_flags"] = "loss_flags.png"
    train = [v for v in summary["verdicts"] if v["split"] == "train"]
    if train and monitor is not None:
        sig = monitor.signal_names[0]
        bands = list(monitor.bands)
        fig = Figure(figsize=(max(4.0, 0.7 * len(train) + 2), 3.4), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / max(len(bands), 1)
        x = np.arange(len(train))
        for k, band in enumerate(bands):
            vals = [v["values"].get(sig, {}).get(band) for v in train]
            ax.bar(x + k * width, [np.nan if y is None else y for y in vals], width, label=f"band={band}")
        ax.set_xticks(x + width * (len(bands) - 1) / 2)
        ax.set_xticklabels([f"{v['id']}\n{v['verdict']}" for v in train], fontsize=7)
        ax.set_title(f"{sig} per training probe at the last check")
        ax.legend(fontsize=7)
        fig.savefig(directory / "verdicts.png", dpi=100)
        files["verdicts"] = "verdicts.png"
    vis = getattr(monitor, "latest_visuals", None) if monitor is not None else None
    if vis is not None:
        from .dashboard import probe_panels

        panels = probe_panels(vis, min_size=64)
        if panels is not None:
            G = panels.shape[0]
            fig = Figure(figsize=(6, 2.2 * G), layout="constrained")
            axes = fig.subplots(G, 1, squeeze=False)[:, 0]
            for i, ax in enumerate(axes):
                ax.imshow(panels[i].permute(1, 2, 0).numpy())
                ratio = vis["nn_ratio"][i] if i < len(vis["nn_ratio"]) else float("nan")
                ax.set_title(f"{vis['captions'][i]}  (d1/d2 = {ratio:.3f})", fontsize=8)
                ax.axis("off")
            fig.savefig(directory / "generations.png", dpi=100)
            files["generations"] = "generations.png"
    return files


# ---------------------------------------------------------------------------------------------------- markdown
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_markdown(summary: dict[str, Any], plots: dict[str, str]) -> str:
    """``report.md`` from the summary."""
    run = summary["run"]
    lines = ["# Memorization report", ""]
    lines += [f"**Verdict: {summary['verdict']}**", ""]
    lines += ["| | |", "|---|---|", f"| optimizer steps | {run['global_step']} / {run['max_steps']} |"]
    lines += [f"| stopped | {'at step ' + str(run['stop_step']) if run['stopped'] else 'no'} |"]
    if run["stop_reason"]:
        lines += [f"| stop reason | {run['stop_reason']} |"]
    lines += [f"| best step | {_fmt(run['best_step'])} ({_fmt(run['best_checkpoint'])}) |",
              f"| exported | {_fmt(run['exported'])} |", ""]
    lines += ["## Alarms and actions", ""]
    if summary["alarms"]:
        lines += ["| step | action | on | strength | message |", "|---|---|---|---|---|"]
        lines += [f"| {a.get('step')} | {a.get('action')} | {a.get('on')} | {_fmt(a.get('strength'))} | "
                  f"{a.get('message')} |" for a in summary["alarms"]]
    else:
        lines += ["No alarm was raised."]
    if summary["actions"]:
        lines += ["", "Active at the end: " + ", ".join(f"{k} (strength {_fmt(v.get('strength'))})"
                                                       for k, v in summary["actions"].items())]
    for s in summary["early_stopping"]:
        lines += ["", f"Early stopping on `{s['monitor']}`: best {_fmt(s['best_score'])} at step "
                      f"{_fmt(s['best_step'])}, stopped at {_fmt(s['stopped_step'])}."]
    mon = summary.get("monitor")
    if mon is not None:
        last = mon["last_check"]
        lines += ["", "## Signals", ""]
        lines += [f"Baseline `{mon['config']['baseline']}`, {mon['checks']} checks every "
                  f"{mon['config']['every_n_steps']} steps; bands " + ", ".join(
                      f"{k} = [{v[0]}, {v[1]})" for k, v in mon["bands"].items()) + ". Bands are never averaged "
                  "together; contrast = training probes minus held-out probes, positive = more memorized-looking.", ""]
        if last is not None:
            splits = [*mon["splits"], *(["contrast"] if "heldout" in mon["splits"] else [])]
            lines += [f"Last check (step {last['step']}):", "",
                      "| signal | band | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
            for sig in mon["signals"]:
                for band in mon["bands"]:
                    vals = [_fmt(last["metrics"].get(f"mem/{sig}/band={band}/{s}")) for s in splits]
                    lines.append(f"| {sig} | {band} | " + " | ".join(vals) + " |")
        for sig in mon["signals"]:
            if sig in plots:
                lines += ["", f"![{sig}]({plots[sig]})"]
        lines += ["", "## Per-step loss flags", "",
                  f"{mon['loss_flags']['flagged_samples']} training samples had an abnormally low loss for their "
                  "timestep at least once (IET-AGC rule)."]
        if mon["loss_flags"]["top"]:
            lines += ["Most flagged (dataset row: flags): " + ", ".join(f"{k}: {v}" for k, v in
                                                                        mon["loss_flags"]["top"][:10]) + "."]
        if "loss_flags" in plots:
            lines += ["", f"![loss flags]({plots['loss_flags']})"]
    if summary["verdicts"]:
        lines += ["", "## Probes", "", "| id | split | kind | row | caption | verdict | evidence |",
                  "|---|---|---|---|---|---|---|"]
        for v in summary["verdicts"]:
            caption = str(v["caption"]).replace("|", "\\|")
            lines.append(f"| {v['id']} | {v['split']} | {v['kind']} | {v['index']} | {caption} | {v['verdict']} | "
                         f"{'; '.join(v['reasons']) or '–'} |")
        if "verdicts" in plots:
            lines += ["", f"![verdicts]({plots['verdicts']})"]
    if mon is not None and mon.get("generations"):
        g = mon["generations"]
        lines += ["", f"## Probe generations (step {g['step']})", "",
                  "Generation | nearest training image | curvature-difference map (Kim & Lee's Δh, live vs baseline)."]
        if "generations" in plots:
            lines += ["", f"![generations]({plots['generations']})"]
    if summary["callbacks"]:
        lines += ["", "## Other guard callbacks", ""]
        for key, value in summary["callbacks"].items():
            lines += [f"### {key}", "", "```json", json.dumps(value, indent=2, default=_json_default), "```", ""]
    lines += ["", "Curves, alarms and verdicts in machine-readable form: `summary.json`.", ""]
    return "\n".join(lines)
