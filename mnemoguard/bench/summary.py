"""Several ``mnemoguard bench`` runs (seeds) side by side: one Markdown section and one figure.

    python scripts/summarize_bench.py outputs/bench_s0 outputs/bench_s1 outputs/bench_s2 --out docs/bench

Every cell gives the mean over the runs and, in brackets, each run's value, so the spread between seeds is visible.
The guard monitor's curves (``bench.json["monitor"]``, when the runs had ``train.monitor_every``) are read against
the ground truth: the *onset* is the first checkpoint where the planted captions' memorized fraction at w = 1 reaches
``onset_fraction`` (5 %), and each monitor signal's *alarm* is the first check where its contrast (training probes −
unseen probes, oriented so that positive = more memorized) exceeds ``rise_factor`` times its first absolute value
for ``patience`` consecutive checks (the rule shape of :class:`~mnemoguard.callbacks.policy.Rule`); the lead is
onset − alarm, in optimizer steps.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

__all__ = ["alarm_step", "load_runs", "onset_step", "summary_markdown", "plot_summary"]


def load_runs(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """The ``bench.json`` of each run directory (in the order given)."""
    runs = []
    for d in dirs:
        path = Path(d) / "bench.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d}: expected a finished bench run with bench.json, found none")
        runs.append(json.loads(path.read_text()))
    return runs


def _cell(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    each = ", ".join(f"{scale * v:.{digits}f}" for v in values if v is not None)
    return f"{scale * statistics.fmean(vals):.{digits}f} ({each})"


def onset_step(run: dict[str, Any], fraction: float = 0.05, w: str = "w=1") -> int | None:
    """First checkpoint step where the planted captions' memorized fraction at ``w`` reaches ``fraction``."""
    for cp in run["checkpoints"]:
        if cp["ground_truth"][w]["planted"]["memorized_fraction"]["fraction"] >= fraction:
            return cp["step"]
    return None


def alarm_step(history: list[dict[str, Any]], key: str, rise_factor: float = 2.0, patience: int = 1) -> int | None:
    """First monitor step where ``key`` exceeds ``rise_factor`` x |its first value| for ``patience`` checks."""
    points = [(h["step"], h[key]) for h in history if key in h and h[key] is not None]
    if not points:
        return None
    level = rise_factor * abs(points[0][1])
    run = 0
    for step, value in points[1:]:
        run = run + 1 if value > level else 0
        if run >= patience:
            return step
    return None


def _contrast_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = {k for r in runs for h in r.get("monitor", []) for k in h if k.endswith("/contrast")}
    return sorted(keys)


def summary_markdown(runs: list[dict[str, Any]], figure: str | None = None, onset_fraction: float = 0.05,
                     rise_factor: float = 2.0, patience: int = 3) -> str:
    """The multi-seed section for ``BENCHMARKS.md``."""
    seeds = [r["seed"] for r in runs]
    lines = [f"### {len(runs)} seeds ({', '.join(map(str, seeds))}): mean (per seed)", "",
             "Commands: " + "; ".join(f"`{r['command']}`" for r in runs) + ".", "",
             "Wall time (s): " + _cell([r["timing"].get("total") for r in runs], digits=0)
             + f"; torch threads {runs[0].get('torch_threads')}.", ""]
    # Ground truth.
    steps = [c["step"] for c in runs[0]["checkpoints"]]
    ws = list(runs[0]["checkpoints"][0]["ground_truth"])
    groups = [g for g in ("planted", "unseen", "held_out") if g in runs[0]["checkpoints"][0]["ground_truth"][ws[0]]]
    ns = {g: runs[0]["checkpoints"][0]["ground_truth"][ws[0]][g]["memorized_fraction"]["n"] for g in groups}
    lines += ["Ground truth, memorized fraction in % (" + ", ".join(f"{g}: n = {ns[g]} generations" for g in groups)
              + " per seed):", "", "| step | w | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for i, step in enumerate(steps):
        for w in ws:
            cells = [_cell([r["checkpoints"][i]["ground_truth"][w][g]["memorized_fraction"]["fraction"]
                            for r in runs if i < len(r["checkpoints"])], 100, 1) for g in groups]
            lines.append(f"| {step} | {w.removeprefix('w=')} | " + " | ".join(cells) + " |")
    # Detection at the last checkpoint and the best checkpoint.
    names = list(runs[0]["checkpoints"][-1]["detection"])
    lines += ["", f"Detection (planted vs unseen + held-out captions) at the last checkpoint (step {steps[-1]}) and "
              "each signal's best checkpoint:", "",
              "| signal | AUC, last | TPR@1%FPR, last | AUC (copied only), last | best AUC over checkpoints |",
              "|---|---|---|---|---|"]
    for name in names:
        last = [r["checkpoints"][-1]["detection"][name] for r in runs]
        best = [max((c["detection"][name].get("auc") or 0.0) for c in r["checkpoints"]) for r in runs]
        lines.append(f"| {name} | {_cell([d.get('auc') for d in last])} | {_cell([d.get('tpr@1%fpr') for d in last])}"
                     f" | {_cell([d.get('auc_copied_vs_negatives') for d in last])} | {_cell(best)} |")
    # Training-loss gap per band (the bench's own held-out vs planted pairs, each with its own caption).
    if all("gap" in c["loss_by_band"] for r in runs for c in r["checkpoints"]):
        bands = runs[0]["checkpoints"][0]["loss_by_band"]["bands"]
        lines += ["", "Training-loss gap per noise band, held-out − planted (image, own caption) pairs, training MSE "
                  "(positive = the planted pairs are fitted better):", "",
                  "| step | " + " | ".join(f"t∈[{b[0]},{b[1]})" for b in bands) + " |", "|---|" + "---|" * len(bands)]
        for i, step in enumerate(steps):
            cells = [_cell([r["checkpoints"][i]["loss_by_band"]["gap"][j] for r in runs if i < len(r["checkpoints"])],
                           digits=3) for j in range(len(bands))]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    # Localisation.
    if all(r.get("localization") for r in runs):
        maps = list(runs[0]["localization"]["metrics"])
        lines += ["", "Localisation at the last checkpoint (template captions): pixel AUROC against the stamp, and "
                  "constraint-border AUROC (0.5 = the map ignores the constant border):", "",
                  "| map | pixel AUROC | best global IoU | constraint AUROC |", "|---|---|---|---|"]
        for m in maps:
            ms = [r["localization"]["metrics"][m] for r in runs]
            cells = [_cell([x.get(k) for x in ms]) for k in ("pixel_auroc", "best_global_iou", "constraint_auroc")]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    # Danger zone.
    if all(r.get("danger_zone") for r in runs):
        dz = runs[0]["danger_zone"]
        kinds = list(dz["memorization_rate"])
        lines += ["", "Danger zone: memorization rate of training images noised to σ and denoised back (w = 1):", "",
                  "| start t | σ | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for k, (ts, s) in enumerate(zip(dz["start_timesteps"], dz["start_sigmas"])):
            cells = [_cell([r["danger_zone"]["memorization_rate"][kd][k] for r in runs]) for kd in kinds]
            lines.append(f"| {ts} | {s:.3f} | " + " | ".join(cells) + " |")
        bands = ["empty" if r["danger_zone"]["band"]["empty"] else
                 f"σ {r['danger_zone']['band']['sigma_lo']:.3g}..{r['danger_zone']['band']['sigma_hi']:.3g}"
                 for r in runs]
        lines += ["", "W_σ / C_σ band per seed: " + "; ".join(bands) + "."]
    # Monitor lead.
    keys = _contrast_keys(runs)
    if keys:
        onsets = [onset_step(r, onset_fraction) for r in runs]
        lines += ["", f"Guard monitor vs ground truth: onset = first checkpoint with ≥ {100 * onset_fraction:g} % "
                  f"planted generations memorized at w = 1 (per seed: {onsets}); alarm = first check where the "
                  f"contrast (training − unseen probes) exceeds {rise_factor:g} × its first |value| for {patience} "
                  "consecutive checks; lead = onset − alarm (positive = the alarm came first).", "",
                  "| monitor signal | alarm step (per seed) | lead in steps (per seed) | contrast at the last check |",
                  "|---|---|---|---|"]
        for key in keys:
            alarms = [alarm_step(r.get("monitor", []), key, rise_factor, patience) for r in runs]
            leads = [None if a is None or o is None else o - a for a, o in zip(alarms, onsets)]
            last = [next((h[key] for h in reversed(r.get("monitor", [])) if key in h), None) for r in runs]
            lines.append(f"| `{key}` | {alarms} | {leads} | {_cell(last, digits=3)} |")
    if figure:
        lines += ["", f"![summary]({figure})"]
    return "\n".join(lines) + "\n"


def plot_summary(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Ground truth at w = 1 per seed (left) and the monitor's contrast curves per band (right), on one step axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = [k for k in _contrast_keys(runs) if "/agc/" not in k]
    signals = sorted({k.split("/")[1] for k in keys})
    fig, ax = plt.subplots(1, 1 + len(signals), figsize=(5 * (1 + len(signals)), 4), squeeze=False)
    a = ax[0][0]
    for k, r in enumerate(runs):
        steps = [c["step"] for c in r["checkpoints"]]
        for group, style in (("planted", "-"), ("unseen", "--"), ("held_out", ":")):
            if group in r["checkpoints"][0]["ground_truth"]["w=1"]:
                frac = [c["ground_truth"]["w=1"][group]["memorized_fraction"]["fraction"] for c in r["checkpoints"]]
                a.plot(steps, frac, style, color=f"C{k}", marker="o", ms=3, label=f"seed {r['seed']} {group}")
    a.set(title="ground truth at w = 1: memorized fraction", xlabel="step", ylim=(-0.02, 1))
    a.legend(fontsize=6)
    for j, sig in enumerate(signals):
        b = ax[0][1 + j]
        for key in (k for k in keys if k.split("/")[1] == sig):
            band = key.split("/")[2]
            for k, r in enumerate(runs):
                pts = [(h["step"], h[key]) for h in r.get("monitor", []) if key in h]
                style = {"band=low": "-", "band=mid": "--", "band=high": ":"}.get(band, "-.")
                b.plot(*zip(*pts), style, color=f"C{k}", label=f"seed {r['seed']} {band}" if pts else None)
        b.axhline(0, color="grey", lw=0.8)
        b.set(title=f"monitor: {sig} contrast (train − unseen)", xlabel="step")
        b.legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
