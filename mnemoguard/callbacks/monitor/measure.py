"""One check's per-row measurements, each a pure function of :mod:`mnemoguard.signals` at the row's fixed inputs.

Per row ``(x_0, ε, t, c)`` with ``x_t = α_t x_0 + σ_t ε`` (one classifier-free call gives ``ε_c`` and ``ε_∅``):

==================  ======================================================================  =======================
column (signal)     value                                                                   cost
==================  ======================================================================  =======================
``live_vs_baseline`` ``‖ε_live(x_t, t, c) − ε_base(x_t, t, c)‖₂`` (:func:`live_baseline_gap`)  1 baseline pass
``wen_gap``          ``‖ε(x_t, t, c) − ε(x_t, t, ∅)‖₂`` (:func:`wen_norm`, Wen et al. 2024)      1 CFG call (2 passes)
``anisotropy``       channel cosine of ε_∅ and ε_c − ε_∅ (:func:`anisotropy_cosine`, Asthana &   free (same call)
                     Belagiannis 2026)
``probe_loss``       ``mean (pred − target)²`` at the fixed noise (:func:`denoising_loss`)      free (same call)
==================  ======================================================================  =======================

The rows are split across ranks (each computes its share, padded so every rank makes the same calls, as ZeRO-3
needs) and gathered, so every rank holds every value and takes the same decisions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...baselines import UnconditionalBaseline
from ...config.guard import SIGNALS
from ...denoiser import denoising_loss
from ...signals import anisotropy_cosine, live_baseline_gap, wen_norm

__all__ = ["COLUMNS", "measure_rows", "measure_all"]

COLUMNS = {name: i for i, name in enumerate(SIGNALS)}  # column of each signal in the [N, 4] values


@torch.no_grad()
def measure_rows(den: Any, baseline: Any, tz: Any, rows: list[int], signals: set[str],
                 score_space: bool = False) -> Tensor:
    """``[len(rows), 4]`` float32 values (NaN for a signal not asked for, or no baseline yet) of the given rows.

    ``baseline``: an object with ``eps(x_t, t, cond)`` (:mod:`mnemoguard.baselines`; an
    :class:`~mnemoguard.baselines.UnconditionalBaseline` is ``ε_∅`` itself, taken from the same call), or None (not
    available yet)."""
    sel = torch.tensor(rows, dtype=torch.long, device=tz.t.device)
    t = tz.t[sel]
    x_t = tz.noisy(sel, den.schedule)
    cond = tz.cond[sel]
    raw_c, raw_u = den.raw_cond_uncond(x_t, t, cond, tz.uncond)
    sigma = den.sigma(t, dtype=x_t.dtype, device=x_t.device)
    eps_c, eps_u = den.to_eps(raw_c.float(), x_t, t), den.to_eps(raw_u.float(), x_t, t)
    nan = torch.full((len(rows),), float("nan"), device=x_t.device)
    out = [nan] * len(SIGNALS)
    if "probe_loss" in signals:
        out[COLUMNS["probe_loss"]] = denoising_loss(raw_c, den.target(tz.x0[sel], tz.noise[sel], t))
    if "wen_gap" in signals:
        out[COLUMNS["wen_gap"]] = wen_norm(eps_c, eps_u)
    if "anisotropy" in signals and eps_c.ndim >= 3:
        out[COLUMNS["anisotropy"]] = anisotropy_cosine(eps_c, eps_u)
    if "live_vs_baseline" in signals and baseline is not None:
        base = eps_u if isinstance(baseline, UnconditionalBaseline) else baseline.eps(x_t, t, cond).float()
        out[COLUMNS["live_vs_baseline"]] = live_baseline_gap(eps_c, base, sigma=sigma if score_space else None)
    return torch.stack([v.float() for v in out], dim=1)


def measure_all(context: Any, den: Any, baseline: Any, tz: Any, signals: set[str], batch_size: int,
                score_space: bool = False) -> Tensor:
    """``[N, 4]`` float64 values of every row on every rank (this rank's share measured, then gathered)."""
    N = tz.t.shape[0]
    W, r = context.num_processes, context.process_index
    per_rank = math.ceil(N / W)
    mine = [min(i, N - 1) for i in range(r * per_rank, (r + 1) * per_rank)]  # padded to the same size
    parts = [measure_rows(den, baseline, tz, mine[i:i + batch_size], signals, score_space)
             for i in range(0, len(mine), batch_size)]
    local = torch.cat(parts).to(context.device)
    if W > 1:
        local = context.accelerator.gather(local.contiguous())
    return local[:N].double().cpu()
