"""How a guarded run stops: a non-finite step (stop, or skip up to ``non_finite.max_skipped_steps`` in a row), and a
stop asked for on any rank stopping every rank."""

from __future__ import annotations

import logging
from typing import Any

from ..callbacks.base import TrainerControl, TrainerState

logger = logging.getLogger("mnemoguard")

__all__ = ["nonfinite_step", "sync_stop"]


def nonfinite_step(state: TrainerState, control: TrainerControl, step: int, in_a_row: int, limit: int,
                   skipped: bool) -> None:
    """Record step ``step`` whose loss or gradients were NaN / infinite (``in_a_row``: such steps in a row, this one
    included; ``skipped``: the optimizer did not apply it). Beyond ``limit`` in a row the run stops as diverged,
    with the step in the stop reason."""
    state.nonfinite_steps += 1
    done = ("skipped (the optimizer did not apply it)" if skipped else
            "applied: pass optimizer= to Guard so that such a step is skipped")
    if in_a_row > limit:
        state.diverged_step = step
        state.stop_reason = (f"Diverged: the loss or a gradient was not finite at step {step} ({in_a_row} step(s) "
                             f"in a row, guard.non_finite.max_skipped_steps={limit}); the step was {done}.")
        control.should_training_stop = True
        logger.error("Guard: %s", state.stop_reason)
    else:
        logger.warning("Guard: step %d: the loss or a gradient is not finite; the step was %s (%d in a row, at most "
                       "%d)", step, done, in_a_row, limit)


def sync_stop(accelerator: Any, state: TrainerState, control: TrainerControl) -> None:
    """A stop asked for on any rank stops every rank (every rank calls ``Guard.step`` at every optimizer step): one
    all-reduced flag per step with several processes, none with one; a checkpoint is written at the stop step."""
    stop = control.should_training_stop
    if accelerator.num_processes > 1:
        if stop:
            accelerator.set_trigger()
        stop = accelerator.check_trigger()
    if stop:
        state.stop_reason = state.stop_reason or "a callback asked to stop"
        control.should_training_stop = True
        control.should_save = True
