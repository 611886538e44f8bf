"""Per-step low-loss flags: IET-AGC's running-mean table (Liu, Guan, Wu, Miao, ECCV 2024), one implementation.

For every training sample of every micro-batch, with no extra forward pass: its loss ``l_i`` is compared with the
running mean ``avg[b_i]`` of its timestep bucket *before* this micro-batch, then the table is updated with every
sample, in batch order, as the authors' code does:

.. math::

    \\text{flag}_i = l_i \\cdot r < \\text{avg}[b_i], \\qquad
    \\text{avg}[b] \\leftarrow \\beta\\,\\text{avg}[b] + (1 - \\beta)\\,l_i \\ \\text{for each } i: b_i = b

with ``r = mem_ratio`` (1.25, their SD setting), ``β = beta`` (0.8), one bucket per training timestep (level of the
schedule) by default, the table starting at 0 (nothing is flagged until it fills). :class:`LowLossFlags` keeps the
table on the device (no host synchronisation per micro-batch), writes ``inputs["low_loss_level"] = avg[b_i] / r`` (a
loss below it is flagged) and ``inputs["low_loss"]`` for the components after it, and counts flags per band and per
dataset row. The ``iet_agc`` gate drops exactly the samples below ``strength · low_loss_level``, so at strength 1 the
dashboard's flag rates are what the gate drops. Each rank keeps its own table (IET-AGC: each client its own); the
checkpoint carries rank 0's.

Counts leave out samples trained on the empty caption (caption dropout; they train the unconditional branch) and
non-finite losses (which also never enter the table). Per band: the flagged fraction since the last log,
``mem/agc/flag_rate/band=<name>``; per row (dataset index given to ``before_forward``; -1 = unknown, counted in the
rates only): how often it was flagged out of how often it was seen, summed over ranks at every log step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...config.guard import LossFlagsConfig
from ...devices import to_device
from ..base import Callback, TrainerControl, TrainerState

__all__ = ["LowLossFlags", "agc_keep", "agc_update", "timestep_buckets"]


def timestep_buckets(levels: Tensor, num_train_timesteps: int, num_buckets: int) -> Tensor:
    """Bucket of each training timestep from its level (:mod:`mnemoguard.callbacks.bands`): ``level·num_buckets //
    T`` (one bucket per training timestep when ``num_buckets == T``)."""
    return (levels.long() * num_buckets // num_train_timesteps).clamp_(0, num_buckets - 1)


def agc_keep(loss: Tensor, level: Tensor, strength: float = 1.0) -> Tensor:
    """IET-AGC's keep mask: ``keep_i = l_i ≥ strength · level_i`` with ``level_i = avg[b_i] / mem_ratio`` (the
    authors' rule ``l_i · mem_ratio ≥ avg[b_i]`` at ``strength = 1``). A bucket never seen has level 0: kept."""
    return loss.detach().double() >= strength * level.to(device=loss.device, dtype=torch.float64)


def agc_update(table: Tensor, loss: Tensor, buckets: Tensor, beta: float, valid: Tensor | None = None) -> Tensor:
    """The running means after this batch, as if updated sample by sample in batch order:
    ``avg[b] ← β^k avg[b] + Σ_j (1 − β) β^(k−1−r_j) l_j`` over the ``k`` samples ``j`` of bucket ``b`` (``r_j``:
    how many of them come before ``j``). Samples outside ``valid`` are skipped. Tensor operations only."""
    loss = loss.detach().to(table.device, torch.float64)
    buckets = buckets.to(table.device)
    valid = torch.ones_like(loss, dtype=torch.bool) if valid is None else valid.to(table.device)
    same = (buckets[:, None] == buckets[None, :]) & valid[:, None] & valid[None, :]
    rank = torch.tril(same, diagonal=-1).sum(dim=1)  # earlier valid samples in the same bucket
    count = same.sum(dim=1)  # valid samples in the bucket (for valid i)
    weight = torch.where(valid, (1 - beta) * beta ** (count - 1 - rank).double(), torch.zeros_like(loss))
    per_bucket = torch.zeros_like(table).index_add_(0, buckets, valid.double())  # k_b
    return table * beta ** per_bucket + torch.zeros_like(table).index_add_(0, buckets, weight * torch.nan_to_num(loss))


class LowLossFlags(Callback):
    """The low-loss flags of every micro-batch (module docstring); the Guard's builder always puts it first."""

    def __init__(self, config: LossFlagsConfig | None = None) -> None:
        self.config = config or LossFlagsConfig()
        self.table: Tensor | None = None
        self.num_train_timesteps = 0
        self.bands: dict[str, tuple[int, int]] = {}
        self._window: Tensor | None = None  # [bands, 2] (flagged, seen) since the last log, this rank
        self._rows: Tensor | None = None  # [2, rows] (flagged, seen) since the last log, this rank
        self.row_counts: Tensor | None = None  # [2, rows] totals over ranks up to the last log
        self.last_ratio: Tensor | None = None  # l_i / avg[b_i] of the last micro-batch (inf where avg = 0)

    @property
    def state_key(self) -> str:
        return "loss_flags"

    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        T = context.num_train_timesteps
        n = self.config.num_buckets or T
        device = context.device
        if self.table is not None and self.table.numel() != n:
            raise ValueError(f"loss_flags: the checkpoint's table has {self.table.numel()} buckets, this run {n}")
        self.num_train_timesteps = T
        self.table = torch.zeros(n, dtype=torch.float64, device=device) if self.table is None else \
            self.table.to(device)
        self.bands = dict(context.bands)
        self._window = torch.zeros(len(self.bands), 2, dtype=torch.float64, device=device)
        rows = len(context.dataset) if context.dataset is not None else 0
        if self.row_counts is not None and self.row_counts.shape[1] != rows:
            raise ValueError(f"loss_flags: the checkpoint counts {self.row_counts.shape[1]} dataset rows, this run "
                             f"has {rows}")
        self.row_counts = torch.zeros(2, rows, dtype=torch.float64) if self.row_counts is None else self.row_counts
        self._rows = torch.zeros(2, rows, dtype=torch.float64, device=device)

    def on_loss(self, state: TrainerState, control: TrainerControl, context: Any = None, inputs: dict | None = None,
                **kwargs: Any) -> None:
        c, table = self.config, self.table
        loss = inputs["loss_per_sample"].detach().to(table.device, torch.float64)
        t = inputs["levels"].to(table.device)
        buckets = timestep_buckets(t, self.num_train_timesteps, table.numel())
        avg = table[buckets]
        level = avg / c.mem_ratio
        valid = torch.isfinite(loss)
        flags = valid & (loss < level)
        inputs["low_loss_level"] = level
        inputs["low_loss"] = flags
        self.last_ratio = torch.where(avg > 0, loss / avg, torch.full_like(avg, float("inf")))
        self.table = agc_update(table, loss, buckets, c.beta, valid)
        counted = valid
        captions = inputs.get("captions")
        if captions is not None:
            captioned = torch.tensor([bool(cap) for cap in captions])
            counted = counted & to_device(captioned, table.device)
        for k, (lo, hi) in enumerate(self.bands.values()):
            in_band = counted & (t >= lo) & (t < hi)
            self._window[k, 0] += (flags & in_band).sum()
            self._window[k, 1] += in_band.sum()
        n = self._rows.shape[1]
        if n:  # masked adds instead of boolean indexing: no device-to-host sync
            idx = inputs["indices"].to(table.device).long()
            known = (counted & (idx >= 0) & (idx < n)).double()
            rows = idx.clamp(0, n - 1)
            self._rows[0].index_add_(0, rows, flags.double() * known)
            self._rows[1].index_add_(0, rows, known)

    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    logs: dict | None = None, **kwargs: Any) -> None:
        if self.table is None or not control.should_log:
            return
        window, rows = self._window.clone(), self._rows.clone()
        self._window.zero_()
        self._rows.zero_()
        if context is not None and context.num_processes > 1:
            window = context.accelerator.reduce(window, reduction="sum")
            rows = context.accelerator.reduce(rows, reduction="sum") if rows.shape[1] else rows
        self.row_counts += rows.cpu()
        values: dict[str, float] = {}
        for (name, _), (flagged, seen) in zip(self.bands.items(), window.tolist()):
            if seen:
                values[f"mem/agc/flag_rate/band={name}"] = flagged / seen
        if self.row_counts.shape[1]:
            values["mem/agc/flagged_samples"] = float((self.row_counts[0] > 0).sum())
        state.update_metrics(values)
        if logs is not None:
            logs.update(values)

    def flagged_rows(self, top: int | None = None) -> list[dict[str, Any]]:
        """Rows flagged at least once, most often (as a share of the times seen) first:
        ``[{"row", "flagged", "seen", "rate"}]`` (totals up to the last log step)."""
        if self.row_counts is None or not self.row_counts.shape[1]:
            return []
        flagged, seen = self.row_counts
        rows = torch.nonzero(flagged > 0).flatten().tolist()
        out = [{"row": r, "flagged": int(flagged[r]), "seen": int(seen[r]), "rate": float(flagged[r] / seen[r])}
               for r in rows]
        out.sort(key=lambda d: (-d["rate"], -d["flagged"], d["row"]))
        return out[:top] if top is not None else out

    def state_dict(self) -> dict[str, Any]:
        return {"table": None if self.table is None else self.table.cpu(),
                "row_counts": None if self.row_counts is None else self.row_counts.cpu(),
                "num_train_timesteps": self.num_train_timesteps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ...serialization import check_keys

        check_keys(state, {"table": (Tensor, type(None)), "row_counts": (Tensor, type(None)),
                           "num_train_timesteps": int}, "loss_flags")
        if state.get("table") is not None:
            n = self.config.num_buckets or state["num_train_timesteps"] or state["table"].numel()
            if state["table"].numel() != n:
                raise ValueError(f"loss_flags: the checkpoint's table has {state['table'].numel()} buckets, the "
                                 f"config asks for {n}")
            device = self.table.device if self.table is not None else "cpu"
            self.table = state["table"].double().to(device)
        if state.get("row_counts") is not None:
            self.row_counts = state["row_counts"].double()
        self.num_train_timesteps = int(state.get("num_train_timesteps") or self.num_train_timesteps)
