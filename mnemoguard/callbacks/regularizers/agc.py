"""IET-AGC's anti-gradient control (Liu, Guan, Wu, Miao, "Iterative Ensemble Training with Anti-Gradient Control for
Mitigating Memorization in Diffusion Models", ECCV 2024; code ``liuxiao-guan/IET_AGC`` and ``IET-AGC_SD``): skip the
samples whose loss is abnormally low for their timestep. No extra forward pass."""

from __future__ import annotations

from typing import Any

from ...config.regularizers import AntiGradientControlConfig
from ..base import TrainerControl, TrainerState
from .agc_table import agc_keep
from .base import Regularizer, drop_samples

__all__ = ["AntiGradientControl"]


class AntiGradientControl(Regularizer):
    """IET-AGC's per-sample gate as a switchable callback (``on_loss``).

    The running-mean table is the guard's :class:`~.agc_table.LowLossFlags` (one table for the
    dashboard's flag rates and this gate; its ``mem_ratio`` / ``beta`` / buckets are ``guard.loss_flags``), which runs
    first and writes ``inputs["low_loss_level"]``, the level a loss must reach to be kept: the gate keeps
    ``l_i ≥ strength · level_i`` (:func:`~.agc_table.agc_keep`), so at strength 1 it drops
    exactly the flagged samples. Dropped samples get weight 0 and the kept ones are renormalised
    (:func:`~mnemoguard.callbacks.regularizers.base.drop_samples`). With Min-SNR in the loop the losses carry the SNR
    weight, a function of t alone, which cancels in the per-bucket ratio (exactly with one bucket per timestep).

    Metrics: ``reg/iet_agc/kept_fraction`` (kept / eligible samples since the last log).
    """

    name = "iet_agc"
    config_class = AntiGradientControlConfig
    config: AntiGradientControlConfig
    drops_samples = True

    def on_loss(self, state: TrainerState, control: TrainerControl, context: Any = None, inputs: dict | None = None,
                **kwargs: Any) -> None:
        if not self.active:
            return
        if "low_loss_level" not in inputs:
            raise ValueError("iet_agc reads the low-loss table of the guard's loss flags (inputs['low_loss_level']); "
                             "build it with mnemoguard.Guard, which runs LowLossFlags before it, found none")
        loss = inputs["loss_per_sample"]
        eligible = self.eligible(inputs["levels"]).to(loss.device)
        keep = agc_keep(loss, inputs["low_loss_level"], self.strength) | ~eligible
        inputs["weights"] = drop_samples(inputs["weights"], keep, self.config.renormalize)
        self._count(kept=(keep & eligible).sum(), eligible=eligible.sum())

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        return {"kept_fraction": sums["kept"] / sums["eligible"] if sums.get("eligible") else 1.0}
