"""Training wall time with the guard's memorization monitor at its default cadence vs without it, in one process.

    OMP_NUM_THREADS=2 python scripts/bench_monitor_overhead.py --steps 500 --repeats 2

Runs the demo recipe (tiny pixel UNet, MiniLM captions, batch 32, EMA on) for the same number of steps with
``guard.enabled=false`` and ``guard.enabled=true`` (monitor every 100 steps, curvature maps every 5th check, report
at the end; no policy, no early stop), alternating the two ``--repeats`` times, and prints the medians of the
``train()`` wall time and their ratio. The target (issue 6) is <= 2 % overhead. Time it alone: two torch jobs on
2 cores stall each other. The ratio of two runs is at the mercy of run-to-run noise (+-4 % on this machine), so each
guard-on run also prints the guard components' own time (their hooks, timed inside: ``guard.callbacks.seconds``) as
a share of the rest of that run; ``--guard-only`` skips the runs without it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from mnemoguard.config import load_config  # noqa: E402
from mnemoguard.trainer import Trainer  # noqa: E402


def run(guard: bool, steps: int, extra: list[str]) -> tuple[float, int, dict[str, float]]:
    """Wall seconds of ``Trainer.train()`` (set-up, loop, export, end-of-run report), the monitor's checks and the
    seconds spent inside each guard component's hooks."""
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"training.output_dir={out}", f"training.max_train_steps={steps}",
                     "training.checkpointing_steps=0", "validation.prompts=[]", "logging.report_to=none",
                     "logging.progress_bar=false", f"guard.enabled={str(guard).lower()}", *extra]
        trainer = Trainer(load_config("recipes/demo.yaml", overrides))
        start = time.perf_counter()
        state = trainer.train()
        seconds = time.perf_counter() - start
    checks = len([h for h in state.log_history if any(k.startswith("mem/") for k in h)])
    return seconds, checks, {k: v for k, v in trainer.guard.callbacks.seconds.items() if v > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--guard-only", action="store_true", help="only the guard-on runs (the in-hook share)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps} steps, "
          f"{args.repeats} repeats (alternating)")
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for guard in (True,) if args.guard_only else (False, True):
            seconds, checks, inside = run(guard, args.steps, args.overrides)
            times[guard].append(seconds)
            share = ""
            if inside:
                total = sum(inside.values())
                share = (f"; guard hooks {total:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in inside.items())
                         + f") = {100 * total / (seconds - total):.2f} % of the rest of the run")
            print(f"guard {'on ' if guard else 'off'}: {seconds:7.1f} s ({checks} log rows with mem/ metrics){share}",
                  flush=True)
    if times[False]:
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"median off {off:.1f} s, on {on:.1f} s: overhead {100 * (on / off - 1):+.2f} % (ratio {on / off:.4f})")


if __name__ == "__main__":
    main()
