"""The training-time callback API (transformers' ``TrainerCallback`` shape; a step is an optimizer step).

Event order in one run::

    on_train_begin
      [on_step_begin -> (per micro-batch: on_before_forward -> forward -> on_loss -> backward)
       -> optimizer step, EMA update -> on_step_end -> (on_evaluate) -> (on_save)] ...
    on_train_end

Every hook receives the :class:`TrainerState`, the :class:`TrainerControl` and keyword arguments (the models, the
accelerator, the batch ...): take the ones you need, ignore the rest. Two hooks are extension points for
regularizers: ``on_before_forward`` may replace entries of the ``inputs`` dict (e.g. the text embeddings) and
``on_loss`` may change ``inputs["weights"]`` (per-sample loss weights; 0 drops a sample) or add to
``inputs["extra_loss"]``. Callbacks with state implement ``state_dict`` / ``load_state_dict``; the
:class:`CallbackList` saves them with every checkpoint.

Metrics contract: a callback that computes metrics in ``on_step_end`` calls ``state.update_metrics(values)`` (so
later callbacks see them as fresh: ``state.is_fresh(key)``), adds them to the ``logs`` dict it receives (flat tags
such as ``mem/score_gap/t=500``, Python floats) and sets ``control.should_log = True``; the trainer then writes
``logs`` to the trackers and to ``state.log_history``. Callbacks run in registration order, so a consumer (early
stopping, a policy) goes after the producer (a monitor).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainerState:
    """Counters and history of a run; saved with every checkpoint so that a resumed run continues every curve."""

    global_step: int = 0  # optimizer steps taken
    epoch: int = 0
    max_steps: int = 0
    micro_step: int = 0  # forward/backward passes taken (global_step x gradient_accumulation_steps)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of every logged metric
    metric_steps: dict[str, int] = field(default_factory=dict)  # the step at which each metric was last updated
    log_history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    stop_reason: str | None = None
    is_world_process_zero: bool = True

    def update_metrics(self, values: dict[str, float]) -> None:
        """Set the latest value of metrics computed at this step (a monitor's output, the training loss ...)."""
        values = {k: float(v) for k, v in values.items()}
        self.metrics.update(values)
        self.metric_steps.update(dict.fromkeys(values, self.global_step))

    def is_fresh(self, key: str) -> bool:
        """Whether ``key`` was computed at the current step (checks run every N steps; consumers act on fresh ones)."""
        return self.metric_steps.get(key) == self.global_step

    def log(self, values: dict[str, float]) -> None:
        """Record values at the current step (kept in ``metrics`` and appended to ``log_history``)."""
        self.update_metrics(values)
        self.log_history.append({"step": self.global_step, **{k: float(v) for k, v in values.items()}})

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key != "is_world_process_zero":
                setattr(self, key, value)


@dataclass
class TrainerControl:
    """Flags callbacks set to steer the loop. ``should_training_stop`` is sticky; the others reset every step."""

    should_training_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def reset_step_flags(self) -> None:
        self.should_save = self.should_evaluate = self.should_log = False


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    def on_train_begin(self, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        pass

    def on_step_begin(self, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        pass

    def on_before_forward(self, state: TrainerState, control: TrainerControl, inputs: dict, **kwargs: Any) -> None:
        """Regularizer hook: may replace ``inputs`` entries (``encoder_hidden_states``, ``captions`` ...)."""

    def on_loss(self, state: TrainerState, control: TrainerControl, inputs: dict, **kwargs: Any) -> None:
        """Per-sample hook: ``inputs["loss_per_sample"]`` is there; may change ``weights`` / ``extra_loss``."""

    def on_step_end(self, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        pass

    def on_evaluate(self, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        pass

    def on_save(self, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        pass

    def on_train_end(self, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        pass

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint; override when several instances of a class coexist."""
        return type(self).__name__


_EVENTS = ("on_train_begin", "on_step_begin", "on_before_forward", "on_loss", "on_step_end", "on_evaluate",
           "on_save", "on_train_end")


class CallbackList:
    """Calls the callbacks in order; their states are saved and restored together (``register_for_checkpointing``)."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks: list[Callback] = []
        for cb in callbacks or []:
            self.add(cb)

    def add(self, callback: Callback | type[Callback]) -> Callback:
        cb = callback() if isinstance(callback, type) else callback
        if not isinstance(cb, Callback):
            raise TypeError(f"expected a mnemoguard Callback (subclass or instance), found {type(cb).__name__}")
        if any(c.state_key == cb.state_key for c in self.callbacks):
            raise ValueError(f"a callback with state_key {cb.state_key!r} is already registered; override state_key")
        self.callbacks.append(cb)
        return cb

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def call(self, event: str, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        if event not in _EVENTS:
            raise ValueError(f"unknown callback event {event!r}; events are {_EVENTS}")
        for cb in self.callbacks:
            getattr(cb, event)(state, control, **kwargs)
        return control

    def state_dict(self) -> dict[str, Any]:
        return {cb.state_key: cb.state_dict() for cb in self.callbacks if hasattr(cb, "state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "load_state_dict") and cb.state_key in state:
                cb.load_state_dict(state[cb.state_key])
