"""Duplicate-aware loss weights: each training sample's loss divided by the number of copies of its image in the
data set, so that a duplicated image weighs what one image does (deduplication in expectation, without removing
rows). Carlini et al. ("Extracting Training Data from Diffusion Models", USENIX Security 2023) and Somepalli et al.
("Understanding and Mitigating Copying in Diffusion Models", NeurIPS 2023) find duplicated training images to be
the ones diffusion models reproduce, and deduplication the remedy; the copies are the monitor's duplicate groups."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...config.regularizers import DuplicateWeightConfig
from ..base import TrainerControl, TrainerState
from .base import Regularizer

__all__ = ["DuplicateWeight", "duplicate_weights"]


def duplicate_weights(multiplicity: Tensor, strength: float = 1.0, check: bool = True) -> Tensor:
    """Per-sample loss multipliers from the copies of each sample's image in the data set.

    .. math:: w_b = m_b^{-s}

    ``m_b >= 1`` copies (1: an image seen once), ``s`` the strength: at 1 an image with m copies contributes to the
    expected loss as one image does (deduplication in expectation); at 0 nothing changes. Not renormalised: the
    samples of images seen once keep their weight, so what the model learns from them is untouched. ``check``:
    raise on ``m < 1`` (one host synchronisation; the callback checks its table once instead).
    """
    if check and not bool((multiplicity >= 1).all()):
        raise ValueError(f"multiplicity counts copies and must be >= 1, found {multiplicity.min().item()}")
    return multiplicity.to(torch.float32).pow(-float(strength))


class DuplicateWeight(Regularizer):
    """:func:`duplicate_weights` as a switchable callback (``on_loss``): multiplies ``inputs["weights"]`` of the
    micro-batch's samples by ``m^-strength``, ``m`` the copies of their dataset row's image
    (:meth:`~mnemoguard.callbacks.monitor.MemorizationMonitor.duplicate_multiplicity`, the probe choice's duplicate
    scan). Needs the rows (``guard.before_forward(indices=)``) and the monitor (it owns the scan).

    Metrics: ``reg/duplicate_weight/weighted_fraction`` (samples of duplicated images / eligible samples since the last
    log) and ``reg/duplicate_weight/mean_weight`` (their mean multiplier over eligible samples).
    """

    name = "duplicate_weight"
    config_class = DuplicateWeightConfig
    config: DuplicateWeightConfig
    needs = frozenset({"indices", "dataset"})

    def __init__(self, config: DuplicateWeightConfig | None = None, monitor: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if monitor is None:
            raise ValueError("duplicate_weight reads the copies of each image from the monitor's duplicate scan; turn "
                             "the monitor on (guard.monitor.enabled: true), found none")
        self.monitor = monitor
        self._table: Tensor | None = None  # [rows] copies of each row's image, on the loss's device

    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        super().on_train_begin(state, control, context=context, **kwargs)
        self._table = None  # the monitor (earlier in the callback list) may have chosen a new probe set

    def multiplicity(self, indices: Tensor) -> Tensor:
        """``[B]`` copies of each row's image (1 for a row in no duplicate group), on ``indices``' device (a
        lookup in a table built once: no host synchronisation per micro-batch)."""
        if self._table is None or self._table.device != indices.device:
            table = torch.ones(max(int(self.monitor.num_rows), 1), dtype=torch.float32)
            for row, m in self.monitor.duplicate_multiplicity().items():
                table[row] = m
            duplicate_weights(table)  # checked once, here: the lookups below never synchronise
            self._table = table.to(indices.device)
        return self._table[indices.long()]

    def on_loss(self, state: TrainerState, control: TrainerControl, context: Any = None, inputs: dict | None = None,
                **kwargs: Any) -> None:
        if not self.active:
            return
        if inputs.get("indices") is None:
            raise ValueError("duplicate_weight needs the micro-batch's dataset rows: "
                             "guard.before_forward(indices=batch_rows), found none")
        weights = inputs["weights"]
        m = self.multiplicity(inputs["indices"]).to(weights.device)
        eligible = self.eligible(inputs["levels"]).to(weights.device)
        w = torch.where(eligible, duplicate_weights(m, self.strength, check=False), torch.ones_like(m))
        inputs["weights"] = weights * w.to(weights.dtype)
        self._count(weighted=(eligible & (m > 1)).sum(), eligible=eligible.sum(), weight=(w * eligible).sum())

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.get("eligible", 0.0)
        if not n:
            return {"weighted_fraction": 0.0, "mean_weight": 1.0}
        return {"weighted_fraction": sums["weighted"] / n, "mean_weight": sums["weight"] / n}
