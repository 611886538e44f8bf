"""Train the shipped tiny base UNet, ``builtin:digits16`` (see ``mnemoguard/trainer/base_model.py``).

The demo recipe's model (16 x 16 x 1 pixel-space UNet, MiniLM captions) trained from random initialisation on the
even-indexed images of scikit-learn's digits with their class captions, exported with its EMA weights, and copied to
``mnemoguard/assets/tiny_base_digits16/`` (config.json + diffusion_pytorch_model.safetensors, ~4.6 MB).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_base.py            # ~2,000 steps, 10-15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from mnemoguard.config import load_config
from mnemoguard.data import digits_dataset
from mnemoguard.trainer import Trainer
from mnemoguard.trainer.base_model import BUILTIN_BASES, base_training_indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(BUILTIN_BASES["builtin:digits16"]))
    parser.add_argument("--workdir", default="outputs/train_base")
    args = parser.parse_args()

    data = digits_dataset()
    data = data.select(base_training_indices(len(data)).tolist())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data.save_to_disk(tmp)
        cfg = load_config("recipes/demo.yaml", [
            f"data.source={tmp}",
            f"training.output_dir={args.workdir}",
            f"training.seed={args.seed}",
            f"training.max_train_steps={args.steps}",
            f"training.learning_rate={args.lr}",
            "training.checkpointing_steps=0",
            "training.export=ema",
            "validation.every_n_steps=0",
            "logging.report_to=none",
        ])
        Trainer(cfg).train()
    final = Path(args.workdir) / "final" / "unet"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copyfile(final / name, out / name)
    size = (out / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20
    print(f"trained on {len(data)} digits for {args.steps} steps in {time.perf_counter() - start:.0f} s; "
          f"wrote {out} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
