"""The memorization danger zone of the noise schedule, estimated from the training data alone.

Dodson, Gao, Wang, Wang & Wan, "Two Calm Ends and the Wild Middle: A Geometric Picture of Memorization in Diffusion
Models" (arXiv 2602.17846, 2026) split the noise levels into three regimes using two curves of the training set
``D = {x_1..x_N}``:

* **posterior concentration** — the *max posterior weight* ``W_σ``: at small σ the empirical posterior over training
  points is one-hot (the optimal denoiser snaps onto a training image), at large σ it is spread (≈ 1/N);
* **coverage by Gaussian shells** — ``C_σ``: at small σ the noisy inputs seen in training (thin shells of radius
  ``σ√d`` around each ``x_i``) cover almost none of the inputs the sampler visits; at larger σ they do.

Memorization is induced where inputs are covered (``C_σ`` high: the sampler lands where training happened) while the
posterior is still concentrated (``W_σ`` high: the target there is one training image). ``W_σ`` is the paper's
Definition 4.1 over the *distinct* training images (pass copies as a ``multiplicity``), ``C_σ`` its Definition 4.6
with the shell of Lemma 4.5 (c = 5), estimated with held-out images (``population``); both as documented by a
co-author's reproduction (the authors' code is not public). The paper gives no numeric band rule: the thresholds of
:func:`danger_zone_band` are ours (a co-author's reproduction used 0.8 on both curves).

Why the band came out empty on the planted testbed before this correction: the training rows were passed with their
copies, and k identical copies split the posterior, capping ``max_i w_i`` at 1/k at every σ (there: ``W_σ ≤ 0.39``
< 0.5 everywhere); and coverage was estimated leave-one-out on training rows, where a duplicated image's own copies
cover it at every σ. Feeding distinct images with their multiplicity, and held-out images as the population, gives
a band (docs/guard.md, "The danger zone").

Modules: :mod:`.posterior` (posterior weights, ``W_σ``), :mod:`.shell_coverage` (``C_σ``), :mod:`._streaming` (the
one pass over the data both share); this module holds both curves from one pass, the band and the σ ↔ timestep
conversion, and re-exports the others' public names.

Noise convention: variance exploding, ``y = x + σ n``. A DDPM latent ``x_t = sqrt(ᾱ_t) x + sqrt(1 − ᾱ_t) n`` is
``sqrt(ᾱ_t)·(x + σ_t n)`` with ``σ_t = sqrt((1 − ᾱ_t) / ᾱ_t)``, and the empirical posterior is scale invariant, so a
DDPM timestep maps to ``σ_t`` (:func:`sigmas_from_alphas_cumprod`); any family's level maps to its VE-equivalent
``σ_t/α_t`` (:meth:`mnemoguard.family.schedule.NoiseSchedule.level_sigmas`; flow matching: ``σ/(1 − σ)``). Pass the
latents exactly as the network sees them (after the VAE scaling and shift).

Memory: the training set is read in blocks of ``chunk_size`` rows (a torch tensor, a numpy array or a numpy memmap:
anything with ``len`` and row indexing), cast to ``dtype`` one block at a time. Peak extra memory is about
``(M + chunk_size)·d + 3·M·chunk_size`` elements for M probe points, whatever N is. Distances use float64 by default:
at small σ the logits are ``‖y − x_i‖² / 2σ²`` and float32 rounding of ``‖y − x_i‖²`` (≈ 1e-7·‖x‖²) would break ties
between duplicated training images, the very case the curve is meant to expose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._streaming import TrainingData, _scan, _setup, _sigma_vector, distinct_rows, subsample_indices
from .posterior import empirical_optimal_denoiser, max_posterior_weight_curve, max_posterior_weights, posterior_weights
from .shell_coverage import chi_square_interval, shell_coverage, shell_coverage_curve, shell_interval

__all__ = [
    "DangerZone",
    "DangerZoneCurves",
    "chi_square_interval",
    "danger_zone_band",
    "danger_zone_curves",
    "distinct_rows",
    "empirical_optimal_denoiser",
    "max_posterior_weight_curve",
    "max_posterior_weights",
    "posterior_weights",
    "shell_coverage",
    "shell_coverage_curve",
    "shell_interval",
    "sigmas_from_alphas_cumprod",
    "sigma_to_timestep",
    "subsample_indices",
]


# ---------------------------------------------------------------------------------------------- curves
class DangerZoneCurves(NamedTuple):
    """``W_σ`` and ``C_σ`` on one σ grid (shape (S,) each), from the same probes."""

    sigmas: torch.Tensor
    max_posterior_weight: torch.Tensor
    coverage: torch.Tensor


def danger_zone_curves(
    train: TrainingData,
    sigmas: torch.Tensor | Sequence[float],
    *,
    num_probes: int = 256,
    generator: torch.Generator,
    population: torch.Tensor | None = None,
    multiplicity: torch.Tensor | Sequence[int] | None = None,
    shell_constant: float = 5.0,
    subsample: int | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> DangerZoneCurves:
    """``W_σ`` and ``C_σ`` of a training set on one σ grid. ``train``: the distinct training images (latents as the
    UNet sees them) with ``multiplicity`` their copies (:func:`distinct_rows`); ``population``: held-out images for
    the coverage (the paper's estimator; without them the training rows stand in, leave-one-out). Without a
    population both curves come from ONE pass over the data (shared probes and distance terms); with one, the
    coverage takes a second pass. Feed the result to :func:`danger_zone_band`."""
    sig, indices, probes, log_mult = _setup(train, sigmas, None, num_probes, subsample, generator, dtype, device,
                                            multiplicity)
    shell = shell_interval(probes.clean.shape[1], shell_constant)
    weights, covered = _scan(train, indices, probes, sig, chunk_size, dtype, want_weights=True,
                             shell=None if population is not None else shell, log_mult=log_mult)
    if population is not None:
        covered = shell_coverage(train, sig, num_probes=num_probes, generator=generator, population=population,
                                 shell_constant=shell_constant, subsample=subsample, chunk_size=chunk_size,
                                 dtype=dtype, device=device, multiplicity=multiplicity)
    return DangerZoneCurves(sig, weights.mean(0), covered.mean(0))


# ---------------------------------------------------------------------------------------------- band
def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE-equivalent noise level of each DDPM timestep, ``σ_t = sqrt((1 − ᾱ_t) / ᾱ_t)`` (float64, shape (T,))."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
    if abar.numel() == 0 or (abar <= 0).any() or (abar > 1).any():
        raise ValueError("alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1]")
    return ((1.0 - abar) / abar).sqrt()


def sigma_to_timestep(sigma: float | torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The timestep whose ``σ_t`` is nearest to ``sigma`` in log scale (``σ_t`` increases with t), int64."""
    table = sigmas_from_alphas_cumprod(alphas_cumprod).clamp_min(1e-12).log()
    s = _sigma_vector(sigma).log()
    return (s[:, None] - table[None]).abs().argmin(1).reshape(torch.as_tensor(sigma).shape)


@dataclass(frozen=True)
class DangerZone:
    """A noise band ``[sigma_lo, sigma_hi]`` and, given a scheduler, the timesteps ``t_lo..t_hi`` (inclusive)."""

    sigma_lo: float
    sigma_hi: float
    t_lo: int | None = None
    t_hi: int | None = None

    @property
    def empty(self) -> bool:
        return not self.sigma_lo <= self.sigma_hi


def _first_crossing(log_sig: torch.Tensor, curve: torch.Tensor, level: float, rising: bool) -> float | None:
    """log σ where ``curve`` first crosses ``level`` going up (rising) or last stays above it (falling)."""
    above = curve >= level
    if rising:
        if not above.any():
            return None
        k = int(torch.nonzero(above)[0])
        if k == 0:
            return float(log_sig[0])
    else:
        if not above.any():
            return None
        k = int(torch.nonzero(above)[-1]) + 1
        if k == curve.numel():
            return float(log_sig[-1])
    c0, c1 = float(curve[k - 1]), float(curve[k])
    frac = (level - c0) / (c1 - c0) if c1 != c0 else 0.0
    return float(log_sig[k - 1] + frac * (log_sig[k] - log_sig[k - 1]))


def danger_zone_band(
    sigmas: torch.Tensor | Sequence[float],
    max_posterior_weight: torch.Tensor,
    coverage: torch.Tensor,
    *,
    weight_threshold: float = 0.5,
    coverage_threshold: float = 0.5,
    level_sigmas: torch.Tensor | None = None,
) -> DangerZone:
    """The band where training inputs cover the sampler's inputs *and* the posterior is still concentrated.

    ``sigma_lo`` = where ``C_σ`` first rises to ``coverage_threshold``; ``sigma_hi`` = where ``W_σ`` last falls below
    ``weight_threshold`` (both linearly interpolated in log σ on the grid). The band is empty
    (``sigma_lo > sigma_hi``) when coverage comes only after the posterior has spread — no danger zone. The
    thresholds are our operational choice (Dodson et al. describe the regimes, not a numeric rule). With
    ``level_sigmas`` (the VE-equivalent σ of every level of a schedule, ascending:
    :meth:`~mnemoguard.family.schedule.NoiseSchedule.level_sigmas`; for a DDPM table
    :func:`sigmas_from_alphas_cumprod`) the band is mapped to the levels whose σ lie inside it (``t_lo = t_hi = None``
    if none do).
    """
    sig = _sigma_vector(torch.as_tensor(sigmas), "sigmas")
    w = torch.as_tensor(max_posterior_weight, dtype=torch.float64).reshape(-1)
    c = torch.as_tensor(coverage, dtype=torch.float64).reshape(-1)
    if not (w.numel() == c.numel() == sig.numel()):
        raise ValueError(
            f"sigmas, max_posterior_weight and coverage must have the same length; found "
            f"{sig.numel()}, {w.numel()}, {c.numel()}"
        )
    if (sig[1:] <= sig[:-1]).any():
        raise ValueError("sigmas must be strictly increasing")
    log_sig = sig.log()
    lo = _first_crossing(log_sig, c, coverage_threshold, rising=True)
    hi = _first_crossing(log_sig, w, weight_threshold, rising=False)
    sigma_lo = math.exp(lo) if lo is not None else math.inf
    sigma_hi = math.exp(hi) if hi is not None else 0.0
    t_lo = t_hi = None
    if level_sigmas is not None and sigma_lo <= sigma_hi:
        table = torch.as_tensor(level_sigmas, dtype=torch.float64).reshape(-1)
        inside = torch.nonzero((table >= sigma_lo) & (table <= sigma_hi)).reshape(-1)
        if inside.numel():
            t_lo, t_hi = int(inside.min()), int(inside.max())
    return DangerZone(sigma_lo, sigma_hi, t_lo, t_hi)
