"""Noise bands: half-open ranges of the schedule's levels ``[lo, hi)``, carrying the σ range they cover; one type for
every component.

A *level* is the rank of a training timestep by noise (:mod:`mnemoguard.family.schedule`: the DDPM timestep itself,
the ``T − 1 − i``-th flow-matching timestep), so the monitor's per-band tags, the low-loss flag rates, the
dashboard's charts, the policy's band names, the danger-zone tracker's live band and the noise gap all mean the same
noise levels in every family; :attr:`NoiseBand.sigma_lo` / :attr:`~NoiseBand.sigma_hi` say which, as VE-equivalent
σ = σ_t/α_t. :func:`resolve_bands` builds the run's table once; actions take a band as a :class:`NoiseBand`, a pair,
or a :class:`~mnemoguard.signals.DangerZone` (inclusive ``t_lo..t_hi``), converted by :func:`as_band`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..config.guard import MonitorConfig, band_names

__all__ = ["NoiseBand", "as_band", "default_bands", "resolve_bands"]


@dataclass(frozen=True)
class NoiseBand:
    """The levels ``[lo, hi)`` of a schedule and the VE-equivalent σ of its first and last level. Iterates as the
    pair ``(lo, hi)``."""

    lo: int
    hi: int
    sigma_lo: float = math.nan
    sigma_hi: float = math.nan

    def __post_init__(self) -> None:
        if not 0 <= int(self.lo) < int(self.hi):
            raise ValueError(f"a band needs 0 <= lo < hi (half-open [lo, hi) of levels), found ({self.lo}, {self.hi})")

    def __iter__(self):
        yield int(self.lo)
        yield int(self.hi)

    @classmethod
    def of(cls, schedule: Any, lo: int, hi: int) -> NoiseBand:
        """``[lo, hi)`` of ``schedule`` (a :class:`~mnemoguard.family.schedule.NoiseSchedule`) with its σ range."""
        sig = schedule.level_sigmas()
        T = sig.numel()
        if not 0 <= lo < hi <= T:
            raise ValueError(f"a band must satisfy 0 <= lo < hi <= {T} (the schedule's levels); found [{lo}, {hi})")
        return cls(int(lo), int(hi), float(sig[lo]), float(sig[hi - 1]))

    def contains(self, levels: Tensor) -> Tensor:
        """``[B]`` bool: the levels inside the band."""
        return (levels >= self.lo) & (levels < self.hi)

    def describe(self) -> str:
        if math.isnan(self.sigma_lo):
            return f"levels [{self.lo}, {self.hi})"
        return f"levels [{self.lo}, {self.hi}) (σ {self.sigma_lo:.3g}–{self.sigma_hi:.3g})"


def default_bands(num_train_timesteps: int) -> list[tuple[int, int]]:
    """Low / medium / high noise: the thirds of the ``T`` levels."""
    T = int(num_train_timesteps)
    return [(0, T // 3), (T // 3, 2 * T // 3), (2 * T // 3, T)]


def resolve_bands(monitor: MonitorConfig, schedule: Any) -> dict[str, NoiseBand]:
    """Band name -> :class:`NoiseBand` of ``schedule`` from the monitor's settings (default: the thirds, named
    low / mid / high); a ``ValueError`` when a band goes past the schedule."""
    T = int(schedule.num_train_timesteps)
    bands = [tuple(b) for b in monitor.bands] if monitor.bands is not None else default_bands(T)
    for lo, hi in bands:
        if hi > T:
            raise ValueError(f"guard.monitor.bands: [{lo}, {hi}) goes past the schedule's {T} levels")
    return {name: NoiseBand.of(schedule, int(lo), int(hi)) for name, (lo, hi) in zip(band_names(monitor), bands)}


def as_band(band: Any) -> tuple[int, int]:
    """``(lo, hi)`` half-open levels from a :class:`NoiseBand`, a pair, or an object with inclusive ``t_lo`` /
    ``t_hi`` (a :class:`~mnemoguard.signals.DangerZone`); a ``ValueError`` for an empty band or anything else."""
    if isinstance(band, NoiseBand):
        return int(band.lo), int(band.hi)
    if hasattr(band, "t_lo") and hasattr(band, "t_hi"):
        if band.t_lo is None or band.t_hi is None:
            raise ValueError(f"the band {band!r} has no timesteps (t_lo/t_hi are None)")
        lo, hi = int(band.t_lo), int(band.t_hi) + 1
    else:
        try:
            lo, hi = (int(b) for b in band)
        except (TypeError, ValueError):
            raise ValueError(f"a band is a NoiseBand, a (lo, hi) pair of levels or a DangerZone, found "
                             f"{band!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"a band needs 0 <= t_lo < t_hi (half-open [t_lo, t_hi)), found ({lo}, {hi})")
    return lo, hi

