"""The audit's outputs in ``--out``: ``audit.csv``, ``images.csv``, ``report.md``, ``index.html`` (self-contained:
plots and thumbnails inline) and, with ``--tensorboard``, the curves as TensorBoard scalars.

Every file is rewritten whole from the result (atomically), so ``--watch`` appends a checkpoint by writing again.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any

import torch

from ..config.danger_zone import default_stop
from ..serialization import write_atomic
from .settings import AuditSettings

__all__ = ["IMAGE_SCORE", "image_ranking", "summary", "write_outputs"]

IMAGE_SCORE = "self_return"  # the per-image memorization score of images.csv (BENCHMARKS.md: chosen by measurement)
AUDIT_COLUMNS = ("step", "file", "verdict", "excess", "copy_rate", "copy_rate_lower", "heldout_copy_rate",
                 "band_sigma_lo", "band_sigma_hi", "band_t_begin", "band_t_end", "rows", "step_source", "format",
                 "seconds", "cached")
GALLERY = 8  # training images in the report's gallery


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _audit_rows(result: Any) -> list[dict[str, str]]:
    out = []
    for r in result.rows:
        band = r.get("band") or {}
        out.append({"step": str(r["step"]), "file": r["file"], "verdict": r["verdict"], "excess": _f(r["excess"]),
                    "copy_rate": _f(r["copy_rate"]), "copy_rate_lower": _f(r.get("copy_rate_lower")),
                    "heldout_copy_rate": _f(r.get("heldout_copy_rate")), "rows": _f(r.get("rows")),
                    "band_sigma_lo": _f(band.get("sigma_lo")), "band_sigma_hi": _f(band.get("sigma_hi")),
                    "band_t_begin": _f(band.get("t_begin")), "band_t_end": _f(band.get("t_end")),
                    "step_source": r["step_source"], "format": r["format"], "seconds": _f(r["seconds"]["total"], 2),
                    "cached": str(bool(r.get("cached"))).lower()})
    return out


def image_ranking(result: Any) -> list[int]:
    """Record indices, most memorized first: by the score at the last checkpoint with a per-image table."""
    last = next((r for r in reversed(result.rows) if r.get("images")), None)
    if last is None:
        return list(range(len(result.records)))
    score = last["images"][IMAGE_SCORE]
    return sorted(range(len(score)), key=lambda i: -score[i] if math.isfinite(score[i]) else math.inf)


def _csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


def _image_rows(result: Any) -> tuple[list[str], list[dict[str, str]]]:
    with_images = [r for r in result.rows if r.get("images")]
    header = ["rank", "file", "caption", "group", "repeats"]
    for r in with_images:
        header += [f"score@{r['step']}", f"ratio@{r['step']}", f"nearest@{r['step']}", f"wen@{r['step']}"]
    out = []
    for rank, i in enumerate(image_ranking(result), 1):
        rec = result.records[i]
        row = {"rank": str(rank), "file": rec.file, "caption": rec.caption, "group": str(result.groups[i]),
               "repeats": str(rec.repeats)}
        for r in with_images:
            im, s = r["images"], r["step"]
            row.update({f"score@{s}": _f(im[IMAGE_SCORE][i]), f"ratio@{s}": _f(im["generation_ratio"][i]),
                        f"nearest@{s}": result.records[im["nearest"][i]].file, f"wen@{s}": _f(im["wen"][i])})
        out.append(row)
    return header, out


def summary(result: Any) -> str:
    rec = result.recommended
    first_copy = next((r for r in result.rows if r["verdict"] == "copying"), None)
    first_rise = next((r for r in result.rows if r["verdict"] != "ok"), None)
    if not result.rows:
        return "No checkpoint could be measured."
    if rec is None:
        return (f"Every checkpoint copies its training images: the first measured, step {first_copy['step']}, "
                "already does. Keep none of these; train less (or with the guard).")
    if first_copy is None:
        rising = f" (the danger zone is rising from step {first_rise['step']})" if first_rise else ""
        return f"No checkpoint copies{rising}. Recommended: the last, step {rec['step']} ({rec['file']})."
    return (f"Copying from step {first_copy['step']} ({_f(first_copy['copy_rate'], 2)} of the at-risk generations "
            f"copy their training image). Recommended: step {rec['step']} ({rec['file']}), the last one before.")


def _report_md(result: Any, settings: AuditSettings) -> str:
    lines = ["# mnemoguard audit", "", f"**{summary(result)}**", "",
             f"Base `{settings.base}`, data `{settings.data or '(from the recipe / metadata)'}`, "
             f"held-out `{settings.heldout or '(random training rows stand in)'}`.", "",
             "| step | verdict | excess | copy rate | band σ | file |", "|---:|---|---:|---:|---|---|"]
    for r in result.rows:
        b = r.get("band")
        band = f"{b['sigma_lo']:.3g}–{b['sigma_hi']:.3g}" if b else ""
        lines.append(f"| {r['step']} | {r['verdict']} | {_f(r['excess'], 2)} | {_f(r['copy_rate'], 2)} | {band} | "
                     f"`{r['file']}` |")
    if result.failed:
        lines += ["", "Not measured:", ""] + [f"- `{p}`: {why}" for p, why in result.failed]
    ranked = image_ranking(result)[:20]
    last = next((r for r in reversed(result.rows) if r.get("images")), None)
    if last is not None:
        lines += ["", f"## Most reproduced training images (step {last['step']})", "",
                  "| rank | score | ratio | group | repeats | caption | file |", "|---:|---:|---:|---:|---:|---|---|"]
        for k, i in enumerate(ranked, 1):
            rec, im = result.records[i], last["images"]
            lines.append(f"| {k} | {_f(im[IMAGE_SCORE][i], 2)} | {_f(im['generation_ratio'][i], 2)} | "
                         f"{result.groups[i]} | {rec.repeats} | {rec.caption} | `{rec.file}` |")
    lines += ["", "Verdicts: *copying* = more than 5 % of the generations from the at-risk captions copy their "
              "training image (the guard's default stop rule); *rising* = the danger-zone band is on (at-risk images "
              "come back from noise more often than held-out ones); score = one-step self-return "
              "(−log distance ratio, 0 = as near its neighbours as itself)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- html
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb_png(image01: torch.Tensor, scale: int = 4) -> str:
    from PIL import Image

    x = (image01.clamp(0, 1) * 255).round().to(torch.uint8)
    x = x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)
    im = Image.fromarray(x.numpy())
    side = max(im.size)
    if side < 96:
        im = im.resize((im.size[0] * max(1, 96 // side), im.size[1] * max(1, 96 // side)), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _curves_figure(result: Any) -> Any:
    from matplotlib.figure import Figure

    steps = [r["step"] for r in result.rows]
    fig = Figure(figsize=(8, 3.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, [r["copy_rate"] for r in result.rows], marker="o", label="copy rate (at-risk generations)")
    ax.plot(steps, [r["copy_rate_lower"] for r in result.rows], marker=".", linestyle="--",
            label="its 95 % lower bound (the live stop watches it)")
    ax.plot(steps, [r["excess"] for r in result.rows], marker="s", label="danger-zone excess")
    limit = default_stop()["divergence_threshold"]
    ax.axhline(limit, color="tab:red", linestyle=":", label=f"stop threshold ({100 * limit:g} %)")
    for r in result.rows:
        if r["verdict"] != "ok":
            ax.axvline(r["step"], color="tab:red" if r["verdict"] == "copying" else "tab:orange", alpha=0.15, lw=6)
    if result.recommended:
        ax.axvline(result.recommended["step"], color="tab:green", label=f"recommended: {result.recommended['step']}")
    ax.set_xlabel("training step")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    return fig


def _index_html(result: Any, settings: AuditSettings) -> str:
    from ..callbacks.danger_zone.plot import danger_zone_figure

    colour = {"ok": "#2e7d32", "rising": "#ef6c00", "copying": "#c62828"}
    rec = result.recommended
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mnemoguard audit</title><style>",
             "body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px}"
             ".v{color:#fff;padding:1px 6px;border-radius:3px}.big{font-size:20px;padding:12px;border-radius:6px;"
             "background:#f4f4f4}.g td{text-align:center;vertical-align:top;font-size:11px}img{image-rendering:"
             "pixelated}</style></head><body><h1>mnemoguard audit</h1>",
             f"<p class='big'>{html.escape(summary(result))}</p>"]
    if rec is not None:
        parts.append(f"<p>Keep <b>step {rec['step']}</b>: <code>{html.escape(rec['file'])}</code></p>")
    if result.rows:
        parts.append(f"<h2>Across checkpoints</h2><img src='{_png(_curves_figure(result))}'>")
    parts.append("<table><tr><th>step</th><th>verdict</th><th>excess</th><th>copy rate</th><th>band σ</th>"
                 "<th>file</th></tr>")
    for r in result.rows:
        b = r.get("band")
        band = f"{b['sigma_lo']:.3g}–{b['sigma_hi']:.3g}" if b else ""
        parts.append(f"<tr><td>{r['step']}</td><td><span class='v' style='background:{colour[r['verdict']]}'>"
                     f"{r['verdict']}</span></td><td>{_f(r['excess'], 2)}</td><td>{_f(r['copy_rate'], 2)}</td>"
                     f"<td>{band}</td><td><code>{html.escape(r['file'])}</code></td></tr>")
    parts.append("</table>")
    for p, why in result.failed:
        parts.append(f"<p style='color:#c62828'>Not measured: <code>{html.escape(p)}</code>: {html.escape(why)}</p>")
    last = result.rows[-1] if result.rows else None
    if last is not None:
        fig = danger_zone_figure(result.prior, {**last, "curvature": None})
        if fig is not None:
            parts.append(f"<h2>Danger zone at step {last['step']}</h2><img src='{_png(fig)}'>")
    parts.append(_gallery(result))
    parts.append("<p style='font-size:12px;color:#666'>Written by <code>mnemoguard audit</code>; the tables are in "
                 "audit.csv and images.csv beside this file.</p></body></html>")
    return "".join(parts)


def _gallery(result: Any) -> str:
    steps = [r["step"] for r in result.rows if r["step"] in result.generations]
    if not steps:
        return ""
    out = ["<h2>Most reproduced training images, and what each checkpoint generates from their captions</h2>",
           "<table class='g'><tr><th>training image</th>" + "".join(f"<th>step {s}</th>" for s in steps) + "</tr>"]
    for i in image_ranking(result)[:GALLERY]:
        rec = result.records[i]
        own = result.pixels[i] if result.pixels is not None else None
        cell = f"<img src='{_thumb_png(own)}'><br>" if own is not None else ""
        out.append(f"<tr><td>{cell}{html.escape(rec.caption[:60])}<br>×{rec.repeats}</td>")
        for s in steps:
            row = next(r for r in result.rows if r["step"] == s)
            ratio = row["images"]["generation_ratio"][i] if row.get("images") else float("nan")
            mark = " style='outline:3px solid #c62828'" if math.isfinite(ratio) and ratio < 1 / 3 else ""
            out.append(f"<td><img{mark} src='{_thumb_png(result.generations[s][i])}'><br>ratio {_f(ratio, 2)}</td>")
        out.append("</tr>")
    out.append("</table><p style='font-size:12px'>Outlined: a copy (distance to the training image below a third of "
               "the distance to any other training image).</p>")
    return "".join(out)


def _tensorboard(result: Any, out: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    for r in result.rows:
        for name in ("copy_rate", "excess"):
            if math.isfinite(r[name]):
                writer.add_scalar(f"audit/{name}", float(r[name]), r["step"])
        writer.add_scalar("audit/copying", float(r["verdict"] == "copying"), r["step"])
    writer.close()


def write_outputs(result: Any, settings: AuditSettings) -> dict[str, Path]:
    """Write every output of ``result`` into ``settings.out``; returns the paths by name."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("audit.csv", "images.csv", "report.md", "index.html")}
    _csv(paths["audit.csv"], list(AUDIT_COLUMNS), _audit_rows(result))
    header, rows = _image_rows(result)
    _csv(paths["images.csv"], header, rows)
    write_atomic(paths["report.md"], _report_md(result, settings))
    write_atomic(paths["index.html"], _index_html(result, settings))
    if settings.tensorboard:
        _tensorboard(result, out)
    return paths
