"""The report's PNG plots (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_plots"]


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
        from ..dashboard import probe_panels

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
