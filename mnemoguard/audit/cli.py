"""The ``mnemoguard audit`` subcommand: its options (``--help``) and what it prints."""

from __future__ import annotations

import argparse
from typing import Any

from .settings import DTYPES, AuditSettings

__all__ = ["add_audit_parser", "run_audit_command", "settings_from_args"]

DESCRIPTION = """\
Which saved checkpoint is the last one that does not copy its training images? Measures every checkpoint with the
live guard's danger-zone measurement (at-risk training images: duplicates and repeated folders first, against
held-out images), the copy rate of generations from the at-risk captions and a memorization score per training
image; writes audit.csv, images.csv, report.md and index.html into --out. Checkpoints: LoRA .safetensors
(PEFT / diffusers / kohya keys: diffusers' scripts, SimpleTuner, ai-toolkit, kohya sd-scripts, musubi-tuner,
OneTrainer), accelerate checkpoint-N folders, full unet/ or transformer/ folders, or folders of them. Results are
cached per checkpoint: re-running with more checkpoints measures only the new ones."""


def add_audit_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("audit", help="which saved checkpoint (of any trainer) is the last one that does not copy",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = AuditSettings.__dataclass_fields__
    p.add_argument("--base", required=True, metavar="MODEL",
                   help="the base model: a local diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3/3.5, Flux) or a "
                        "mnemoguard recipe .yaml (its model: and data: sections)")
    p.add_argument("--checkpoints", nargs="+", default=[], metavar="PATH",
                   help="LoRA .safetensors files, checkpoint-N folders, model folders, or folders of them (the step "
                        "of each from its metadata, else its name, else the order given)")
    p.add_argument("--data", metavar="DIR", help="the training images: an imagefolder with metadata.jsonl, a "
                   "datasets save_to_disk folder, or kohya's <repeats>_<name>/ folders with .txt/.caption captions "
                   "(default: the recipe's data, else the folder named in the checkpoints' metadata)")
    p.add_argument("--heldout", metavar="DIR", help="held-out images never trained on, same layouts (default: "
                   "random training rows stand in)")
    p.add_argument("--out", default="audit", metavar="DIR", help="output folder (default: audit)")
    p.add_argument("--image-column", default=d["image_column"].default, help="image column of --data (image)")
    p.add_argument("--caption-column", default=d["caption_column"].default, help="caption column of --data (text)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype during the measurement")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="rows per network call (16)")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="probes and noise draws (1234)")
    p.add_argument("--resolution", type=int, help="training resolution in pixels (default: the recipe's, else the "
                   "model's sample size)")
    p.add_argument("--probes", type=int, help="at-risk, random and held-out probes of the danger-zone measurement, "
                   "each (default: 8 at-risk, 4 random and 4 held-out; the live guard takes 4 at-risk)")
    p.add_argument("--draws", type=int, help="noise draws per probe and noise level (default: the guard's, 4)")
    p.add_argument("--steps", dest="num_inference_steps", type=int,
                   help="sampler steps of the measurement and the generations (default: 25; the live guard "
                        "takes 10)")
    p.add_argument("--guidance-scale", type=float, help="guidance of the generations (default: 1, the conditional "
                   "model, where copies show best)")
    p.add_argument("--copy-ratio", type=float, help="Gu et al.'s d1/d2 below which a generation is a copy (1/3)")
    p.add_argument("--no-per-image", dest="per_image", action="store_false",
                   help="skip the per-training-image table (one generation per image and checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a guard setting, e.g. --set danger_zone.on_level=0.4 --set monitor.near_duplicate_ratio=0 "
                        "(repeatable)")
    p.add_argument("--tensorboard", action="store_true", help="also write the curves under <out>/tensorboard")
    p.add_argument("--watch", metavar="DIR", help="audit each new checkpoint a trainer writes into DIR (polling) "
                   "until interrupted; appends to the same outputs")
    p.add_argument("--on-copy", metavar="CMD", help="with --watch: run CMD <checkpoint> <step> on a copying "
                   "verdict (e.g. a script that stops the trainer, or 'touch STOP')")
    p.add_argument("--poll-seconds", type=float, default=10.0, help="with --watch: seconds between polls (10)")
    p.add_argument("--max-checkpoints", type=int, help="with --watch: stop after this many checkpoints")
    return p


def settings_from_args(args: argparse.Namespace) -> AuditSettings:
    names = AuditSettings.__dataclass_fields__
    kwargs = {k: v for k, v in vars(args).items() if k in names}
    if args.watch and not kwargs.get("checkpoints"):
        kwargs["checkpoints"] = [args.watch]
    return AuditSettings(**kwargs)


def run_audit_command(args: argparse.Namespace) -> int:
    from ..errors import DataError

    if args.on_copy and not args.watch:
        raise DataError("--on-copy runs on a verdict of --watch; give --watch DIR too")
    if not args.watch and not args.checkpoints:
        raise DataError("--checkpoints: expected LoRA files or checkpoint folders (or --watch DIR), found none")
    settings = settings_from_args(args)
    if args.watch:
        from .watch import watch

        return watch(settings, args.watch, on_copy=args.on_copy, poll_seconds=args.poll_seconds,
                     max_checkpoints=args.max_checkpoints)
    from .run import run_audit

    result = run_audit(settings)
    _print(result, settings)
    return 0 if result.rows else 2


def _print(result: Any, settings: AuditSettings) -> None:
    from .outputs import summary

    for r in result.rows:
        print(f"step {r['step']:>7}  {r['verdict']:<8} copy rate {r['copy_rate']:.2f}  excess {r['excess']:.2f}  "
              f"{r['file']}")
    print(f"\n{summary(result)}")
    print(f"Report: {settings.out}/index.html  (tables: audit.csv, images.csv, report.md)")
