"""Writes the benchmark's outputs: ``bench.json`` (every number), PNG figures (matplotlib, Agg) and ``bench.md`` (a
Markdown section with tables, image links, the exact command and seed, ready to paste into ``BENCHMARKS.md``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..serialization import to_jsonable

__all__ = [
    "FIGURES",
    "MARKDOWN_FILE",
    "RESULTS_FILE",
    "markdown",
    "plot_danger_zone",
    "plot_localization",
    "plot_onset",
    "write_report",
]

RESULTS_FILE, MARKDOWN_FILE = "bench.json", "bench.md"
FIGURES = {"onset": "onset.png", "danger_zone": "danger_zone.png", "localization": "localization.png"}
GROUP_STYLE = {"planted": "-", "unseen": "--", "held_out": ":"}


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``bench.json``, the figures and ``bench.md`` in ``out_dir``; returns the paths written by name."""
    out = Path(out_dir)
    paths = {"json": out / RESULTS_FILE, "markdown": out / MARKDOWN_FILE}
    paths["json"].write_text(json.dumps(to_jsonable(results, finite=True), indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg", force=False)
    if results.get("checkpoints"):
        paths["onset"] = plot_onset(results, out / FIGURES["onset"])
    if results.get("danger_zone"):
        paths["danger_zone"] = plot_danger_zone(results["danger_zone"], out / FIGURES["danger_zone"])
    if results.get("localization"):
        paths["localization"] = plot_localization(results["localization"], out / FIGURES["localization"])
    paths["markdown"].write_text(markdown(results, {k: p.name for k, p in paths.items()}))
    return paths


def _fig(nrows: int, ncols: int, size: tuple[float, float]):
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=size, squeeze=False)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_onset(results: dict[str, Any], path: Path) -> Path:
    """Ground-truth memorized fraction, every signal's AUC and the per-band loss gap over training steps."""
    cps = results["checkpoints"]
    steps = [c["step"] for c in cps]
    fig, ax = _fig(1, 3, (16, 4.5))
    a = ax[0][0]
    for k, w in enumerate(cps[0]["ground_truth"]):
        colour = f"C{k}"
        for group, style in GROUP_STYLE.items():
            if group not in cps[0]["ground_truth"][w]:
                continue
            mf = [c["ground_truth"][w][group]["memorized_fraction"] for c in cps]
            a.plot(steps, [m["fraction"] for m in mf], style, color=colour, marker="o", label=f"{group}, {w}")
            if group == "planted":
                a.fill_between(steps, [m["low"] for m in mf], [m["high"] for m in mf], color=colour, alpha=0.15)
    a.set(title="ground truth: memorized fraction (d1/d2 < 1/3)", xlabel="step", ylabel="fraction", ylim=(-0.02, 1))
    a.legend(fontsize=7)
    b = ax[0][1]
    if cps[0]["detection"]:
        for k, name in enumerate(cps[0]["detection"]):
            aucs = [c["detection"][name].get("auc", math.nan) for c in cps]
            b.plot(steps, aucs, marker="o", color=f"C{k % 10}", linestyle="-" if k < 10 else "--", label=name)
        b.axhline(0.5, color="grey", lw=0.8)
        b.set(title="signals: AUC planted vs unseen/held-out", xlabel="step", ylabel="AUC", ylim=(0, 1.02))
    else:  # signals.enabled=false: prompt fidelity of the never-trained captions instead
        for k, w in enumerate(cps[0].get("fidelity", {})):
            b.plot(steps, [c["fidelity"][w].get("negatives", math.nan) for c in cps], marker="o", color=f"C{k}",
                   label=f"unseen + held-out, {w}")
        b.set(title="prompt fidelity (classifier agrees with the caption)", xlabel="step", ylabel="fraction",
              ylim=(0, 1.02))
    b.legend(fontsize=7)
    c = ax[0][2]
    bands = cps[0]["loss_by_band"].get("bands", [])
    for j, band in enumerate(bands):
        gaps = [cp["loss_by_band"].get("gap", [math.nan] * len(bands))[j] for cp in cps]
        c.plot(steps, gaps, marker="o", label=f"t in [{band[0]}, {band[1]})")
    c.axhline(0, color="grey", lw=0.8)
    c.set(title="training-loss gap per band (held-out − planted)", xlabel="step", ylabel="MSE gap")
    c.legend(fontsize=7)
    return _save(fig, path)


def plot_danger_zone(dz: dict[str, Any], path: Path) -> Path:
    """W_σ and C_σ of the training data beside the per-noise-level memorization rate, the band shaded."""
    fig, ax = _fig(1, 1, (7, 4.5))
    a = ax[0][0]
    a.plot(dz["sigmas"], dz["max_posterior_weight"], label="W_σ (max posterior weight)")
    a.plot(dz["sigmas"], dz["coverage"], label="C_σ (shell coverage)")
    for k, (kind, rates) in enumerate(dz["memorization_rate"].items()):
        a.plot(dz["start_sigmas"], rates, "o--", color=f"C{k + 2}", label=f"memorized from σ: {kind} images")
    band = dz["band"]
    if not band["empty"]:
        a.axvspan(band["sigma_lo"], band["sigma_hi"], color="red", alpha=0.1, label="danger zone")
    a.set(xscale="log", xlabel="σ (VE-equivalent noise level)", ylabel="value / rate", ylim=(-0.02, 1.02),
          title="danger zone of the training data")
    a.legend(fontsize=7)
    return _save(fig, path)


def plot_localization(loc: dict[str, Any], path: Path) -> Path:
    """A few template captions: generation, template mask, and every map (colour scale shared per map type)."""
    import numpy as np

    ex = loc["examples"]
    names = list(ex["maps"])
    n = len(ex["images"])
    fig, ax = _fig(max(n, 1), len(names) + 2, (1.7 * (len(names) + 2), 1.8 * max(n, 1)))
    for r in range(n):
        ax[r][0].imshow(np.asarray(ex["images"][r]), cmap="gray", vmin=0, vmax=1)
        ax[r][1].imshow(np.asarray(loc["template_mask"], dtype=float), cmap="gray", vmin=0, vmax=1)
        for k, name in enumerate(names):
            stack = np.asarray(ex["maps"][name], dtype=float)
            ax[r][k + 2].imshow(stack[r], cmap="magma", vmin=float(stack.min()), vmax=float(stack.max()) or 1)
    for k, title in enumerate(["generation", "template mask", *names]):
        ax[0][k].set_title(title, fontsize=8)
    for row in ax:
        for a in row:
            a.set_xticks([])
            a.set_yticks([])
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------------ markdown
def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _frac(m: dict[str, Any]) -> str:
    return f"{100 * m['fraction']:.1f} % [{100 * m['low']:.1f}, {100 * m['high']:.1f}] (n={m['n']})"


def markdown(results: dict[str, Any], files: dict[str, str]) -> str:
    """The Markdown section: set-up, ground truth, detection, localisation, danger zone, loss gap, figures."""
    cfg, t = results["config"], results["timing"]
    counts = results["testbed"]["counts"]
    lines = [
        f"## mnemoguard bench — seed {results['seed']}",
        "",
        f"Command: `{results['command']}` (seed {results['seed']}).",
        "",
        f"Testbed: {counts.get('train_rows')} training rows at {results['testbed']['resolution']} px: "
        f"{counts.get('plain_images', 0)} plain images, {counts.get('global_images', 0)} planted images × "
        f"{cfg['testbed']['duplicated']['copies']} copies, {counts.get('template_images', 0)} template images; "
        f"{counts.get('held_out_captions', 0)} held-out images, {counts.get('unseen_global_captions', 0)} unseen "
        "global-style captions.",
        f"Training: {results['steps']} steps, lr {cfg['train']['learning_rate']:g}, batch "
        f"{cfg['train']['train_batch_size']}, EMA on, evaluated every {cfg['train']['eval_every']} steps.",
        f"Wall time: total {_f(t.get('total'), 0)} s = testbed {_f(t.get('build_testbed'), 0)} s + training "
        f"{_f(t.get('training'), 0)} s + evaluation {_f(t.get('evaluation'), 0)} s + report "
        f"{_f(t.get('report'), 0)} s ({results.get('torch_threads')} torch threads).",
        "",
    ]
    cps = results["checkpoints"]
    if cps:
        lines += ["### Ground truth over training",
                  "",
                  "Memorized fraction: d1/d2 < 1/3 (Gu et al.) and, for planted captions, the nearest training "
                  "image is the caption's own; 95 % percentile-bootstrap interval. Negatives count any copy.",
                  "",
                  "Fidelity: share of the unseen and held-out captions' generations that a pixel classifier "
                  "fitted on the training images assigns to the class the caption names.",
                  "",
                  "| step | w | planted | unseen | held-out | median d1/d2 planted / unseen | fidelity |",
                  "|---|---|---|---|---|---|---|"]
        for c in cps:
            for w, g in c["ground_truth"].items():
                cells = [_frac(g[k]["memorized_fraction"]) if k in g else "n/a"
                         for k in ("planted", "unseen", "held_out")]
                med = " / ".join(_f(g[k]["median_ratio"], 2) for k in ("planted", "unseen") if k in g)
                fid = c.get("fidelity", {}).get(w, {}).get("negatives")
                fid_cell = "n/a" if fid is None else f"{100 * fid:.1f} %"
                lines.append(f"| {c['step']} | {w.removeprefix('w=')} | {' | '.join(cells)} | {med} | {fid_cell} |")
        last = cps[-1]
        groups = results["probes"]["groups"]
        n_pos, n_neg = groups.count("planted"), len(groups) - groups.count("planted")
        lines += ["", f"### Detection at step {last['step']}", "",
                  f"Planted captions ({n_pos}) vs unseen and held-out captions ({n_neg}), one generation each. "
                  "Passes: network forward passes per caption at batch 1 (CFG call = 2, VJP ≈ 2); wall time for all "
                  "captions (trajectory shares pro-rated).", "",
                  "AUC (copied): only the planted captions whose own image came out at w = 1 (in any seed) as "
                  "positives.", "",
                  "| signal | AUC | TPR@1%FPR | TPR@3%FPR | AUC (copied) | passes / caption | wall s | what |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, d in last["detection"].items():
            copied = f"{_f(d['auc_copied_vs_negatives'])} ({d['num_copied']})" if "num_copied" in d else "n/a"
            lines.append(f"| {name} | {_f(d.get('auc'))} | {_f(d.get('tpr@1%fpr'), 2)} | {_f(d.get('tpr@3%fpr'), 2)} "
                         f"| {copied} | {d['passes']:g} | {_f(d['seconds'], 2)} | {d['note']} |")
        lines += ["", "AUC over checkpoints:", "",
                  "| signal | " + " | ".join(str(c["step"]) for c in cps) + " |",
                  "|---|" + "---|" * len(cps)]
        for name in last["detection"]:
            lines.append(f"| {name} | " + " | ".join(_f(c["detection"][name].get("auc")) for c in cps) + " |")
        bands = last["loss_by_band"].get("bands", [])
        if "gap" in last["loss_by_band"]:
            lines += ["", "Training-loss gap per noise band (held-out − planted pairs, the training MSE: of ε for "
                      "DDPM models, of the velocity for flow models; positive = the planted pairs are fitted "
                      "better):", "",
                      "| step | " + " | ".join(f"t∈[{b[0]},{b[1]})" for b in bands) + " |",
                      "|---|" + "---|" * len(bands)]
            for c in cps:
                lines.append(f"| {c['step']} | " + " | ".join(_f(g, 4) for g in c["loss_by_band"]["gap"]) + " |")
    loc = results.get("localization")
    if loc:
        lines += ["", f"### Localisation (template captions, {len(loc['captions'])} maps, t = {loc['timestep']}, "
                      f"w = {loc['guidance']:g})", "",
                  "Pixel AUROC and best IoU (Kim & Lee sweep) against the template square. Constraint: AUROC of "
                  "border pixels against interior pixels outside the stamp (0.5 = ignores the border), and the "
                  "share of map mass on the border beside the border's share of pixels.", "",
                  "| map | pixel AUROC | best gIoU | best mIoU | constraint AUROC | border mass / area | passes | "
                  "wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, m in loc["metrics"].items():
            border = f"{_f(m.get('constraint_mass'), 2)} / {_f(m.get('constraint_area'), 2)}"
            lines.append(f"| {name} | {_f(m['pixel_auroc'])} | {_f(m['best_global_iou'])} | {_f(m['best_mean_iou'])} "
                         f"| {_f(m.get('constraint_auroc'))} | {border} | {m['passes']:g} | {_f(m['seconds'], 2)} |")
        tv = loc.get("template_verbatim", {})
        if tv:
            lines += ["", "Template-verbatim rate (masked MSE under the stamp below Kim & Lee's threshold, rescaled): "
                      + "; ".join(f"{g}: " + ", ".join(f"{w} {100 * v:.0f} %" for w, v in r.items())
                                  for g, r in tv.items()) + "."]
    dz = results.get("danger_zone")
    if dz:
        b = dz["band"]
        band = "empty" if b["empty"] else (f"σ ∈ [{_f(b['sigma_lo'])}, {_f(b['sigma_hi'])}], timesteps "
                                           f"{b['t_lo']}..{b['t_hi']}")
        kinds = list(dz["memorization_rate"])
        lines += ["", "### Danger zone", "",
                  f"Curves over {dz['num_train_rows']} training rows (duplicates included); band (W_σ ≥ 0.5 and "
                  f"C_σ ≥ 0.5): {band}. Memorization rate of training images noised to σ and denoised back (w = 1):",
                  "", "| start t | σ | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for k, (ts, s) in enumerate(zip(dz["start_timesteps"], dz["start_sigmas"])):
            lines.append(f"| {ts} | {_f(s)} | " + " | ".join(_f(dz['memorization_rate'][kd][k], 2) for kd in kinds)
                         + " |")
    figures = [k for k in FIGURES if k in files]
    if figures:
        lines += [""] + [f"![{k}]({files[k]})" for k in figures]
    return "\n".join(lines) + "\n"
