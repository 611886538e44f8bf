"""Per-optimizer-step wall time of the reference trainer: full UNet vs LoRA, or the testbed's model families (the
tiny UNet, SD3 and Flux transformers of ``mnemoguard bench``'s ``train.family``), measured in one process.

    OMP_NUM_THREADS=2 python scripts/bench_train_step.py --steps 60 --warmup 10
    OMP_NUM_THREADS=2 python scripts/bench_train_step.py --steps 60 --warmup 10 --families

Runs the demo recipe (tiny pixel UNet, MiniLM captions, batch 32) for each variant with checkpoints, validation and
logging off, times each optimizer step with a callback, and prints the medians and their ratio. Time it alone: two
torch jobs on 2 cores stall each other.
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

from mnemoguard.callbacks import Callback  # noqa: E402
from mnemoguard.config import load_config  # noqa: E402
from mnemoguard.trainer import Trainer  # noqa: E402


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, state, control, **kwargs) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, state, control, **kwargs) -> None:
        self.times.append(time.perf_counter() - self._t0)


def run(variant: str, steps: int, extra: list[str]) -> list[float]:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"training.output_dir={out}", f"training.max_train_steps={steps}",
                     "training.checkpointing_steps=0", "validation.prompts=[]", "logging.report_to=none",
                     "logging.progress_bar=false", *extra]
        if variant == "lora":
            overrides += ["model.lora.enabled=true", "training.learning_rate=1e-3"]
        Trainer(load_config(None, overrides), callbacks=[timer]).train()
    return timer.times


def families(args: argparse.Namespace) -> None:
    """Full training of each family's testbed model (the bench's family_overrides), the ratio to the UNet's."""
    from types import SimpleNamespace

    from mnemoguard.bench.recipe import family_overrides

    medians = {}
    for family in ("sd", "sd3", "flux"):
        t = SimpleNamespace(family=family, weighting_scheme="logit_normal" if family == "sd3" else "none",
                            flow_shift=1.0)
        times = run("full", args.steps, [*family_overrides(t), *args.overrides])[args.warmup:]
        medians[family] = statistics.median(times)
        q = statistics.quantiles(times, n=10)
        ratio = medians[family] / medians["sd"]
        print(f"{family:5s} median {1000 * medians[family]:7.1f} ms/step  (p10 {1000 * q[0]:.1f}, "
              f"p90 {1000 * q[-1]:.1f}; {1 / medians[family]:.1f} steps/s; / sd {ratio:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--families", action="store_true", help="compare the testbed's model families instead")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, steps {args.steps} (first {args.warmup} "
          "dropped)")
    if args.families:
        families(args)
        return
    medians = {}
    for variant in ("full", "lora"):
        times = run(variant, args.steps, args.overrides)[args.warmup:]
        medians[variant] = statistics.median(times)
        q = statistics.quantiles(times, n=10)
        print(f"{variant:5s} median {1000 * medians[variant]:7.1f} ms/step  (p10 {1000 * q[0]:.1f}, "
              f"p90 {1000 * q[-1]:.1f}; {1 / medians[variant]:.1f} steps/s)")
    print(f"LoRA / full step time: {medians['lora'] / medians['full']:.2f}")


if __name__ == "__main__":
    main()
