"""The guard's run state in every checkpoint: one versioned document, a key per component, no pickle.

:class:`RunStateHooks` registers accelerate's save / load state hooks, so ``accelerator.save_state(dir)`` also writes
``dir/mnemoguard_state.json`` + ``dir/mnemoguard_state.safetensors`` (:mod:`mnemoguard.serialization`) and
``accelerator.load_state(dir)`` reads them back, whether the loop is the reference trainer or a diffusers script. The
document::

    {"format": "mnemoguard.run_state", "version": 2,
     "trainer_state": {global_step, micro_step, log_history, metrics, best_step, ...},
     "guard": {"skipped_steps", "seconds", "component_seconds"},
     "ema": {... the EMA the guard owns, tensors in the safetensors file} | null,
     "components": {state_key: that component's state_dict(), ...}}

Loading is tolerant of the run changing between checkpoints: a component without a key in the checkpoint (added
since) starts fresh, a key without a component (removed since) is reported and dropped, a checkpoint saved without the
guard (no document) leaves the guard fresh and says so. What cannot carry over is an error naming the file and key.
Accelerate itself still pickles the optimizer, the LR scheduler, the dataloader samplers, the gradient scaler and the
RNG states (``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``) and loads all of them with
``torch.load(weights_only=True)``, a restricted unpickler that builds tensors, containers and numpy arrays but runs no
code; only objects registered with ``accelerator.register_for_checkpointing`` are loaded with
``weights_only=False`` (``custom_checkpoint_<i>.pkl``), and the guard registers none, so such a file in a checkpoint is
never read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..serialization import StateFormatError, check_keys, load_state_files, save_state_files

logger = logging.getLogger("mnemoguard")

__all__ = ["FILE_NAME", "FORMAT", "VERSION", "RunStateHooks"]

FORMAT, VERSION, FILE_NAME = "mnemoguard.run_state", 2, "mnemoguard_state"


class RunStateHooks:
    """Saves and restores a :class:`~mnemoguard.Guard`'s state with accelerate's checkpoints (module docstring)."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self.pending_path: Path | None = None  # the final name of the checkpoint being saved (Guard.note_checkpoint)
        self.loaded_from: Path | None = None
        self._paused = False
        acc = guard.accelerator
        self._handles = [acc.register_save_state_pre_hook(self._save_hook),
                         acc.register_load_state_pre_hook(self._load_hook)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Neither save nor restore the guard's state for the block (the reference trainer loading only a best
        checkpoint's weights through ``accelerator.load_state`` under DeepSpeed)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    # ------------------------------------------------------------------------------------------------ documents
    def state_dict(self) -> dict[str, Any]:
        g = self.guard
        return {
            "format": FORMAT,
            "version": VERSION,
            "trainer_state": g.state.state_dict(),
            "guard": {"skipped_steps": int(g.totals.skipped_steps), "seconds": float(g.seconds),
                      "component_seconds": dict(g.callbacks.seconds)},
            "ema": g.ema.state_dict() if g._owns_ema else None,
            "components": {key: cb.state_dict() for key, cb in g.callbacks.stateful().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], where: str = "guard state") -> None:
        g = self.guard
        if g._begun:
            raise RuntimeError("Guard: its state must be restored before training starts (accelerator.load_state "
                               "before the first guard call), found a guard already at work")
        check_keys(state, {"format": str, "version": int, "trainer_state": dict, "guard": dict,
                           "ema": (dict, type(None)), "components": dict}, where,
                   required=("format", "version", "trainer_state", "components"))
        if state["format"] != FORMAT or state["version"] != VERSION:
            raise StateFormatError(f"{where}: expected format {FORMAT!r} version {VERSION}, found "
                                   f"{state['format']!r} version {state['version']}")
        _load(g.state.load_state_dict, state["trainer_state"], where, "trainer_state")
        own = state.get("guard") or {}
        g.totals.skipped_steps = int(own.get("skipped_steps", 0))
        g.seconds = float(own.get("seconds", 0.0))
        g.callbacks.seconds.update({str(k): float(v) for k, v in own.get("component_seconds", {}).items()})
        if state.get("ema") is not None:
            if g._owns_ema:
                _load(g.ema.load_state_dict, state["ema"], where, "ema")
            else:
                logger.warning("Guard: the checkpoint holds the EMA the guard built, but this guard uses none of its "
                               "own (ema= given, or not needed): not restored")
        elif g._owns_ema:
            logger.warning("Guard: the checkpoint has no EMA of the guard's; the EMA starts from the current weights")
        components = g.callbacks.stateful()
        saved = state["components"]
        for key, cb in components.items():
            if key in saved:
                _load(cb.load_state_dict, saved[key], where, f"components.{key}")
            else:
                logger.warning("Guard: the checkpoint has no state for %s (added since it was saved): it starts fresh",
                               key)
        dropped = sorted(set(saved) - set(components))
        if dropped:
            logger.warning("Guard: the checkpoint has state for %s, which this run does not have: dropped", dropped)
        g.state.stop_reason = None  # resuming is a decision to go on
        g.control.should_training_stop = False

    # ------------------------------------------------------------------------------------------------ hooks
    def _save_hook(self, models: Any, weights: Any, output_dir: str) -> None:
        if self._paused:
            return
        g = self.guard
        path = self.pending_path or Path(output_dir)
        self.pending_path = None
        if g.state.best_step is not None and g.state.best_step == g.state.global_step:
            g.state.best_checkpoint = str(path)  # before writing: the checkpoint knows it is the rollback target
        if g.state.nonfinite_steps == 0:
            g.state.finite_checkpoint = str(path)  # saved before anything non-finite happened: kept by rotation
        if g.accelerator.is_main_process:
            save_state_files(self.state_dict(), output_dir, FILE_NAME)
        g.callbacks.call("on_save", g.state, g.control, checkpoint=path, context=g.context)

    def _load_hook(self, models: Any, input_dir: str) -> None:
        if self._paused:
            return
        state = load_state_files(input_dir, FILE_NAME)
        if state is None:
            logger.warning("Guard: %s holds no guard state (saved without the guard); the guard starts fresh",
                           input_dir)
            return
        self.load_state_dict(state, where=str(Path(input_dir) / f"{FILE_NAME}.json"))
        self.loaded_from = Path(input_dir)


def _load(fn: Any, value: Any, where: str, key: str) -> None:
    """``fn(value)``, with any schema error re-raised naming the file (``where``) and the key."""
    try:
        fn(value)
    except StateFormatError as e:
        message = str(e)
        raise StateFormatError(f"{where}: {message if message.startswith(key) else f'{key}: {message}'}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise StateFormatError(f"{where}: {key}: cannot be restored ({type(e).__name__}: {e})") from None
