"""The danger-zone figure: the data prior beside the live return rates (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

from typing import Any

__all__ = ["danger_zone_figure"]

_SPLITS = {"at_risk": ("at-risk training probes return", "tab:red"),
           "random": ("random training probes return", "tab:orange"),
           "train": ("training probes return", "tab:red"),
           "heldout_self": ("held-out images return to themselves", "tab:blue"),
           "heldout_copy": ("held-out images land on a training image", "tab:purple")}


def danger_zone_figure(prior: dict[str, Any] | None, entry: dict[str, Any] | None) -> Any:
    """Left: Dodson et al.'s ``W_σ`` and ``C_σ`` of the training data with the band they imply; right: the live
    return rates per σ of one measurement (``entry``, a :attr:`DangerZoneTracker.history` item), the excess, the
    live band and the curvature difference. Either side may be None (then it is left out)."""
    from matplotlib.figure import Figure

    panels = [p for p in (prior, entry) if p is not None]
    if not panels:
        return None
    fig = Figure(figsize=(5.6 * len(panels), 3.8), dpi=100, layout="constrained")
    axes = list(fig.subplots(1, len(panels), squeeze=False)[0])
    if prior is not None:
        ax = axes.pop(0)
        ax.plot(prior["sigmas"], prior["max_posterior_weight"], label="W_σ: max posterior weight", color="tab:red")
        ax.plot(prior["sigmas"], prior["coverage"], label=f"C_σ: shell coverage ({prior['population']})",
                color="tab:blue")
        band = prior["band"]
        if not band["empty"]:
            ax.axvspan(band["sigma_lo"], band["sigma_hi"], color="tab:grey", alpha=0.2,
                       label=f"prior band σ {band['sigma_lo']:.2g}–{band['sigma_hi']:.2g}")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("σ (noise level, VE)")
        ax.set_title(f"Data prior: {prior['rows']} rows, {prior['distinct']} distinct images", fontsize=9)
        ax.legend(fontsize=7)
    if entry is not None:
        ax = axes.pop(0)
        profile = entry["profile"]
        sig = profile["sigmas"]
        for split, rates in profile["rates"].items():
            label, color = _SPLITS.get(split, (split, None))
            ax.plot(sig, rates, marker="o", markersize=3, label=label, color=color)
        excess = [a - b for a, b in zip(profile["rates"].get("at_risk") or profile["rates"].get("train", []),
                                        profile["rates"].get("heldout_self") or profile["rates"].get("random", []))]
        if excess:
            ax.plot(sig, excess, color="black", linestyle="--", label="excess (at-risk − held-out)")
        if entry.get("band"):
            b = entry["band"]
            ax.axvspan(b["sigma_lo"], b["sigma_hi"], color="tab:red", alpha=0.12,
                       label=f"live band t∈[{b['t_begin']}, {b['t_end']})")
        if entry.get("curvature"):
            twin = ax.twinx()
            twin.plot(sig, entry["curvature"], color="tab:green", linestyle=":", label="curvature difference Δh")
            twin.set_ylabel("Δh (live − baseline)", fontsize=7)
            twin.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("σ the probes start from")
        state = "on" if entry["active"] else "off"
        ax.set_title(f"Live, step {entry['step']}: copy rate {entry['copy_rate']:.2f}, excess {entry['excess']:.2f},"
                     f" band {state}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return fig
