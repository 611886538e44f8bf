"""Running something inside a training run without changing it: the global RNG state and the modules' train flags.

The monitor's checks, the bench's evaluations and the probe generations draw random numbers and switch the UNet to
eval mode; wrapped in :func:`preserved_rng_state` and :func:`eval_mode`, the training run continues exactly as it
would without them (tested: the same weights with and without monitoring).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["eval_mode", "preserved_rng_state"]


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Save the global RNG states (torch CPU, every initialised CUDA device, numpy, ``random``) and put them back on
    exit, also on exceptions: whatever runs inside cannot change the training trajectory through the RNG."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module.eval()`` for the block; every submodule gets its own ``training`` flag back on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
