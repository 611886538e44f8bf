"""Noise bands: half-open timestep ranges ``[t_lo, t_hi)`` with names, one definition for every component.

The monitor's per-band tags, the low-loss flag rates, the dashboard's charts and the policy's band names all use the
table :func:`resolve_bands` builds once per run; actions take a band as a pair or as a
:class:`~mnemoguard.signals.DangerZone` (inclusive ``t_lo..t_hi``), converted by :func:`as_band`.
"""

from __future__ import annotations

from typing import Any

from ..config.guard import MonitorConfig, band_names

__all__ = ["as_band", "default_bands", "resolve_bands"]


def default_bands(num_train_timesteps: int) -> list[tuple[int, int]]:
    """Low / medium / high noise: the thirds of ``[0, T)``."""
    T = int(num_train_timesteps)
    return [(0, T // 3), (T // 3, 2 * T // 3), (2 * T // 3, T)]


def resolve_bands(monitor: MonitorConfig, num_train_timesteps: int) -> dict[str, tuple[int, int]]:
    """Band name -> ``(t_lo, t_hi)`` from the monitor's settings (default: the thirds, named low / mid / high);
    a ``ValueError`` when a band goes past the schedule."""
    T = int(num_train_timesteps)
    bands = [tuple(b) for b in monitor.bands] if monitor.bands is not None else default_bands(T)
    for lo, hi in bands:
        if hi > T:
            raise ValueError(f"guard.monitor.bands: [{lo}, {hi}) goes past the schedule's {T} timesteps")
    return {name: (int(lo), int(hi)) for name, (lo, hi) in zip(band_names(monitor), bands)}


def as_band(band: Any) -> tuple[int, int]:
    """``(t_lo, t_hi)`` half-open from a pair, or from an object with inclusive ``t_lo`` / ``t_hi`` (a
    :class:`~mnemoguard.signals.DangerZone`); a ``ValueError`` for an empty band or anything else."""
    if hasattr(band, "t_lo") and hasattr(band, "t_hi"):
        if band.t_lo is None or band.t_hi is None:
            raise ValueError(f"the band {band!r} has no timesteps (t_lo/t_hi are None)")
        lo, hi = int(band.t_lo), int(band.t_hi) + 1
    else:
        try:
            lo, hi = (int(b) for b in band)
        except (TypeError, ValueError):
            raise ValueError(f"a band is a (t_lo, t_hi) pair of timesteps or a DangerZone, found {band!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"a band needs 0 <= t_lo < t_hi (half-open [t_lo, t_hi)), found ({lo}, {hi})")
    return lo, hi
