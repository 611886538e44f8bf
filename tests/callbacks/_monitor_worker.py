"""Run by ``accelerate launch`` from test_monitor.py: a monitored run; each rank records what its monitor holds."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mnemoguard.callbacks import Callback, MemorizationMonitor  # noqa: E402
from mnemoguard.trainer import Trainer  # noqa: E402
from tests.trainer_utils import tiny_recipe  # noqa: E402


class RecordMonitor(Callback):
    def __init__(self, monitor: MemorizationMonitor, out: str) -> None:
        self.monitor, self.out = monitor, out

    def on_train_end(self, state, control, accelerator, **kwargs) -> None:
        m = self.monitor
        record = {"world": accelerator.num_processes, "history": m.history, "flag_counts": m.flag_counts,
                  "agc_count": m.agc_count, "spec": m.spec}
        Path(self.out, f"monitor{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out = sys.argv[1]
    # 5 training + 2 held-out probes x 3 bands = 21 rows: uneven shares (11 + 10, padded), batches of 4.
    monitor = MemorizationMonitor(every_n_steps=2, num_duplicate_probes=2, num_random_probes=3, num_heldout_probes=2,
                                  heldout_captions=["a handwritten digit eleven", "a handwritten digit twelve"],
                                  curvature_every_k_checks=2, curvature_hutchinson_probes=2, generation_steps=2,
                                  nearest_pool_size=8, loss_min_count=1, batch_size=4)
    cfg = tiny_recipe(out, "training.max_train_steps=4", "training.checkpointing_steps=100", "logging.report_to=none")
    Trainer(cfg, callbacks=[monitor, RecordMonitor(monitor, out)]).train()
