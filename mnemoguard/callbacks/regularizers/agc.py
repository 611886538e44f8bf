"""IET-AGC's anti-gradient control (Liu, Guan, Wu, Miao, "Iterative Ensemble Training with Anti-Gradient Control for
Mitigating Memorization in Diffusion Models", ECCV 2024; code ``liuxiao-guan/IET_AGC`` and ``IET-AGC_SD``): skip the
samples whose loss is abnormally low for their timestep. No extra forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..base import TrainerControl, TrainerState
from .base import Regularizer, RegularizerConfig, drop_samples, skip_if_nothing_kept

__all__ = ["AntiGradientControl", "AntiGradientControlConfig", "agc_keep", "agc_update", "timestep_buckets"]


def timestep_buckets(timesteps: Tensor, num_train_timesteps: int, num_buckets: int) -> Tensor:
    """Bucket of each timestep: ``t·num_buckets // T`` (one bucket per timestep when ``num_buckets == T``)."""
    return (timesteps.long().cpu() * num_buckets // num_train_timesteps).clamp_(0, num_buckets - 1)


def agc_keep(loss: Tensor, buckets: Tensor, table: Tensor, mem_ratio: float = 1.25, strength: float = 1.0) -> Tensor:
    """The keep mask: ``keep_i = l_i · mem_ratio ≥ strength · avg_loss[bucket_i]`` (the authors' rule at
    ``strength = 1``: a sample is dropped when its loss is below ``avg/mem_ratio``). A bucket never seen has
    ``avg = 0``, so everything is kept until the table fills. Returns ``[B]`` bool on ``loss``'s device."""
    avg = table[buckets.cpu()].to(device=loss.device, dtype=torch.float64)
    return loss.detach().double() * mem_ratio >= strength * avg


def agc_update(table: Tensor, loss: Tensor, buckets: Tensor, beta: float = 0.8) -> Tensor:
    """The running means after this batch, updated sample by sample in batch order (so two samples of one bucket
    both count): ``avg[b_i] ← β·avg[b_i] + (1 − β)·l_i``. Returns a new table (the input is not modified)."""
    new = table.clone()
    for b, value in zip(buckets.tolist(), loss.detach().double().cpu().tolist()):
        new[b] = beta * new[b] + (1 - beta) * value
    return new


@dataclass
class AntiGradientControlConfig(RegularizerConfig):
    """IET-AGC. ``strength`` multiplies the running mean in the keep rule (0 keeps all, > 1 drops more)."""

    mem_ratio: float = 1.25  # keep iff loss·mem_ratio >= running mean of its timestep (SD: 1.25; CIFAR: 2.0)
    beta: float = 0.8  # decay of the per-timestep running mean (arr_ema_decay)
    num_buckets: int | None = None  # None: one bucket per training timestep (the authors' 1000-entry table)
    renormalize: bool = True  # loss = mean(l·keep)·B/max(sum(keep), 1), as in the code
    track_when_disabled: bool = True  # keep the table up to date while off, so it is warm when switched on


class AntiGradientControl(Regularizer):
    """IET-AGC's per-sample gate as a switchable callback (``on_loss``).

    A table of per-timestep-bucket running means of the per-sample training loss (``loss_per_sample``, initialised
    to 0). At each micro-batch, first the mask (:func:`agc_keep`) against the table *before* this batch, then the
    table update with every sample of the batch (:func:`agc_update`), as in the authors' code. Dropped samples get
    weight 0 and the kept ones are renormalised (:func:`~mnemoguard.callbacks.regularizers.base.drop_samples`); a
    micro-batch with nothing kept is a no-op. With Min-SNR in the trainer the losses carry the SNR weight, which is
    a function of t alone and cancels in the per-bucket ratio (exactly with one bucket per timestep).

    Each rank keeps its own table (IET-AGC: each client its own); the checkpoint carries rank 0's.
    Metrics per step: ``reg/iet_agc/kept_fraction``, ``skipped``, ``skipped_total``.
    """

    name = "iet_agc"
    config_class = AntiGradientControlConfig
    config: AntiGradientControlConfig

    def __init__(self, config: AntiGradientControlConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.num_train_timesteps: int | None = None
        self.table: Tensor | None = None
        self.last_ratio: Tensor | None = None  # l_i / avg[b_i] of the last micro-batch (inf where avg = 0)

    def validate_config(self) -> None:
        c = self.config
        if not c.mem_ratio > 0:
            raise ValueError(f"iet_agc: mem_ratio must be > 0, found {c.mem_ratio}")
        if not 0 <= c.beta < 1:
            raise ValueError(f"iet_agc: beta must be in [0, 1), found {c.beta}")
        if c.num_buckets is not None and c.num_buckets < 1:
            raise ValueError(f"iet_agc: num_buckets must be >= 1, found {c.num_buckets}")

    def _setup(self, num_train_timesteps: int) -> None:
        n = self.config.num_buckets or num_train_timesteps
        if self.table is not None and self.table.numel() != n:
            raise ValueError(f"iet_agc: the table has {self.table.numel()} buckets, the schedule implies {n}")
        self.num_train_timesteps = int(num_train_timesteps)
        if self.table is None:
            self.table = torch.zeros(n, dtype=torch.float64)

    def on_train_begin(self, state: TrainerState, control: TrainerControl, components: Any = None,
                       **kwargs: Any) -> None:
        super().on_train_begin(state, control, **kwargs)
        sched = getattr(components, "noise_scheduler", None)
        if sched is not None:
            self._setup(int(sched.config.num_train_timesteps))

    def on_loss(self, state: TrainerState, control: TrainerControl, inputs: dict, accelerator: Any = None,
                components: Any = None, **kwargs: Any) -> None:
        if not (self.active or self.config.track_when_disabled):
            return
        if self.table is None:
            if components is None:
                raise ValueError("iet_agc needs the number of training timesteps: call it from the trainer "
                                 "(components.noise_scheduler) or set num_train_timesteps first")
            self._setup(int(components.noise_scheduler.config.num_train_timesteps))
        loss, t = inputs["loss_per_sample"], inputs["timesteps"]
        buckets = timestep_buckets(t, self.num_train_timesteps, self.table.numel())
        avg = self.table[buckets]
        self.last_ratio = torch.where(avg > 0, loss.detach().double().cpu() / avg, torch.full_like(avg, float("inf")))
        if self.active:
            self._begin_micro_batch()
            eligible = self.eligible(t)
            keep = agc_keep(loss, buckets, self.table, self.config.mem_ratio, self.strength)
            keep = keep | ~eligible.to(keep.device)
            inputs["weights"] = drop_samples(inputs["weights"], keep, self.config.renormalize)
            skipped = skip_if_nothing_kept(inputs, accelerator)
            self._count(kept=int((keep & eligible.to(keep.device)).sum()), eligible=int(eligible.sum()),
                        skipped=float(skipped))
        self.table = agc_update(self.table, loss, buckets, self.config.beta)

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        return {
            "kept_fraction": sums["kept"] / sums["eligible"] if sums.get("eligible") else 1.0,
            "skipped": sums["skipped"],
            "skipped_total": self.totals.get("skipped", 0.0),
        }

    def extra_state(self) -> dict[str, Any]:
        return {"table": None if self.table is None else self.table.clone(),
                "num_train_timesteps": self.num_train_timesteps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        table = state.get("table")
        if table is not None:
            if self.table is not None and self.table.numel() != table.numel():
                raise ValueError(f"iet_agc: the checkpoint's table has {table.numel()} buckets, this run "
                                 f"{self.table.numel()}")
            self.table = table.clone().double().cpu()
        self.num_train_timesteps = state.get("num_train_timesteps") or self.num_train_timesteps
