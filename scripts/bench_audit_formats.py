"""The audit of LoRAs saved by the reference trainer, re-saved as kohya and SimpleTuner save them: the same numbers?

Trains ``recipes/tiny_lora.yaml`` (the shipped tiny base, a rank-4 LoRA) on the first ``--rows`` digits with a
checkpoint every ``--every`` steps, re-saves each checkpoint's ``pytorch_lora_weights.safetensors`` in kohya's format
(``convert_state_dict_to_kohya``, ``ss_*`` metadata, ``name-stepNNNNNNNN.safetensors``) and in SimpleTuner's layout,
audits the three folders and compares ``audit.csv`` and ``images.csv`` (all but the file, format and timing
columns).

Usage::

    python scripts/bench_audit_formats.py --out /work/runs/formats
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

IGNORED = {"file", "format", "seconds", "cached", "step_source"}


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in IGNORED} for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/bench_audit_formats")
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=150)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from mnemoguard.cli import main as cli
    from mnemoguard.testbed.lora_formats import as_kohya, as_simpletuner

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.yaml"
    recipe.write_text(Path("recipes/tiny_lora.yaml").read_text() + f"  output_dir: {out / 'train'}\n"
                      f"  max_train_steps: {args.steps}\n  checkpointing_steps: {args.every}\n"
                      "  checkpoints_total_limit: null\n  overwrite_output_dir: true\n"
                      f"data:\n  max_samples: {args.rows}\nvalidation: {{every_n_steps: 0}}\n")
    assert cli(["train", str(recipe)]) == 0
    originals = sorted((out / "train").glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    for d in originals:
        step = int(d.name.split("-")[1])
        f = d / "pytorch_lora_weights.safetensors"
        as_kohya(f, out / "kohya", "tiny_lora", step, alpha=4.0)
        as_simpletuner(f, out / "simpletuner", step)
    tables = {}
    for name, paths in (("original", [str(d) for d in originals]), ("kohya", [str(out / "kohya")]),
                        ("simpletuner", [str(out / "simpletuner")])):
        audit = out / f"audit_{name}"
        assert cli(["audit", "--base", str(recipe), "--checkpoints", *paths, "--out", str(audit)]) == 0
        tables[name] = {"audit": _table(audit / "audit.csv"),
                        "images": [{k: v for k, v in r.items() if not k.startswith("nearest@")}
                                   for r in _table(audit / "images.csv")]}
    same = {n: tables[n] == tables["original"] for n in ("kohya", "simpletuner")}
    (out / "formats.json").write_text(json.dumps({"same": same, "tables": tables}, indent=1))
    print("checkpoints:", [r["step"] for r in tables["original"]["audit"]])
    print("verdicts:", [r["verdict"] for r in tables["original"]["audit"]])
    print("same numbers as the original files:", same)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
