"""One short monitored run of the reference trainer, shared by the monitor, dashboard and report tests.

Run once per test session (the first test that asks for it pays ~10 s); everything the tests need from live objects
(re-measurements, weights) is taken right after training, because the per-test fixture resets accelerate's state.
"""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mnemoguard.callbacks import (
    MemorizationMonitor,
    MemorizationReport,
    MitigationPolicy,
    Rule,
    TensorBoardDashboard,
)
from mnemoguard.trainer import Trainer

from ..trainer_utils import tiny_recipe, unet_weights

STEPS = 4
RUN_OVERRIDES = (f"training.max_train_steps={STEPS}", "training.checkpointing_steps=2")
HELDOUT = ["a handwritten digit eleven", "a handwritten digit twelve"]


def monitor_kwargs() -> dict:
    """Tiny but complete: 2 duplicate + 2 random probes, 2 unseen captions, 3 bands, curvature at the 2nd check."""
    return dict(every_n_steps=2, num_duplicate_probes=2, num_random_probes=2, num_heldout_probes=2,
                heldout_captions=list(HELDOUT), curvature_every_k_checks=2, curvature_num_probes=2,
                curvature_hutchinson_probes=2, generation_steps=2, nearest_pool_size=8, loss_min_count=1)


def make_monitor() -> MemorizationMonitor:
    return MemorizationMonitor(**monitor_kwargs())


class GreedyMonitor(MemorizationMonitor):
    """Draws from every global RNG inside each check: only the monitor's RNG isolation keeps training unchanged."""

    state_key = "MemorizationMonitor"  # its checkpoints resume into a plain monitor

    def _probe_values(self, acc):
        torch.randn(7), np.random.rand(3), random.random()
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(123)
        return super()._probe_values(acc)


@functools.cache
def guarded_run() -> SimpleNamespace:
    out = Path(tempfile.mkdtemp(prefix="mnemoguard-guard-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    monitor = GreedyMonitor(**monitor_kwargs())
    policy = MitigationPolicy([Rule("mem/live_vs_ema/band=mid/train", "note", threshold=1e-9)],
                              actions={"note": lambda strength: None}, verbose=False)
    dashboard, report = TensorBoardDashboard(), MemorizationReport()
    trainer = Trainer(tiny_recipe(out, *RUN_OVERRIDES), callbacks=[monitor, policy, dashboard, report])
    state = trainer.train()
    again = [monitor.measure(visual=True)[0], monitor.measure(visual=True)[0]]
    return SimpleNamespace(out=out, trainer=trainer, state=state, monitor=monitor, policy=policy,
                           dashboard=dashboard, report=report, weights=unet_weights(trainer), remeasured=again)
