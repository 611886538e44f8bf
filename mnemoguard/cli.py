"""``mnemoguard`` command line: ``audit``, ``train RECIPE``, ``demo``, ``config``, ``bench``.

Examples::

    mnemoguard audit --base BASE_MODEL --checkpoints output/ --data train_images/ --out audit/
    mnemoguard audit --watch output/ --base BASE_MODEL --data train_images/ --on-copy "touch STOP"
    mnemoguard demo                                  # the guard's story, unguarded vs guarded (~4.5 min on 2 cores)
    mnemoguard train recipes/sd15_lora.yaml --set training.max_train_steps=2000
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m mnemoguard.cli train recipes/sd15_full.yaml
    mnemoguard bench --out outputs/bench --set seed=1   # planted-memorization benchmark (sized for ~15 min on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config
from .errors import DataError, OutputDirError, StateFormatError

DEMO_DIR = "outputs/demo"


def _train(recipe: str | None, overrides: list[str], overwrite: bool = False) -> int:
    from .trainer import Trainer

    cfg = load_config(recipe, [*overrides, *(["training.overwrite_output_dir=true"] if overwrite else [])])
    trainer = Trainer(cfg)
    start = time.perf_counter()
    state = trainer.train()
    elapsed = time.perf_counter() - start
    if trainer.accelerator.is_main_process:
        out = cfg.training.output_dir
        logs = os.path.join(out, cfg.logging.logging_dir)
        print(f"\nTrained {state.global_step} optimizer steps in {elapsed:.1f} s.")
        if state.stop_reason:
            print(f"Stopped early: {state.stop_reason}")
        skipped = int(state.metrics.get("data/skipped_samples", 0))
        if skipped:
            print(f"Skipped {skipped} unreadable sample(s) (data.skip_bad_samples; counted across resumes).")
        print(f"Final weights: {trainer.final_dir}")
        print(f"Checkpoints:   {out}/checkpoint-*")
        if (Path(out) / "report" / "report.md").is_file():
            print(f"Report:        {out}/report/report.md")
        if cfg.logging.report_to == "tensorboard":
            print(f"TensorBoard:   tensorboard --logdir {logs} --host 127.0.0.1   (then open http://127.0.0.1:6006)")
    return 1 if state.diverged_step is not None else 0


def _bench(config: str | None, out: str, overrides: list[str], overwrite: bool) -> int:
    import shlex

    from .bench.report import MARKDOWN_FILE, RESULTS_FILE
    from .bench.run import run_bench

    sets = [arg for o in overrides for arg in ("--set", o)]
    command = shlex.join(["mnemoguard", "bench", *([config] if config else []), "--out", out, *sets])
    try:
        results = run_bench(config, out, overrides=overrides, overwrite=overwrite, command=command)
    except FileExistsError as e:
        print(f"mnemoguard: {e}", file=sys.stderr)
        return 2
    print(f"\nBenchmark done in {results['timing']['total']:.0f} s.")
    print(f"Numbers:  {os.path.join(out, RESULTS_FILE)}")
    print(f"Report:   {os.path.join(out, MARKDOWN_FILE)} (tables and figures for BENCHMARKS.md)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnemoguard", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="fine-tune with a YAML recipe")
    p_train.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p_train.add_argument("--overwrite", action="store_true", help="replace an earlier run in training.output_dir")
    from .audit.cli import add_audit_parser

    add_audit_parser(sub)
    p_demo = sub.add_parser("demo", help="the guard's story: memorization, alarm, mitigation, stop")
    p_cfg = sub.add_parser("config", help="print the resolved recipe (defaults + file + overrides) as YAML")
    p_cfg.add_argument("recipe", nargs="?", default=None)
    p_bench = sub.add_parser("bench", help="train on the planted-memorization testbed and measure every signal")
    p_bench.add_argument("config", nargs="?", default=None, help="a YAML bench config (default: built-in sizes)")
    p_bench.add_argument("--out", default="outputs/bench", help="output folder (default: outputs/bench)")
    p_bench.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p_bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a bench value, e.g. --set seed=1 --set train.max_train_steps=3000")
    for p in (p_train, p_demo, p_cfg):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set model.lora.rank=8 (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.command == "audit":
            from .audit.cli import run_audit_command

            return run_audit_command(args)
        if args.command == "train":
            return _train(args.recipe, args.overrides, args.overwrite)
        if args.command == "demo":
            from .demo import run_demo

            run_demo(DEMO_DIR, overrides=args.overrides)
            return 0
        if args.command == "bench":
            return _bench(args.config, args.out, args.overrides, args.overwrite)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(load_config(args.recipe, args.overrides).to_dict(), sort_keys=False))
            return 0
    except ConfigError as e:
        print(f"mnemoguard: recipe error: {e}", file=sys.stderr)
        return 2
    except (DataError, StateFormatError, OutputDirError) as e:  # a row, a file, a checkpoint: one line says which
        print(f"mnemoguard: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
