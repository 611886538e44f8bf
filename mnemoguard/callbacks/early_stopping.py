"""Early stopping on a monitored metric, with PyTorch Lightning's vocabulary and semantics.

A *check* is a step at which the monitored metric is fresh (``state.is_fresh(monitor)``: a producer computed it at
this step, see the metrics contract in :mod:`mnemoguard.callbacks.base`). ``patience`` counts checks, not steps: a
monitor that runs every 50 steps with ``patience=3`` stops at the earliest 150 steps after the best value. Checks
before ``start_from_step`` are ignored altogether (Keras' ``start_from_epoch``: a warm-up in which nothing is
recorded and nothing can stop). Each check is decided in Lightning's order:

1. ``check_finite`` and the value is NaN/inf → stop;
2. ``stopping_threshold`` reached (value better than it) → stop: the model is good enough;
3. ``divergence_threshold`` crossed (value worse than it) → stop at once;
4. improvement (better than the best by more than ``min_delta``) → new best, wait count 0; otherwise the wait count
   grows by one and reaching ``patience`` stops.

On an improvement the callback records ``best_score`` / ``best_step`` here and in ``state.best_metric`` /
``state.best_step`` and sets ``control.should_save`` so the trainer writes that step's checkpoint and records it as
``state.best_checkpoint`` (``training.export=best`` rolls back to it). One deviation from Lightning: when the
stopping threshold is reached with a value that is also an improvement, it is recorded as the best too, so the
"good enough" weights are the ones exported. On a stop it sets ``control.should_training_stop`` (the trainer reduces
it across ranks: any rank stopping stops every rank; the metrics themselves are reduced by their producer, so ranks
agree anyway), ``state.stop_reason`` (one sentence with the metric, the best value and the step) and
``stopped_step``. All of it is in ``state_dict`` (keyed by ``(monitor, mode)``); a run resumed from the checkpoint
written at a stop keeps its wait count, so the next check without improvement stops it again.

Two additions for a stop at the onset of memorization (both off by default, Lightning's behaviour):
``divergence_patience`` checks in a row beyond ``divergence_threshold`` before stopping (Lightning: 1), and
``rollback="last_good"``: every check that does not stop becomes the rollback target (a checkpoint is saved at it),
so ``training.export=best`` exports the last weights before the onset instead of the best-scoring ones;
``patience=None`` turns the no-improvement rule off.

A missing metric: ``strict`` raises a ``RuntimeError`` listing the available metrics, otherwise one warning is
emitted and the callback disables itself. Monitors run every N steps, so absence at step 1 proves nothing; the metric
is declared missing when it has never been produced and either (a) a sibling metric — same key up to the last ``/``,
e.g. ``mem/score_gap/t=400`` for ``mem/score_gap/t=500``, or ``train/lr`` for ``train/loss`` — is fresh, i.e. its
producer ran without producing it (a wrong key or band tag), or (b) the step reaches ``expect_by_step`` (default
None: no deadline; set it to the producer's cadence to catch a producer that never runs). A metric still never seen at
the end of training gets a warning.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Literal

from .base import Callback, TrainerControl, TrainerState

logger = logging.getLogger("mnemoguard")


class EarlyStopping(Callback):
    """Stop training when ``monitor`` stops improving, gets good enough, diverges or stops being finite.

    Args:
        monitor: metric key in ``state.metrics`` (e.g. ``"val/loss"``, ``"mem/score_gap/t=500"``).
        mode: ``"min"`` (lower is better) or ``"max"``.
        patience: checks without improvement before stopping (a check = a step where the metric is fresh).
        min_delta: an improvement must beat the best value by more than this (absolute, >= 0).
        stopping_threshold: stop as soon as the value is better than this.
        divergence_threshold: stop as soon as the value is worse than this.
        check_finite: stop when the value is NaN or infinite.
        strict: a missing metric raises (``True``) or warns once and disables the callback (``False``).
        verbose: log every improvement and the stop at INFO level (the stop reason is always recorded).
        start_from_step: checks before this optimizer step are ignored (no best, no wait count, no stop).
        expect_by_step: the step by which the metric must have appeared (see the module docstring); None: no
            deadline, only the sibling-metric rule.
        divergence_patience: consecutive checks beyond ``divergence_threshold`` before stopping (Lightning: 1).
        rollback: ``"best"`` (Lightning: the best-scoring check is the rollback target) or ``"last_good"`` (every
            check that does not stop is).
    """

    def __init__(
        self,
        monitor: str,
        mode: Literal["min", "max"] = "min",
        patience: int | None = 3,
        min_delta: float = 0.0,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        strict: bool = True,
        verbose: bool = False,
        start_from_step: int = 0,
        expect_by_step: int | None = None,
        divergence_patience: int = 1,
        rollback: Literal["best", "last_good"] = "best",
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', found {mode!r}")
        if patience is not None and int(patience) < 1:
            raise ValueError(f"patience counts checks and must be >= 1 (or None: off), found {patience}")
        if int(divergence_patience) < 1:
            raise ValueError(f"divergence_patience counts checks and must be >= 1, found {divergence_patience}")
        if rollback not in ("best", "last_good"):
            raise ValueError(f"rollback must be 'best' or 'last_good', found {rollback!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta is an absolute margin and must be >= 0, found {min_delta}")
        if start_from_step < 0:
            raise ValueError(f"start_from_step must be >= 0, found {start_from_step}")
        if stopping_threshold is not None and divergence_threshold is not None:
            if not self._better_values(mode, stopping_threshold, divergence_threshold):
                raise ValueError(
                    f"with mode={mode!r} the stopping_threshold ({stopping_threshold}) must be better than the "
                    f"divergence_threshold ({divergence_threshold})"
                )
        self.monitor = monitor
        self.mode = mode
        self.patience = int(patience) if patience is not None else None
        self.divergence_patience = int(divergence_patience)
        self.rollback = rollback
        self.divergence_count = 0
        self.min_delta = float(min_delta)
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_finite = check_finite
        self.strict = strict
        self.verbose = verbose
        self.start_from_step = int(start_from_step)
        self.expect_by_step = int(expect_by_step) if expect_by_step is not None else None
        self._prefix = monitor.rsplit("/", 1)[0] + "/" if "/" in monitor else None
        self.wait_count = 0
        self.best_score: float = math.inf if mode == "min" else -math.inf
        self.best_step: int | None = None
        self.stopped_step: int | None = None
        self.stop_reason: str | None = None
        self.num_checks = 0
        self.disabled = False
        self._seen = False
        self._last_checked_step: int | None = None

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}}}"

    # -------------------------------------------------------------------------------- comparisons
    @staticmethod
    def _better_values(mode: str, a: float, b: float) -> bool:
        return a < b if mode == "min" else a > b

    def _better(self, a: float, b: float) -> bool:
        return self._better_values(self.mode, a, b)

    def _improves(self, value: float) -> bool:
        margin = -self.min_delta if self.mode == "min" else self.min_delta
        return self._better(value - margin, self.best_score)  # best starts at ±inf: the first finite value wins

    # -------------------------------------------------------------------------------- hooks
    def on_step_end(self, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._maybe_check(state, control)

    def _maybe_check(self, state: TrainerState, control: TrainerControl) -> None:
        if self.disabled or self._last_checked_step == state.global_step:
            return
        if self.monitor in state.metrics:
            self._seen = True
        if not state.is_fresh(self.monitor):
            if not self._seen:
                if self.expect_by_step is not None and state.global_step >= self.expect_by_step:
                    self._missing(state, f"expected by step {self.expect_by_step}")
                elif self._prefix and (sib := [k for k in state.metrics
                                               if k.startswith(self._prefix) and state.is_fresh(k)]):
                    self._missing(state, f"{sib[0]!r} from the same producer is fresh")
            return
        self._last_checked_step = state.global_step
        if state.global_step < self.start_from_step:
            return
        self.check(float(state.metrics[self.monitor]), state, control)

    def on_train_end(self, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self._seen and not self.disabled:
            state.warn(f"EarlyStopping never saw its monitored metric {self.monitor!r} in this run, so it could not "
                       f"stop it; the metrics were {sorted(state.metrics)}")

    def _missing(self, state: TrainerState, why: str) -> None:
        available = sorted(state.metrics)
        msg = (
            f"EarlyStopping is monitoring {self.monitor!r}, which has not been produced by step {state.global_step} "
            f"({why}); available metrics: {available}. Check the key (band tags included), register the producer "
            "before EarlyStopping, or raise expect_by_step if it is computed less often"
        )
        if self.strict:
            raise RuntimeError(msg)
        warnings.warn(msg + ". EarlyStopping is disabled for this run.", RuntimeWarning, stacklevel=2)
        self.disabled = True

    def check(self, value: float, state: TrainerState, control: TrainerControl) -> bool:
        """Decide on one fresh value (normally called by the hooks); returns whether training should stop."""
        self.num_checks += 1
        step = state.global_step
        name = self.monitor
        best = f"{self.best_score:.6g} at step {self.best_step}" if self.best_step is not None else "none yet"
        reason: str | None = None
        if self.check_finite and not math.isfinite(value):
            reason = f"Monitored metric {name} = {value} is not finite at step {step}; best value was {best}."
        elif self.stopping_threshold is not None and self._better(value, self.stopping_threshold):
            if self._improves(value):
                self._record_best(value, state, control)
            op = "<" if self.mode == "min" else ">"
            reason = (f"Stopping threshold reached at step {step}: {name} = {value:.6g} {op} "
                      f"{self.stopping_threshold}; best value {self.best_score:.6g} at step {self.best_step}.")
        elif self.divergence_threshold is not None and self._better(self.divergence_threshold, value):
            self.divergence_count += 1
            if self.divergence_count >= self.divergence_patience:
                op = ">" if self.mode == "min" else "<"
                checks = f" for {self.divergence_count} checks" if self.divergence_patience > 1 else ""
                if self.rollback != "last_good":
                    target = f"best value was {best}"
                elif self.best_step is not None:
                    target = f"rolling back to step {self.best_step}, the last check before"
                else:
                    target = "no earlier check to roll back to"
                reason = (f"Divergence threshold reached at step {step}: {name} = {value:.6g} {op} "
                          f"{self.divergence_threshold}{checks}; {target}.")
        elif self._improves(value) or self.rollback == "last_good":
            if self.verbose:
                logger.info("EarlyStopping: %s = %.6g at step %d is the rollback target (was %s)", name, value,
                            step, best)
            self._record_best(value, state, control)
        else:
            self.wait_count += 1
            if self.patience is not None and self.wait_count >= self.patience:
                reason = (f"Monitored metric {name} did not improve in the last {self.wait_count} checks "
                          f"(min_delta {self.min_delta}); best value {best}; stopped at step {step}.")
        if reason is None:
            return False
        self.stopped_step = step
        self.stop_reason = reason
        state.stop_reason = reason
        control.should_training_stop = True
        if self.verbose or state.is_world_process_zero:
            logger.info("EarlyStopping: %s", reason)
        return True

    def _record_best(self, value: float, state: TrainerState, control: TrainerControl) -> None:
        self.divergence_count = 0
        self.best_score, self.best_step, self.wait_count = float(value), state.global_step, 0
        state.best_metric, state.best_step = float(value), state.global_step
        control.should_save = True  # the trainer writes checkpoint-{step} and records it as state.best_checkpoint

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "patience": self.patience,
            "wait_count": self.wait_count,
            "divergence_count": self.divergence_count,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "stopped_step": self.stopped_step,
            "stop_reason": self.stop_reason,
            "num_checks": self.num_checks,
            "seen": self._seen,
            "last_checked_step": self._last_checked_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..serialization import check_keys

        num, opt_int = (int, float), (int, type(None))
        check_keys(state, {"monitor": str, "mode": str, "patience": opt_int, "wait_count": int,
                           "divergence_count": int, "best_score": num,
                           "best_step": opt_int, "stopped_step": opt_int, "stop_reason": (str, type(None)),
                           "num_checks": int, "seen": bool, "last_checked_step": opt_int}, self.state_key,
                   required=("monitor", "mode", "wait_count", "best_score", "best_step"))
        if state.get("monitor", self.monitor) != self.monitor or state.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"EarlyStopping state is for monitor={state.get('monitor')!r}, mode={state.get('mode')!r}; this "
                f"callback monitors {self.monitor!r} in mode {self.mode!r}"
            )
        if state.get("patience", self.patience) != self.patience:
            logger.warning("EarlyStopping: patience changed from %s (checkpoint) to %s", state["patience"],
                           self.patience)
        self.wait_count = int(state["wait_count"])
        self.divergence_count = int(state.get("divergence_count", 0))
        self.best_score = float(state["best_score"])
        self.best_step = state["best_step"]
        self.stopped_step = state.get("stopped_step")
        self.stop_reason = state.get("stop_reason")
        self.num_checks = int(state.get("num_checks", 0))
        self._seen = bool(state.get("seen", self.best_step is not None))
        self._last_checked_step = state.get("last_checked_step")
