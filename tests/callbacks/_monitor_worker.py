"""Run by ``accelerate launch`` from test_monitor.py: a monitored run; each rank records what its guard holds."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mnemoguard.callbacks import Callback  # noqa: E402
from mnemoguard.trainer import Trainer  # noqa: E402
from tests.trainer_utils import tiny_recipe  # noqa: E402


class RecordMonitor(Callback):
    def __init__(self, out: str) -> None:
        self.out, self.trainer = out, None

    def on_train_end(self, state, control, context, **kwargs) -> None:
        parts = self.trainer.guard.components
        m = parts.monitor
        record = {"world": context.num_processes, "history": m.history, "spec": m.spec,
                  "row_counts": parts.loss_flags.row_counts.tolist(),
                  "danger_zone": {"prior": parts.danger_zone.prior, "history": parts.danger_zone.history}}
        Path(self.out, f"monitor{context.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out = sys.argv[1]
    # 5 training + 2 held-out probes x 3 bands = 21 rows: uneven shares (11 + 10, padded), batches of 4.
    cfg = tiny_recipe(out, "training.max_train_steps=4", "training.checkpointing_steps=100", "logging.report_to=none",
                      "guard.enabled=true", "guard.monitor.every_n_steps=2", "guard.monitor.num_duplicate_probes=2",
                      "guard.monitor.num_random_probes=3", "guard.monitor.num_heldout_probes=2",
                      "guard.monitor.heldout_captions=[a handwritten digit eleven, a handwritten digit twelve]",
                      "guard.monitor.curvature_every_k_checks=2", "guard.monitor.curvature_hutchinson_probes=2",
                      "guard.monitor.generation_steps=2", "guard.monitor.nearest_pool_size=8",
                      "guard.monitor.batch_size=4", "guard.danger_zone.enabled=true",
                      "guard.danger_zone.every_n_checks=1", "guard.danger_zone.num_inference_steps=4",
                      "guard.danger_zone.draws=1", "guard.danger_zone.prior_rows=32")
    recorder = RecordMonitor(out)
    trainer = Trainer(cfg, callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
