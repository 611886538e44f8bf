"""One short guarded run of the reference trainer, shared by the monitor, dashboard and report tests.

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

from mnemoguard.callbacks.monitor import monitor as monitor_module
from mnemoguard.trainer import Trainer

from ..trainer_utils import tiny_recipe, unet_weights

STEPS = 4
RUN_OVERRIDES = (f"training.max_train_steps={STEPS}", "training.checkpointing_steps=2")
HELDOUT = ["a handwritten digit eleven", "a handwritten digit twelve"]
SIGNAL = "mem/live_vs_ema/band=mid/train"


def guard_overrides(every: int = 2, curvature_every: int = 2, policy: bool = True) -> list[str]:
    """A tiny but complete guard: 2 duplicate + 2 random probes, 2 unseen captions, 3 bands, the visual check at the
    2nd check, and a policy rule that switches on a no-op action (embedding noise with λ = 0) at the first check."""
    out = ["guard.enabled=true", f"guard.monitor.every_n_steps={every}", "guard.monitor.num_duplicate_probes=2",
           "guard.monitor.num_random_probes=2", "guard.monitor.num_heldout_probes=2",
           f"guard.monitor.heldout_captions=[{', '.join(HELDOUT)}]",
           f"guard.monitor.curvature_every_k_checks={curvature_every}", "guard.monitor.curvature_num_probes=2",
           "guard.monitor.curvature_hutchinson_probes=2", "guard.monitor.generation_steps=2",
           "guard.monitor.nearest_pool_size=8"]
    if policy:
        out += ["guard.regularizers={gaussian_embedding_noise: {enabled: false, lam: 0.0}}",
                f"guard.policy=[{{signal: '{SIGNAL}', action: gaussian_embedding_noise, threshold: 1.0e-9}}]"]
    return out


def greedy_measure_all(*args, **kwargs):
    """The monitor's measurement, drawing from every global RNG first: only its RNG isolation keeps training
    unchanged."""
    torch.randn(7), np.random.rand(3), random.random()
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(123)
    return _measure_all(*args, **kwargs)


_measure_all = monitor_module.measure_all


@functools.cache
def guarded_run() -> SimpleNamespace:
    out = Path(tempfile.mkdtemp(prefix="mnemoguard-guard-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    trainer = Trainer(tiny_recipe(out, *RUN_OVERRIDES, *guard_overrides()))
    monitor_module.measure_all = greedy_measure_all
    try:
        state = trainer.train()
    finally:
        monitor_module.measure_all = _measure_all
    parts = trainer.guard.components
    again = [parts.monitor.measure(visual=True)[0], parts.monitor.measure(visual=True)[0]]
    return SimpleNamespace(out=out, trainer=trainer, state=state, monitor=parts.monitor, policy=parts.policy,
                           dashboard=parts.dashboard, report=parts.report, loss_flags=parts.loss_flags,
                           weights=unet_weights(trainer), remeasured=again)
