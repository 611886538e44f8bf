"""The callback API of the guard's components (transformers' ``TrainerCallback`` shape; a step is an optimizer step).

Event order in one run, as :class:`mnemoguard.Guard` calls them (the reference trainer drives the same Guard)::

    on_train_begin
      [on_step_begin -> (per micro-batch: on_before_forward -> forward -> on_loss -> backward)
       -> optimizer step -> on_step_end -> (on_save)] ...
    on_train_end

Every hook receives the :class:`TrainerState`, the :class:`TrainerControl` and ``context``, the
:class:`~mnemoguard.guard.context.GuardContext` (accelerator, UNet, denoiser, prompt encoder, probe data, EMA, output
directory, timestep-sampler slot), plus the event's own keyword arguments: ``inputs`` (``on_before_forward``,
``on_loss``), ``logs`` (``on_step_end``), ``checkpoint`` (``on_save``). Two hooks are extension points for
regularizers: ``on_before_forward`` may replace entries of the ``inputs`` dict (the text embeddings, the captions) and
``on_loss`` may change ``inputs["weights"]`` (per-sample loss weights; 0 drops a sample) or add to
``inputs["extra_loss"]``.

A component declares what it needs from the run in ``needs`` (see :data:`NEEDS`); the Guard checks them for every
registered component when it is built, so a missing text encoder or dataset is an error before step 1.

Metrics contract: a callback that computes metrics in ``on_step_end`` calls ``state.update_metrics(values)`` (later
callbacks see them as fresh: ``state.is_fresh(key)``), adds them to the ``logs`` dict it receives (flat tags such as
``mem/probe_loss/band=low/contrast``, Python floats) and sets ``control.should_log = True``; the Guard then writes
``logs`` to the trackers and to ``state.log_history``. Callbacks run in registration order, so a consumer (early
stopping, a policy) goes after the producer (the monitor). Stateful callbacks implement ``state_dict`` /
``load_state_dict`` (plain types and tensors only); the Guard saves them with every checkpoint under ``state_key``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["NEEDS", "Callback", "CallbackList", "TrainerControl", "TrainerState"]

#: what a component can need from the run, and where it comes from
NEEDS = {
    "prompts": "a text encoder: Guard(text_encoder=, tokenizer=) or Guard(encode_prompt=)",
    "tokenizer": "the tokenizer (random tokens are drawn from its vocabulary): Guard(tokenizer=)",
    "dataset": "the training data (image and caption columns): Guard(train_dataset=)",
    "ema": "an EMA of the trained weights: Guard(ema=...) or one the guard builds",
    "captions": "the micro-batch's captions: guard.before_forward(captions=)",
    "indices": "the micro-batch's dataset rows: guard.before_forward(indices=)",
    "prediction": "the UNet's prediction: guard.loss(..., model_pred=)",
}


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
    nonfinite_steps: int = 0  # optimizer steps whose loss or gradients were NaN / infinite (never applied)
    diverged_step: int | None = None  # the step a run stopped at for non-finite values
    finite_checkpoint: str | None = None  # the last checkpoint saved before any non-finite step
    warnings: list[str] = field(default_factory=list)  # what the run could not do (a rule never fed, no check ...)
    is_world_process_zero: bool = True

    def warn(self, message: str) -> None:
        """Record something the run could not do (also logged as a warning); the report lists them."""
        if message not in self.warnings:
            self.warnings.append(message)
            logging.getLogger("mnemoguard").warning(message)

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
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "is_world_process_zero"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; every key must be a field of the right kind (a ``ValueError`` names it). The
        planned ``max_steps`` is this run's (a resumed run may train longer than the checkpointed one planned), when
        it is set."""
        from ..serialization import check_keys

        kinds = {"global_step": int, "epoch": int, "max_steps": int, "micro_step": int, "metrics": dict,
                 "metric_steps": dict, "log_history": list, "best_metric": (int, float, type(None)),
                 "best_step": (int, type(None)), "best_checkpoint": (str, type(None)),
                 "stop_reason": (str, type(None)), "nonfinite_steps": int, "diverged_step": (int, type(None)),
                 "finite_checkpoint": (str, type(None)), "warnings": list}
        check_keys(state, kinds, "trainer_state", required=("global_step", "micro_step", "log_history"))
        for key, value in state.items():
            if key == "max_steps" and self.max_steps:
                continue
            setattr(self, key, value)


@dataclass
class TrainerControl:
    """Flags callbacks set to steer the loop. ``should_training_stop`` is sticky; the others reset every step."""

    should_training_stop: bool = False
    should_save: bool = False
    should_log: bool = False

    def reset_step_flags(self) -> None:
        self.should_save = self.should_log = False


class Callback:
    """Base class with no-op hooks; override the ones you need (module docstring)."""

    #: keys of :data:`NEEDS` this component requires from the run (checked when the Guard is built)
    needs: ClassVar[frozenset[str]] = frozenset()

    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None, **kwargs: Any) -> None:
        pass

    def on_step_begin(self, state: TrainerState, control: TrainerControl, context: Any = None, **kwargs: Any) -> None:
        pass

    def on_before_forward(self, state: TrainerState, control: TrainerControl, context: Any = None,
                          inputs: dict | None = None, **kwargs: Any) -> None:
        """Regularizer hook: may replace ``inputs`` entries (``conditioning``, ``captions`` ...)."""

    def on_loss(self, state: TrainerState, control: TrainerControl, context: Any = None, inputs: dict | None = None,
                **kwargs: Any) -> None:
        """Per-sample hook: ``inputs["loss_per_sample"]`` is there; may change ``weights`` / ``extra_loss``."""

    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    logs: dict | None = None, **kwargs: Any) -> None:
        pass

    def on_save(self, state: TrainerState, control: TrainerControl, context: Any = None, **kwargs: Any) -> None:
        pass

    def on_train_end(self, state: TrainerState, control: TrainerControl, context: Any = None, **kwargs: Any) -> None:
        pass

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint; override when several instances of a class coexist."""
        return type(self).__name__


_EVENTS = ("on_train_begin", "on_step_begin", "on_before_forward", "on_loss", "on_step_end", "on_save",
           "on_train_end")


class CallbackList:
    """Calls the callbacks in order, timing each (``seconds[state_key]``: wall time spent in its hooks, the guard's
    overhead per component); keyed by ``state_key`` (unique) for the run state."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks: list[Callback] = []
        self.seconds: dict[str, float] = {}
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
            start = time.perf_counter()
            getattr(cb, event)(state, control, **kwargs)
            key = cb.state_key
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        return control

    def stateful(self) -> dict[str, Callback]:
        """``state_key -> callback`` for the callbacks that have a state."""
        return {cb.state_key: cb for cb in self.callbacks if callable(getattr(cb, "state_dict", None))}
