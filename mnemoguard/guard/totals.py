"""What the guard sums over an optimizer step's micro-batches, on the device: the loss it returned (for
``train/loss``) and the samples kept by the filters (for the veto on a step where nothing was kept). Read once per
step at most, and only when needed (a logged step; a configured filter)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["StepTotals"]


class StepTotals:
    """The step's sums (module docstring); ``skipped_steps`` counts the optimizer steps vetoed in the run."""

    def __init__(self, accelerator: Any, count_kept: bool) -> None:
        self.accelerator, self.count_kept = accelerator, count_kept
        self.skipped_steps = 0
        self.reset()

    def reset(self) -> None:
        self.loss_sum: Tensor | None = None
        self.micro_batches = 0
        self.kept: Tensor | None = None

    def add(self, loss: Tensor, weights: Tensor) -> None:
        """One micro-batch: its loss (detached) and, when filters are configured, how many samples it kept."""
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro_batches += 1
        if self.count_kept:
            kept = (weights != 0).sum()
            self.kept = kept if self.kept is None else self.kept + kept

    def nothing_kept(self) -> bool:
        """Whether every micro-batch of the step, on every rank, had all its samples dropped (one all-reduced count;
        counted in :attr:`skipped_steps`)."""
        if not self.count_kept or self.kept is None:
            return False
        kept = self.kept.reshape(1).float()
        if self.accelerator.num_processes > 1:
            kept = self.accelerator.reduce(kept, reduction="sum")
        if float(kept.item()) > 0:
            return False
        self.skipped_steps += 1
        return True

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
