"""The live danger-zone measurement: per noise level, do training images come back as themselves?

Dodson et al. (2026) place memorization in a middle band of noise levels. We measure it on the live model with a
protocol of our own (the paper measures a fixed-σ denoising error and final-sample copies, not this): each probe's
clean sample ``x_0`` is noised to the start ``t_s`` of a few-step DDIM schedule with fixed noise and denoised back
(:func:`mnemoguard.sampling.denoise_from`); the result is compared with a reference set of images (training images,
plus the held-out images) by Gu et al.'s nearest-neighbour ratio ``d1/d2``:

* a **training probe returns** from ``σ_s`` when its nearest reference image is its own training image and
  ``d1/d2 < copy_ratio``;
* a **held-out image returns** (to itself) likewise: at small σ every image does (that is plain denoising); a held-out
  image **lands on a training image** when its nearest reference is a training image with ``d1/d2 < copy_ratio``.

Per σ the rates are fractions of probes × draws, so they carry no units of any model's loss. The *excess* return
rate ``r_at_risk(σ) − r_heldout(σ)`` is what memorization adds to plain denoising; the **live band** is the
contiguous run of grid σ around its maximum where the excess is at least a level (:func:`band_from_excess`). The
random training probes' rate is reported beside it (on the testbed they too come back from high σ in some seeds:
plain images are memorized as well), and stands in for held-out images when there are none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["ReturnProfile", "band_from_excess", "band_timesteps", "return_flags", "return_profile",
           "sequential_copies"]


@dataclass
class ReturnProfile:
    """Return rates on a σ grid (ascending σ): ``rates[split][k]`` for the grid point ``k``; ``counts[split]`` the
    probes × draws behind each rate."""

    timesteps: list[int]
    sigmas: list[float]
    rates: dict[str, list[float]]
    counts: dict[str, int]

    def excess(self) -> list[float]:
        """Per σ, the at-risk probes' return rate (all training probes' without at-risk ones) minus the held-out
        images' self-return rate (plain denoising); without held-out images, minus the random training probes'."""
        top = self.rates.get("at_risk") or self.rates.get("train")
        ref = self.rates.get("heldout_self") or (self.rates.get("random") if self.rates.get("at_risk") else None)
        if not top or not ref:
            return [float("nan")] * len(self.sigmas)
        return [a - b for a, b in zip(top, ref)]

    def to_dict(self) -> dict[str, Any]:
        return {"timesteps": self.timesteps, "sigmas": self.sigmas, "rates": self.rates, "counts": self.counts}


def return_flags(images: torch.Tensor, reference: torch.Tensor, own: torch.Tensor, is_training: torch.Tensor,
                 copy_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(returns, lands_on_training)``, each ``[S, B]`` bool, for denoised ``images`` ``[S, B, ...]`` against the
    ``reference`` images ``[K, ...]`` (no two identical): ``returns`` = the nearest reference is ``own[b]`` (an
    index into ``reference``, or −1) with ``d1/d2 < copy_ratio``; ``lands_on_training`` = the nearest reference is a
    training image (``is_training[k]``) with ``d1/d2 < copy_ratio``."""
    from ..copies import own_copies

    S, B = images.shape[:2]
    check = own_copies(images.reshape(S * B, *images.shape[2:]), reference, own.repeat(S), copy_ratio)
    returns = check.copies.reshape(S, B)
    lands = (check.ratio < copy_ratio).reshape(S, B) & is_training[check.nearest].reshape(S, B)
    return returns, lands


def return_profile(timesteps: list[int], sigmas: list[float], returns: torch.Tensor, lands: torch.Tensor,
                   groups: dict[str, torch.Tensor]) -> ReturnProfile:
    """Rates per σ from :func:`return_flags`' output (grid in the order given, re-sorted by ascending σ).
    ``groups``: split name -> ``[B]`` bool mask of the probes in it; a name starting with ``heldout`` gives
    ``<name>_self`` (returns) and ``<name>_copy`` (lands on a training image), the others their return rate."""
    order = np.argsort(sigmas)
    rates: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for name, mask in groups.items():
        n = int(mask.sum())
        if n == 0:
            continue
        if name.startswith("heldout"):
            for suffix, flags in (("self", returns), ("copy", lands)):
                rates[f"{name}_{suffix}"] = [float(flags[k][mask].float().mean()) for k in order]
                counts[f"{name}_{suffix}"] = n
        else:
            rates[name] = [float(returns[k][mask].float().mean()) for k in order]
            counts[name] = n
    return ReturnProfile([int(timesteps[k]) for k in order], [float(sigmas[k]) for k in order], rates, counts)


def band_from_excess(excess: list[float], level: float, peak: int | None = None) -> tuple[int, int] | None:
    """``(lo, hi)`` grid indices (inclusive) of the contiguous run around the largest excess (or around grid point
    ``peak``) where the excess is at least ``level``; None when that point is below it (or all are NaN)."""
    values = np.asarray(excess, dtype=np.float64)
    if not np.isfinite(values).any():
        return None
    k = int(np.nanargmax(values)) if peak is None else int(peak)
    if not values[k] >= level:
        return None
    lo = hi = k
    while lo > 0 and values[lo - 1] >= level:
        lo -= 1
    while hi + 1 < len(values) and values[hi + 1] >= level:
        hi += 1
    return lo, hi


def band_timesteps(timesteps: list[int], lo: int, hi: int, num_train_timesteps: int) -> tuple[int, int]:
    """The ``[t_begin, t_end)`` timestep band covered by grid points ``lo..hi`` (ascending t): from half-way to the
    grid point below ``lo`` to half-way to the one above ``hi`` (at the grid's ends, half a grid spacing beyond,
    within ``[0, num_train_timesteps)``)."""
    ts = list(timesteps)
    below = ts[lo - 1] if lo > 0 else ts[0] - ((ts[1] - ts[0]) if len(ts) > 1 else ts[0])
    above = ts[hi + 1] if hi + 1 < len(ts) else ts[-1] + ((ts[-1] - ts[-2]) if len(ts) > 1 else num_train_timesteps)
    begin = max(0, (below + ts[lo] + 1) // 2)
    end = min(num_train_timesteps, (ts[hi] + above + 1) // 2)
    return int(begin), int(max(end, begin + 1))


def sequential_copies(draw: Callable[[int, int], torch.Tensor], first: int, most: int, level: float,
                      confidence: float) -> torch.Tensor:
    """Copy flags drawn in rounds (a round: one generation per probe): ``draw(start, count)`` returns the flags of
    rounds ``start .. start + count − 1``. The first ``first`` rounds are always drawn (one call); then, while copies
    were seen but the one-sided exact (Clopper–Pearson) lower bound of the copy rate at ``confidence``
    (:func:`mnemoguard.evaluation.binomial_lower_bound`) is not above ``level``, one round more, up to ``most`` rounds:
    no copy is decided at once (no more rows on a clean model), a clear excess stops drawing, a close call draws more.
    Returns the flags of every round drawn, concatenated."""
    from ...evaluation import binomial_lower_bound

    copies, done = draw(0, first), first
    while done < most and copies.any() and binomial_lower_bound(int(copies.sum()), copies.numel(),
                                                               confidence) <= level:
        copies, done = torch.cat([copies, draw(done, 1)]), done + 1
    return copies
