"""The command behind :mod:`mnemoguard.bench.mitigation_summary`, whose docstring says what each table means.

    python scripts/summarize_mitigation.py outputs/mitigation/*_s? --out docs/bench
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
    a = p.parse_args(argv)
    runs = load_runs(a.dirs)
    thresholds = [float(t) for t in a.thresholds.split(",")]
    text = f"{mitigation_markdown(runs)}\n\n{stopping_markdown(runs, a.monitor, thresholds, a.rollback)}\n"
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "mitigation.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
