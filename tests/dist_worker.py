"""Run by ``accelerate launch`` from tests/test_distributed.py: train, then record what each rank ended with."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mnemoguard.callbacks import Callback  # noqa: E402
from mnemoguard.ema import gathered_parameters  # noqa: E402
from mnemoguard.trainer import Trainer  # noqa: E402
from tests.trainer_utils import tiny_recipe  # noqa: E402


class RecordRank(Callback):
    """At the end of training (before the process group goes away): what this rank holds."""

    def __init__(self, out: str) -> None:
        self.out, self.trainer = out, None

    def on_train_end(self, state, control, context, **kwargs) -> None:
        accelerator, ema, trainer = context.accelerator, self.trainer.ema, self.trainer
        params = list(context.unwrapped_unet.parameters())
        with gathered_parameters(params):  # ZeRO-3: each rank holds shards; gather them to compare whole weights
            checksum = float(sum(p.detach().double().sum() for p in params))
        record = {
            "rank": accelerator.process_index,
            "world": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "global_step": state.global_step,
            "checksum": checksum,
            "ema_step": ema.optimization_step if ema else None,
            "ema_checksum": float(sum(t.double().sum() for t in ema.shadow.values())) if ema else None,
            "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
            "loss_steps": [h["step"] for h in state.log_history],
        }
        Path(self.out, f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


class StopOnLastRank(Callback):
    """Asks for a stop on the last rank only, at ``step``: every rank must stop there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state, control, context, **kwargs) -> None:
        if state.global_step == self.step and context.process_index == context.num_processes - 1:
            control.should_training_stop = True


class DropAllAt(Callback):
    """Every rank's filter drops every sample during optimizer step ``step`` (as Wen's filter does when every gap is
    over its threshold); records each rank's weight checksum after every step."""

    drops_samples = True

    def __init__(self, out: str, step: int) -> None:
        self.out, self.step, self.checksums = out, step, []

    def on_loss(self, state, control, inputs, **kwargs) -> None:
        if state.global_step + 1 == self.step:
            inputs["weights"] = torch.zeros_like(inputs["weights"])

    def on_step_end(self, state, control, context, **kwargs) -> None:
        params = context.unwrapped_unet.parameters()
        self.checksums.append(float(sum(p.detach().double().sum() for p in params)))
        Path(self.out, f"checksums{context.process_index}.json").write_text(json.dumps(self.checksums))


def main() -> None:
    out, *overrides = sys.argv[1:]
    stop = [o for o in overrides if o.startswith("stop_on_last_rank=")]
    drop = [o for o in overrides if o.startswith("drop_all_at=")]
    callbacks = [RecordRank(out)] + [StopOnLastRank(int(o.split("=")[1])) for o in stop]
    callbacks += [DropAllAt(out, int(o.split("=")[1])) for o in drop]
    rest = (o for o in overrides if o not in stop + drop)
    trainer = Trainer(tiny_recipe(out, *rest), callbacks=callbacks)
    callbacks[0].trainer = trainer
    trainer.train()


if __name__ == "__main__":
    main()
