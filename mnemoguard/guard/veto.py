"""The guard's veto on an optimizer step: a pre-step hook on the loop's optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["register_step_veto"]


def register_step_veto(optimizer: Any, veto: Callable[[torch.optim.Optimizer], bool]) -> Any:
    """A pre-step hook on the innermost torch optimizer (through accelerate's and DeepSpeed's wrappers): when
    ``veto(optimizer)`` says so, every gradient is set to None, so the optimizer skips every parameter this step
    (weights, Adam's moments and step counts stay as they were)."""
    inner = optimizer
    while hasattr(inner, "optimizer"):  # AcceleratedOptimizer, DeepSpeed's ZeRO optimizers
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch optimizer (or accelerate's wrapper of one), found "
                        f"{type(optimizer).__name__}")

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if veto(opt):
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None

    return inner.register_step_pre_hook(hook)
