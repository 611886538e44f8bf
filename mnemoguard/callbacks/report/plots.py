"""The report's PNG plots (matplotlib's Agg canvas, no pyplot state): every line named in a legend, the alarms and the
stop drawn and named, the watched signals' levels drawn, the contrasts known to run negative marked so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_plots"]

_LEVEL_STYLE = {"threshold": ("tab:red", ":"), "release": ("tab:green", ":"), "best": ("tab:purple", "-."),
                "divergence": ("black", ":")}


def _points(curves: dict[str, list], tag: str) -> list[tuple[int, float]]:
    return [(s, v) for s, v in curves.get(tag, []) if v is not None]


def _markers(ax: Any, summary: dict[str, Any]) -> None:
    """Alarm steps (orange dashed) and the stop step (red), each named once in the legend."""
    for k, a in enumerate(summary["alarms"]):
        ax.axvline(a["step"], color="tab:orange", linestyle="--", linewidth=0.8, alpha=0.7,
                   label="alarm (a rule switched)" if k == 0 else None)
    stop = summary["run"]["stop_step"]
    if stop is not None:
        ax.axvline(stop, color="tab:red", linewidth=1.0, label="stop")


def _levels(ax: Any, levels: dict[str, float], suffix: str = "") -> None:
    for name, value in levels.items():
        color, style = _LEVEL_STYLE.get(name, ("grey", ":"))
        ax.axhline(value, color=color, linestyle=style, linewidth=1.0, label=f"{name}{suffix} = {value:.3g}")


def _finish(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def write_plots(directory: Path, summary: dict[str, Any], monitor: Any, copy_ratio: float = 1.0 / 3.0
                ) -> dict[str, str]:
    """PNG plots (Agg canvas, no pyplot): ``{name: file name}``; ``watched`` (the signals the decisions watch, with
    their levels) first; ``copy_ratio``: the d1/d2 below which a generation is a copy (printed on the panels)."""
    from matplotlib.figure import Figure

    files: dict[str, str] = {}
    curves = summary["curves"]
    watched = [w for w in summary.get("watched", []) if _points(curves, w["signal"])]
    if watched:
        fig = Figure(figsize=(5.2 * len(watched), 3.4), layout="constrained")
        for ax, w in zip(fig.subplots(1, len(watched), squeeze=False)[0], watched):
            ax.plot(*zip(*_points(curves, w["signal"])), marker="o", markersize=3, label=w["signal"])
            _levels(ax, w["levels"])
            _markers(ax, summary)
            _finish(ax, f"{w['signal']}\nwatched by {w['by']}")
        fig.savefig(directory / "watched.png", dpi=100)
        files["watched"] = "watched.png"
    levels_by_tag = {w["signal"]: w["levels"] for w in summary.get("watched", [])}
    if monitor is not None:
        caveats = monitor.contrast_caveats()
        for sig, parts in monitor.metric_tags().items():
            fig = Figure(figsize=(4.4 * len(parts), 3.6), layout="constrained")
            axes = fig.subplots(1, len(parts), squeeze=False)[0]
            for ax, (split, tags) in zip(axes, parts.items()):
                for band, tag in zip(monitor.bands, tags):
                    pts = _points(curves, tag)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", markersize=3, label=f"band={band}")
                    if tag in levels_by_tag:
                        _levels(ax, levels_by_tag[tag], suffix=f" (band={band})")
                _markers(ax, summary)
                title = f"{sig}: {split}"
                if split == "contrast":
                    ax.axhline(0.0, color="black", linewidth=0.5)
                    title += "\n(> 0: training probes look more memorized)"
                    if sig in caveats:
                        title = f"{sig}: contrast\n({caveats[sig].split(':')[0]})"
                _finish(ax, title)
            name = f"signal_{sig}.png"
            fig.savefig(directory / name, dpi=100)
            files[sig] = name
        flag_tags = [f"mem/agc/flag_rate/band={b}" for b in monitor.bands]
        if any(curves.get(t) for t in flag_tags):
            fig = Figure(figsize=(5, 3.2), layout="constrained")
            ax = fig.subplots()
            for band, tag in zip(monitor.bands, flag_tags):
                pts = _points(curves, tag)
                if pts:
                    ax.plot(*zip(*pts), label=f"band={band}")
            _markers(ax, summary)
            _finish(ax, "per-step low-loss flag rate")
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
        ax.set_title(f"{sig} per training probe (the verdict's check)", fontsize=9)
        ax.legend(fontsize=7)
        fig.savefig(directory / "verdicts.png", dpi=100)
        files["verdicts"] = "verdicts.png"
    vis = getattr(monitor, "latest_visuals", None) if monitor is not None else None
    if vis is not None:
        from ..panels import probe_figure

        weights = vis.get("weights")
        label = None if not weights else f"of the exported weights ({weights['source']}, step {weights['step']})"
        fig = probe_figure(vis, step=vis.get("step"), label=label, copy_ratio=copy_ratio)
        if fig is not None:
            fig.savefig(directory / "generations.png", dpi=100)
            files["generations"] = "generations.png"
    return files
