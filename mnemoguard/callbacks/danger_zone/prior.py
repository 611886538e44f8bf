"""The danger zone's data prior: Dodson et al.'s curves of the training set, before any training step.

``W_σ`` (the max posterior weight of the distinct training images, copies as their multiplicity) and ``C_σ`` (the
shell coverage of held-out images, or of the training images leave-one-out without them) on a log-spaced σ grid
spanning the schedule's VE-equivalent σ, and the band they imply (:func:`mnemoguard.signals.danger_zone_band`) mapped
to levels. Computed on latents exactly as the network sees them, from a uniform subsample of the rows.
"""

from __future__ import annotations

from typing import Any

import torch

from ...signals import danger_zone_band, danger_zone_curves, distinct_rows
from ..monitor.tensors import encode_pixels

__all__ = ["data_prior"]


def data_prior(context: Any, config: Any, seed: int, heldout: torch.Tensor | None = None) -> dict[str, Any]:
    """``{"sigmas", "max_posterior_weight", "coverage", "band": {...}, "rows", "distinct", "population"}``:
    the curves and band of ``config.prior_rows`` training rows (``config``: a
    :class:`~mnemoguard.config.danger_zone.DangerZoneConfig`); ``heldout``: held-out latents for the coverage."""
    ds = context.dataset
    n = len(ds)
    g = torch.Generator().manual_seed(seed)
    rows = sorted(torch.randperm(n, generator=g)[: config.prior_rows].tolist())
    pixels, used = [], []
    for r in rows:
        try:
            pixels.append(ds.canonical_image(r))
            used.append(r)
        except ValueError:  # unreadable rows are reported by the data check and the probe choice
            continue
    latents = encode_pixels(context, pixels).float().cpu()
    distinct, multiplicity, _ = distinct_rows(latents)
    table = context.schedule.level_sigmas()
    finite = table[torch.isfinite(table)]
    lo, hi = float(table[1].clamp_min(1e-4)), float(finite[-1])
    sigmas = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), config.prior_sigmas,
                            dtype=torch.float64)
    population = heldout.float().cpu() if heldout is not None and heldout.shape[0] else None
    curves = danger_zone_curves(distinct, sigmas, num_probes=config.prior_probes, generator=g,
                                multiplicity=multiplicity, population=population)
    band = danger_zone_band(curves.sigmas, curves.max_posterior_weight, curves.coverage,
                            weight_threshold=config.weight_threshold, coverage_threshold=config.coverage_threshold,
                            level_sigmas=table)
    return {
        "sigmas": curves.sigmas.tolist(), "max_posterior_weight": curves.max_posterior_weight.tolist(),
        "coverage": curves.coverage.tolist(),
        "band": {"sigma_lo": band.sigma_lo if not band.empty else None,
                 "sigma_hi": band.sigma_hi if not band.empty else None, "t_lo": band.t_lo, "t_hi": band.t_hi,
                 "empty": band.empty},
        "rows": len(used), "distinct": int(distinct.shape[0]), "population": "heldout" if population is not None
        else "training rows (leave-one-out)",
    }
