"""The command behind :mod:`mnemoguard.bench.mitigation_summary`: its tables, from ``mnemoguard bench`` runs.

The mitigation table and early stopping vs the oracle, from ``mnemoguard bench`` runs of several arms and seeds.

    python scripts/summarize_mitigation.py outputs/mitigation/*_s? --out docs/bench

Each run's arm is its ``train.mitigation``; ``none`` of the same seed is its reference. At the last checkpoint:

* **memorized**: planted captions' generations that reproduce their training image (d1/d2 < 1/3), at w = 1 and at
  the users' guidance; ratio to the unmitigated run (target <= 1/10);
* **held-out loss**: the denoising loss of held-out image + caption pairs, mean over the noise bands (each band's
  loss at fixed noise draws); change relative to the unmitigated run (target <= +5 %);
* **fidelity**: the share of never-trained captions' generations a pixel classifier assigns to the class they name;
  difference to the unmitigated run in points (target within 2).

Early stopping is replayed on the unmitigated runs' monitor curves with the real
:class:`~mnemoguard.callbacks.early_stopping.EarlyStopping` (one rule, several thresholds): its stop step beside the
oracle step, the first checkpoint where the ground truth reaches 5 % memorized (and where it reaches 10 %).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnemoguard.bench.mitigation_summary import mitigation_markdown, stopping_markdown
from mnemoguard.bench.summary import load_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/summarize_mitigation.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="bench run directories (each with bench.json)")
    p.add_argument("--out", help="write mitigation.md here (default: print only)")
    p.add_argument("--monitor", default="mem/probe_loss/band=low/contrast", help="early-stopping metric")
    p.add_argument("--thresholds", default="0.06,0.08,0.1,0.12", help="divergence thresholds to replay")
    p.add_argument("--rollback", default="best", choices=("best", "last_good"), help="early stopping's rollback")
    p.add_argument("--stopped-arm", action="store_true",
                   help="add each arm stopped at the first threshold and rolled back (its checkpoint there)")
    a = p.parse_args(argv)
    runs = load_runs(a.dirs)
    thresholds = [float(t) for t in a.thresholds.split(",")]
    stop = (a.monitor, thresholds[0], a.rollback) if a.stopped_arm else None
    text = f"{mitigation_markdown(runs, stop)}\n\n{stopping_markdown(runs, a.monitor, thresholds, a.rollback)}\n"
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "mitigation.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
