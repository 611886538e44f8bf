"""``report.md``: the summary, readable."""

from __future__ import annotations

import json
from typing import Any

from ...serialization import to_jsonable

__all__ = ["render_markdown"]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


VERDICTS = {
    "memorized": "a probe generation copies its own training image (nearest-neighbour ratio d1/d2 below the "
                 "threshold, Gu et al.)",
    "suspect": "no copy seen, but a training probe stands out: its gap or loss is beyond every held-out probe's by "
               "the report's factor, or the low-loss flags flagged its row repeatedly; look at it before you ship",
    "ok": "no probe copies its image and none stands out from the held-out probes",
    "ok_no_heldout": "no probe copies its image (there are no held-out probes to compare the training probes with: "
                     "give guard.monitor.heldout_data or heldout_captions)",
    "unknown": "no check ran, so there is nothing to judge",
    "diverged": "the loss or a gradient became NaN / infinite and the run stopped; the export is the last checkpoint "
                "saved before it",
}


def _header(summary: dict[str, Any]) -> list[str]:
    run, exported, last = summary["run"], summary["exported"], summary["last_step"]
    lines = ["# Memorization report", ""]
    if summary["status"] != "complete":
        lines += [f"> **This report is incomplete: the run is {summary['status']}.**", ""]
    what = f"{exported.get('source', 'last')} weights" + (f", step {exported['step']}" if exported.get("step") else "")
    meaning = VERDICTS[summary["verdict"]]
    mon = summary.get("monitor")
    if summary["verdict"] == "ok" and mon is not None and "heldout" not in mon["splits"]:
        meaning = VERDICTS["ok_no_heldout"]
    lines += [f"**Verdict: {summary['verdict']}** (about the exported {what}): {meaning}.", ""]
    if exported.get("source", "last") != "last" or last["verdict"] != exported["verdict"]:
        lines += [f"At its last step ({last['step']}) the run saw: **{last['verdict']}**.", ""]
    lines += ["| | |", "|---|---|", f"| optimizer steps | {run['global_step']} / {run['max_steps']} |"]
    lines += [f"| stopped | {'at step ' + str(run['stop_step']) if run['stopped'] else 'no'} |"]
    if run["stop_reason"]:
        lines += [f"| stop reason | {run['stop_reason']} |"]
    lines += [f"| best step | {_fmt(run['best_step'])} ({_fmt(run['best_checkpoint'])}) |",
              f"| exported | {_fmt(run['exported'])} ({what}) |", ""]
    if summary["warnings"]:
        lines += ["## Warnings", "", *[f"- {w}" for w in summary["warnings"]], ""]
    return lines


def render_markdown(summary: dict[str, Any], plots: dict[str, str]) -> str:
    """``report.md`` from the summary."""
    lines = _header(summary)
    if summary.get("watched"):
        lines += ["## What the decisions watched", ""]
        for w in summary["watched"]:
            levels = ", ".join(f"{k} {_fmt(v)}" for k, v in w["levels"].items()) or "no level yet"
            lines.append(f"- `{w['signal']}`, by {w['by']}: {levels}")
        if "watched" in plots:
            lines += ["", f"![watched]({plots['watched']})"]
        lines += [""]
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
        checks = f"{mon['checks']} check{'' if mon['checks'] == 1 else 's'}"
        sig = mon.get("band_sigmas", {})
        def sigma(v: Any) -> str:  # None: not finite in the JSON summary (flow matching's σ = 1 is σ/α = ∞)
            return "∞" if v is None else f"{v:.3g}"

        bands = ", ".join(f"{k} = levels [{v[0]}, {v[1]})" + (f" (σ {sigma(sig[k][0])}–{sigma(sig[k][1])})"
                                                               if k in sig else "") for k, v in mon["bands"].items())
        lines += [f"Baseline `{mon['config']['baseline']}`, {checks} every {mon['config']['every_n_steps']} steps; "
                  f"bands {bands}. Bands are never averaged together."]
        if "heldout" in mon["splits"]:
            lines[-1] += (" The contrast is oriented so that positive means the training probes look more "
                          "memorized than the held-out ones: training minus held-out for the gaps, held-out minus "
                          "training for the probe loss (a memorized pair has a lower loss).")
        else:
            lines[-1] += " There are no held-out probes, so there is no train / held-out contrast."
        lines += [""]
        if last is not None:
            splits = [*mon["splits"], *(["contrast"] if "heldout" in mon["splits"] else [])]
            lines += [f"Last check (step {last['step']}):", "",
                      "| signal | band | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
            for sig in mon["signals"]:
                for band in mon["bands"]:
                    vals = [_fmt(last["metrics"].get(f"mem/{sig}/band={band}/{s}")) for s in splits]
                    lines.append(f"| {sig} | {band} | " + " | ".join(vals) + " |")
        for sig, why in mon.get("caveats", {}).items():
            lines += ["", f"Note: the `{sig}` contrast is {why}."]
        for sig in mon["signals"]:
            if sig in plots:
                lines += ["", f"![{sig}]({plots[sig]})"]
    dz = summary.get("danger_zone")
    if dz is not None:
        lines += ["", "## Danger zone", "",
                  "Where in the noise schedule the model memorizes. *Data prior* (Dodson et al.): the noise levels "
                  "where the training data's posterior is still concentrated on one image while held-out images are "
                  "covered by the training shells. *Live*: the monitor's at-risk probes noised to each level and "
                  "denoised back; the *excess* is how much more often they come back as themselves than held-out "
                  "images do; the *copy rate* is the share of generations from their captions that copy their "
                  "own training image.", ""]
        prior = dz.get("prior")
        if prior is not None:
            b = prior["band"]
            where = "empty" if b["empty"] else \
                f"σ {_fmt(b['sigma_lo'])}–{_fmt(b['sigma_hi'])} (t {b['t_lo']}–{b['t_hi']})"
            lines += [f"Data prior ({prior['rows']} rows, {prior['distinct']} distinct images, coverage of "
                      f"{prior['population']}): band {where}.", ""]
        if dz["measurements"]:
            lines += ["| step | excess | copy rate | held-out copy rate | band | noise-gap strength |",
                      "|---|---|---|---|---|---|"]
            for m in dz["measurements"]:
                band = m["band"]
                where = f"t [{band['t_begin']}, {band['t_end']})" if band else "off"
                lines.append(f"| {m['step']} | {_fmt(m['excess'])} | {_fmt(m['copy_rate'])} | "
                             f"{_fmt(m['heldout_copy_rate'])} | {where} | {_fmt(m['strength'])} |")
        if "danger_zone" in plots:
            lines += ["", f"![danger zone]({plots['danger_zone']})"]
    flags = summary.get("loss_flags")
    if flags is not None and mon is not None:
        lines += ["", "## Per-step loss flags", ""]
        if not flags["rows_known"]:
            lines += ["The per-step low-loss flags (IET-AGC's rule) counted flags per noise band only (see the flag "
                      "rates): the loop gave no dataset rows, so no training sample can be named. Pass "
                      "`indices=` to `guard.before_forward` to count them per sample."]
        else:
            lines += [f"{flags['flagged_rows']} training samples were flagged at least once (their loss fell below "
                      "their timestep's running mean / mem_ratio, IET-AGC's rule)."]
            if flags["top"]:
                lines += ["Most often flagged, as a share of the times each was trained on (dataset row: flagged / "
                          "seen): " + ", ".join(f"{r['row']}: {r['flagged']}/{r['seen']}" for r in flags["top"][:10])
                          + "."]
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
            lines += [f"### {key}", "", "```json", json.dumps(to_jsonable(value), indent=2), "```", ""]
    lines += ["", "Curves, alarms and verdicts in machine-readable form: `summary.json`.", ""]
    return "\n".join(lines)
