"""Moving small host tensors to the accelerator without stalling its queue."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_device"]


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """A CPU tensor on ``device``: a pinned, non-blocking copy to CUDA (a pageable copy would wait for every kernel
    already queued); unchanged when it is already there."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
