"""The command behind :mod:`mnemoguard.bench.summary`, whose docstring says what each table means.

    python scripts/summarize_bench.py outputs/bench_s0 outputs/bench_s1 outputs/bench_s2 --out docs/bench
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnemoguard.bench.summary import load_runs, plot_summary, summary_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="bench output directories (one per seed)")
    parser.add_argument("--out", required=True, help="directory for summary.md and summary.png")
    parser.add_argument("--name", default="summary", help="file stem (default: summary)")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_summary(runs, out / f"{args.name}.png")
    (out / f"{args.name}.md").write_text(summary_markdown(runs, figure.name))
    print(out / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
