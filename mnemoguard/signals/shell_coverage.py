"""Coverage by Gaussian shells, ``C_σ``: do the noisy inputs seen in training cover the inputs the sampler visits?

Dodson, Gao, Wang, Wang & Wan, "Two Calm Ends and the Wild Middle: A Geometric Picture of Memorization in Diffusion
Models" (arXiv 2602.17846, 2026): at small σ the noisy inputs seen in training (thin shells of radius ``σ√d`` around
each ``x_i``) cover almost none of the inputs the sampler visits; at larger σ they do. No public code exists for the
paper; the test below is our reconstruction (research notes §4.2). :mod:`.danger_zone` pairs ``C_σ`` with the max
posterior weight ``W_σ`` (:mod:`.posterior`).

Noise convention (variance exploding, ``y = x + σ n``), data access in blocks and memory: see :mod:`.danger_zone` and
:mod:`._streaming`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._streaming import TrainingData, _scan, _setup

__all__ = ["chi_square_interval", "shell_coverage", "shell_coverage_curve"]


def chi_square_interval(dim: int, level: float) -> tuple[float, float]:
    """Central ``level`` interval ``[q_lo, q_hi]`` of the ``χ²_dim`` law (exact, by bisection on the CDF).

    The CDF is the regularised lower incomplete gamma ``P(d/2, q/2)`` (``torch.special.gammainc``); 200 float64
    bisection steps reach machine precision.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1; found {dim}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); found {level}")
    half = torch.tensor(dim / 2.0, dtype=torch.float64)
    targets = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    lo = torch.zeros(2, dtype=torch.float64)
    hi = torch.full((2,), dim + 50.0 * math.sqrt(2.0 * dim) + 100.0, dtype=torch.float64)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        below = torch.special.gammainc(half, mid / 2.0) < targets
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    q = 0.5 * (lo + hi)
    return float(q[0]), float(q[1])


def shell_coverage(
    train: TrainingData,
    sigmas: torch.Tensor | Sequence[float],
    *,
    num_probes: int = 256,
    generator: torch.Generator,
    population: torch.Tensor | None = None,
    level: float = 0.99,
    subsample: int | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-probe shell indicator (0./1.), shape (num_probes, S); its probe mean is :func:`shell_coverage_curve`."""
    sig, indices, probes = _setup(train, sigmas, population, num_probes, subsample, generator, dtype, device)
    shell = chi_square_interval(probes.clean.shape[1], level)
    _, covered = _scan(train, indices, probes, sig, chunk_size, dtype, want_weights=False, shell=shell)
    return covered


def shell_coverage_curve(
    train: TrainingData,
    sigmas: torch.Tensor | Sequence[float],
    *,
    num_probes: int = 256,
    generator: torch.Generator,
    population: torch.Tensor | None = None,
    level: float = 0.99,
    subsample: int | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian-shell coverage ``C_σ``, shape (S,).

    Definition (ours; the paper's exact form is not public):

        ``C_σ = Pr_{x ~ p, z ~ N(0, I)}[ ∃ i : ‖x + σz − x_i‖² / σ² ∈ [q_lo, q_hi] ]``,

    where ``[q_lo, q_hi]`` is the central ``level`` interval of ``χ²_d``. In words: the probability that a noisy
    input the sampler may visit (a population point noised at σ) lies in the *typical shell* of some training
    point — the region where that point's own noisy training inputs ``x_i + σn`` fall with probability ``level``.

    Why this form: (1) it is the shell picture of the paper made into a calibrated test — membership of the shell is
    exactly "this input is indistinguishable, by its distance, from an input trained on at this σ", with the shell
    thickness set by the χ² spread (≈ σ·√2 in squared-radius units per √d) rather than a free tolerance; (2) it has
    the right limits: at small σ a fresh point is ``‖x − x_i‖ ≫ σ√d`` away from every training point, so
    ``C_σ → 0``; at large σ, ``(‖x + σz − x_i‖² − σ²‖z‖²)/σ² = ‖x − x_i‖²/σ² + 2 z·(x − x_i)/σ → 0`` so
    ``C_σ → level``; (3) it needs only distances, so it streams over the data in chunks like ``W_σ``.

    ``population``: samples of the data law p (e.g. held-out latents), shape (P, ...). Without it the training
    (sub)sample stands in for p, *leave-one-out*: probe ``x_j`` is tested against the shells of every ``x_i, i ≠ j``
    (an exact duplicate of ``x_j`` still covers it — as it should). Cost as
    :func:`~mnemoguard.signals.posterior.max_posterior_weight_curve`.
    """
    return shell_coverage(
        train,
        sigmas,
        num_probes=num_probes,
        generator=generator,
        population=population,
        level=level,
        subsample=subsample,
        chunk_size=chunk_size,
        dtype=dtype,
        device=device,
    ).mean(0)
