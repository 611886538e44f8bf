"""Variants of the live danger-zone measurement replayed on the saved checkpoints of ``mnemoguard bench`` runs.

Each variant is a set of guard settings (``--variant NAME:KEY=VALUE,KEY=VALUE``); on every run folder
(``mnemoguard bench recipes/bench/audit.yaml --out RUN``, a full checkpoint every 400 steps, ground truth at each) the
tracker measures every checkpoint with them, through ``mnemoguard audit`` without its per-image table, and its
band decision is replayed in step order. Per run and variant: the network rows per measurement (counted by the
adapter), the first checkpoint where the band is on, the first where the copy rate exceeds 5 % (today's stop rule)
and the first where its one-sided 95 % Wilson lower bound does, against the oracle (the first checkpoint whose ground
truth has >= 5 % copies among the planted captions' generations at guidance 1) and the ground truth there.

The base settings emulate the live guard (the audit's own defaults measure more): 4 at-risk probes, 10 sampler steps,
a reference pool of 64 training images besides the probes.

Usage::

    python scripts/bench_dz_variants.py RUN [RUN ...] --out outputs/dz_variants.json \\
        --variant today: --variant one_step:danger_zone.return_steps=1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mnemoguard.audit import AuditSettings, run_audit
from mnemoguard.config.danger_zone import COPY_LEVEL, DangerZoneConfig

_LIVE = DangerZoneConfig()  # the live guard's measurement (the audit pins the multi-step protocol of its own figures)
GUARD = ["monitor.num_duplicate_probes=4", "monitor.nearest_pool_size=64", "danger_zone.num_inference_steps=10",
         *(f"danger_zone.{k}={getattr(_LIVE, k)}" for k in ("return_steps", "draws", "copy_draws_max"))]
LIMIT = COPY_LEVEL  # the default stop's level


def _gt(run: Path) -> dict[int, float]:
    bench = json.loads((run / "bench.json").read_text())
    return {c["step"]: c["ground_truth"]["w=1"]["planted"]["copy_fraction"]["fraction"] for c in bench["checkpoints"]}


def _first(rows: list[dict], test) -> int | None:
    return next((r["step"] for r in rows if test(r)), None)


def score(run: Path, name: str, overrides: list[str]) -> dict:
    checkpoints = sorted((run / "train").glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    settings = AuditSettings(base=str(run / "train" / "final"), checkpoints=[str(c) for c in checkpoints],
                             data=str(run / "testbed" / "train"), heldout=str(run / "testbed" / "held_out"),
                             out=str(run / f"dz_{name}"), device="cpu", per_image=False,
                             overrides=[*GUARD, *overrides])
    start = time.perf_counter()
    result = run_audit(settings, progress=False)
    gt = _gt(run)
    rows = sorted(result.rows, key=lambda r: r["step"])
    stop_level = _first(rows, lambda r: r["copy_rate"] > LIMIT)
    stop_bound = _first(rows, lambda r: r["copy_rate_lower"] > LIMIT)
    return {
        "run": str(run), "variant": name, "overrides": overrides, "seconds": time.perf_counter() - start,
        "rows": sorted({int(r["rows"]) for r in rows}),
        "oracle": next((s for s in sorted(gt) if gt[s] >= LIMIT), None),
        "band_on": _first(rows, lambda r: r["active"]),
        "stop_level": stop_level, "gt_at_stop_level": gt.get(stop_level),
        "stop_bound": stop_bound, "gt_at_stop_bound": gt.get(stop_bound),
        "per_checkpoint": [{"step": r["step"], "gt": gt.get(r["step"]), "excess": r["excess"], "active": r["active"],
                            "copy_rate": r["copy_rate"], "copy_rate_lower": r["copy_rate_lower"]} for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--variant", action="append", required=True, help="NAME:KEY=VALUE,KEY=VALUE (empty: the base)")
    p.add_argument("--out", default="outputs/dz_variants.json")
    p.add_argument("--on-levels", default="0.5,0.35", help="band-on steps at these on-levels too (the first "
                   "checkpoint whose excess reaches it: the band's first turn-on does not depend on the release)")
    p.add_argument("--rescore", action="store_true", help="print the tables of --out again, measuring nothing")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    variants = []
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        variants.append((name, [kv for kv in rest.split(",") if kv]))
    if args.rescore:
        results = json.loads(Path(args.out).read_text())
    else:
        results = [score(Path(run), name, overrides) for run in args.runs for name, overrides in variants]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=float))
    levels = [float(x) for x in args.on_levels.split(",") if x]
    print("| run | variant | rows | oracle | " + " | ".join(f"band on, excess ≥ {x:g}" for x in levels)
          + " | stop: rate > 5 % (GT) | stop: bound > 5 % (GT) |")
    print("|---|---|---:|---:|" + "---:|" * len(levels) + "---:|---:|")
    for r in results:
        def at(step, gt):
            return "none" if step is None else f"{step} ({100 * gt:.1f} %)"
        on = [_first(r["per_checkpoint"], lambda c, x=x: c["excess"] >= x) for x in levels]
        print(f"| {Path(r['run']).name} | {r['variant']} | {'/'.join(map(str, r['rows']))} | {r['oracle']} | "
              + " | ".join("none" if s is None else str(s) for s in on)
              + f" | {at(r['stop_level'], r['gt_at_stop_level'])} | {at(r['stop_bound'], r['gt_at_stop_bound'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
