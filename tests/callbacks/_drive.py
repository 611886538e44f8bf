"""Feeds a callback a sequence of fresh metric values the way the trainer would (one ``on_step_end`` per step)."""

from __future__ import annotations

from mnemoguard.callbacks import Callback, TrainerControl, TrainerState


def drive(callback: Callback, key: str, values, every: int = 1, state: TrainerState | None = None,
          start_step: int = 0, stop_on_stop: bool = True):
    """Steps ``start_step+1 ...``; ``values[i]`` is fresh at step ``(i+1)*every`` (+ start_step). Returns
    ``(state, events)`` with one ``(step, control)`` per step."""
    state = state or TrainerState(global_step=start_step)
    events = []
    values = list(values)
    step = start_step
    while values:
        step += 1
        state.global_step = step
        if (step - start_step) % every == 0:
            state.update_metrics({key: values.pop(0)})
        control = TrainerControl()
        callback.on_step_end(state, control, logs={})
        events.append((step, control))
        if stop_on_stop and control.should_training_stop:
            break
    return state, events


def stop_step(events) -> int | None:
    return next((s for s, c in events if c.should_training_stop), None)


def save_steps(events) -> list[int]:
    return [s for s, c in events if c.should_save]
