"""The command behind :mod:`mnemoguard.bench.danger_zone_summary`, whose docstring says what each table means.

    python scripts/summarize_danger_zone.py outputs/dz/digits/*_s? --out docs/bench --name digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnemoguard.bench.danger_zone_summary import cost_markdown, false_alarm_markdown, stop_markdown, where_markdown
from mnemoguard.bench.summary import load_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/summarize_danger_zone.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="bench run directories (each with bench.json, tracker on)")
    p.add_argument("--clean", action="store_true", help="runs without duplicated images: the false-alarm table")
    p.add_argument("--out", help="write danger_zone_<name>.md here (default: print only)")
    p.add_argument("--name", default="runs")
    p.add_argument("--thresholds", default=None, help="copy-rate levels to replay the stop at (default: the rule's)")
    p.add_argument("--statistic", default="mem/danger_zone/copy_rate",
                   choices=("mem/danger_zone/copy_rate", "mem/danger_zone/copy_rate_lower"),
                   help="what the replayed stop watches: the copy rate, or its exact lower bound")
    a = p.parse_args(argv)
    levels = [float(t) for t in a.thresholds.split(",")] if a.thresholds else None
    runs = sorted(load_runs(a.dirs), key=lambda r: (r["config"]["train"].get("mitigation", "none"), r["seed"]))
    none = [r for r in runs if r["config"]["train"].get("mitigation", "none") == "none"]
    parts = [f"## Where\n\n{where_markdown(runs)}"]
    if a.clean:
        parts.append(f"## False alarms (no duplicated images)\n\n{false_alarm_markdown(none, a.statistic)}")
    elif none:
        parts.append(f"## When: the default stop vs the oracle\n\n{stop_markdown(none, levels, a.statistic)}")
    parts.append(f"## Cost\n\n{cost_markdown(runs)}")
    text = "\n\n".join(parts) + "\n"
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"danger_zone_{a.name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
