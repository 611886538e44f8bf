"""The end of an optimizer step, shared by the reference trainer and :class:`mnemoguard.Guard` in a user's loop:
``on_step_end``, the step's logs, and a stop asked for on any rank turned into a stop on every rank."""

from __future__ import annotations

from typing import Any

from .base import CallbackList, TrainerControl, TrainerState

__all__ = ["step_end_and_log", "sync_stop"]


def step_end_and_log(callbacks: CallbackList, state: TrainerState, control: TrainerControl, logs: dict[str, float],
                     **kwargs: Any) -> None:
    """Record ``logs`` as the step's metrics, run ``on_step_end`` (callbacks add their values to ``logs``), then, when
    the cadence or a callback set ``control.should_log``, keep them in ``state.log_history`` and send them to
    ``kwargs["accelerator"].log`` as plain floats (accelerate's TensorBoard tracker drops numpy scalars). ``kwargs``
    are the hooks' keyword arguments (``accelerator`` among them)."""
    state.update_metrics(logs)
    callbacks.call("on_step_end", state, control, logs=logs, **kwargs)
    if control.should_log and logs:
        state.log(logs)
        kwargs["accelerator"].log({k: float(v) for k, v in logs.items()}, step=state.global_step)


def sync_stop(state: TrainerState, control: TrainerControl, accelerator: Any) -> None:
    """A stop asked for on any rank stops every rank (every rank must call this at every optimizer step)."""
    if control.should_training_stop:
        accelerator.set_trigger()
    if accelerator.check_trigger():
        state.stop_reason = state.stop_reason or "a callback asked to stop"
        control.should_training_stop = True
