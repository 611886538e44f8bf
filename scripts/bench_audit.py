"""Score ``mnemoguard audit`` on ``mnemoguard bench`` runs (recipes/bench/audit.yaml), against their ground truth.

For each run folder (``mnemoguard bench recipes/bench/audit.yaml --out RUN``): audits ``RUN/train/checkpoint-*``
with ``RUN/train/final`` as the base, ``RUN/testbed/train`` as the data and ``RUN/testbed/held_out`` as held-out
images, then reports

* the recommended checkpoint vs the oracle (the first checkpoint whose ground truth has >= 5 % copies among the
  planted captions' generations at guidance 1) and the ground truth at the recommended one;
* per-image detection, planted (duplicated) images vs plain ones (TPR at 1 % FPR: the largest TPR any threshold
  reaches with FPR <= 1 %), at the first checkpoint whose ground truth reaches
  10 % copies: AUC and TPR at 1 % FPR of each per-image signal (and of the data-only repeats count, for reference);
* the audit's cost per checkpoint (danger-zone measurement and per-image table, seconds).

Usage::

    python scripts/bench_audit.py /work/runs/audit_s0 [/work/runs/audit_s1 ...] --out outputs/bench_audit.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from mnemoguard.audit import AuditSettings, run_audit
from mnemoguard.evaluation.detection import roc_auc, tpr_at_fpr


def _gt(run: Path) -> dict[int, float]:
    bench = json.loads((run / "bench.json").read_text())
    return {c["step"]: c["ground_truth"]["w=1"]["planted"]["copy_fraction"]["fraction"] for c in bench["checkpoints"]}


def _kinds(run: Path) -> dict[str, str]:
    gt = json.loads((run / "testbed" / "ground_truth.json").read_text())
    return {str((run / "testbed" / f).resolve()): r["kind"] for r in gt["records"] for f in r["files"]}


def score_run(run: Path, out: Path, extra: list[str]) -> dict:
    checkpoints = sorted((run / "train").glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    settings = AuditSettings(base=str(run / "train" / "final"), checkpoints=[str(c) for c in checkpoints],
                             data=str(run / "testbed" / "train"), heldout=str(run / "testbed" / "held_out"),
                             out=str(out), device="cpu", overrides=extra)
    start = time.perf_counter()
    result = run_audit(settings, progress=False)
    wall = time.perf_counter() - start
    gt = _gt(run)
    oracle = next((s for s in sorted(gt) if gt[s] >= 0.05), None)
    rec = result.recommended
    kinds = _kinds(run)
    labels = np.array([kinds.get(str(Path(r.file).resolve())) == "global" for r in result.records])
    keep = np.array([kinds.get(str(Path(r.file).resolve())) in ("global", "plain") for r in result.records])
    at10 = next((s for s in sorted(gt) if gt[s] >= 0.10), None)
    row = next((r for r in result.rows if r["step"] == at10), None)
    detection = {}
    if row is not None and row.get("images"):
        im = row["images"]
        signals = {"self_return": np.array(im["self_return"]),
                   "generation (−log ratio)": -np.log(np.clip(np.array(im["generation_ratio"]), 1e-12, None)),
                   "wen first step": np.array(im["wen"]),
                   "repeats (data only)": np.array([r.repeats for r in result.records], dtype=float)}
        for name, s in signals.items():
            s, y = s[keep], labels[keep]
            detection[name] = {"auc": roc_auc(s, y), "tpr@1%fpr": tpr_at_fpr(s, y, 0.01, convention="last_below")}
    return {
        "run": str(run), "oracle": oracle, "recommended": rec["step"] if rec else None,
        "gt_at_recommended": gt.get(rec["step"]) if rec else None, "gt": gt,
        "verdicts": {r["step"]: r["verdict"] for r in result.rows},
        "copy_rate": {r["step"]: r["copy_rate"] for r in result.rows},
        "detection_step": at10, "positives": int(labels[keep].sum()), "negatives": int((~labels[keep]).sum()),
        "detection": detection, "images": len(result.records),
        "seconds": {"wall": wall, "setup": result.setup_seconds,
                    "danger_zone": float(np.mean([r["seconds"]["danger_zone"] for r in result.rows])),
                    "per_checkpoint": float(np.mean([r["seconds"]["total"] for r in result.rows]))},
        "cached": sum(bool(r.get("cached")) for r in result.rows), "checkpoints": len(result.rows),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="outputs/bench_audit.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="guard settings (--set of the audit)")
    p.add_argument("--name", default="audit", help="the audit's folder inside each run (default: audit)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    results = [score_run(Path(r), Path(r) / args.name, args.overrides) for r in args.runs]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=float))
    for r in results:
        print(f"{r['run']}: oracle {r['oracle']}, recommended {r['recommended']} (ground truth there "
              f"{r['gt_at_recommended']}), detection at step {r['detection_step']} "
              f"({r['positives']} planted vs {r['negatives']} plain), {r['seconds']['per_checkpoint']:.1f} s per "
              f"checkpoint ({r['images']} images)")
        for name, d in r["detection"].items():
            print(f"   {name:<26} AUC {d['auc']:.3f}  TPR@1%FPR {d['tpr@1%fpr']:.3f}")
        print("   verdicts", r["verdicts"])
        print("   copy rate", {k: round(v, 3) if math.isfinite(v) else v for k, v in r["copy_rate"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
