"""What the guard sums over an optimizer step's micro-batches, on the device: the loss it returned (for ``train/loss``
and the non-finite check) and the samples kept by the filters. Read once per step at most: by the veto, the pre-step
hook on the loop's optimizer, and at logged steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["StepTotals"]


class StepTotals:
    """The step's sums (module docstring).

    Attributes:
        skipped_steps: optimizer steps vetoed in the run because a filter dropped every sample.
        nonfinite: whether the current step's loss (or, at the veto, a gradient) was NaN or infinite, once known.
    """

    def __init__(self, accelerator: Any, count_kept: bool) -> None:
        self.accelerator, self.count_kept = accelerator, count_kept
        self.skipped_steps = 0
        self.reset()

    def reset(self) -> None:
        self.loss_sum: Tensor | None = None
        self.micro_batches = 0
        self.kept: Tensor | None = None
        self.nonfinite: bool | None = None  # unknown until the veto (or step) reads it

    def add(self, loss: Tensor, weights: Tensor) -> None:
        """One micro-batch: its loss (detached) and, when filters are configured, how many samples it kept."""
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro_batches += 1
        if self.count_kept:
            kept = (weights != 0).sum()
            self.kept = kept if self.kept is None else self.kept + kept

    def _reduce(self, values: Tensor) -> Tensor:
        return self.accelerator.reduce(values, reduction="sum") if self.accelerator.num_processes > 1 else values

    def veto(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the optimizer step about to run must be skipped, on every rank alike: the loss or a gradient is
        not finite on some rank, or every sample of every micro-batch on every rank was dropped. One reduced pair of
        numbers and one host read per optimizer step."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = torch.zeros((), device=self.accelerator.device)
        if self.loss_sum is not None:
            bad = bad + (~torch.isfinite(self.loss_sum)).float()
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
            bad = bad + (~torch.isfinite(norm)).float().to(bad.device)
        kept = self.kept.float().to(bad.device) if self.count_kept and self.kept is not None else bad.new_ones(())
        bad, kept = self._reduce(torch.stack([bad, kept])).tolist()
        self.nonfinite = bad > 0
        if self.nonfinite:
            return True
        if kept == 0:
            self.skipped_steps += 1
            return True
        return False

    def step_nonfinite(self) -> bool:
        """The step's verdict on finiteness: the veto's when it ran, else the loss's (one reduced read)."""
        if self.nonfinite is None:
            if self.loss_sum is None:
                return False
            bad = (~torch.isfinite(self.loss_sum)).float().reshape(1)
            self.nonfinite = bool(self._reduce(bad).item() > 0)
        return self.nonfinite

    def train_loss(self) -> dict[str, float]:
        """``{"train/loss": mean over the step's micro-batches and ranks}`` (plus ``train/skipped_steps`` once a step
        was vetoed); empty before the first micro-batch."""
        if self.loss_sum is None:
            return {}
        mean = (self.loss_sum / self.micro_batches).reshape(1)
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean, reduction="mean")
        out = {"train/loss": float(mean.item())}
        if self.skipped_steps:
            out["train/skipped_steps"] = float(self.skipped_steps)
        return out
