"""Coverage by Gaussian shells, ``C_σ``: do the noisy inputs seen in training cover the inputs the sampler visits?

Dodson, Gao, Wang, Wang & Wan, "Two Calm Ends and the Wild Middle: A Geometric Picture of Memorization in Diffusion
Models" (arXiv 2602.17846, 2026): at small σ the noisy inputs seen in training (thin shells of radius ``σ√d`` around
each ``x_i``) cover almost none of the inputs the sampler visits; at larger σ they do. The definitions follow the
paper's Lemma 4.5 (the shell) and Definition 4.6 (coverage, estimated with held-out images), as documented by a
co-author's reproduction (github.com/xinyugao233/spectral-diffusion-playground; the authors' code is not public).
:mod:`.danger_zone` pairs ``C_σ`` with the max posterior weight ``W_σ`` (:mod:`.posterior`).

Noise convention (variance exploding, ``y = x + σ n``), data access in blocks and memory: see :mod:`.danger_zone` and
:mod:`._streaming`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._streaming import TrainingData, _scan, _setup

__all__ = ["chi_square_interval", "shell_coverage", "shell_coverage_curve", "shell_interval"]


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


def shell_interval(dim: int, shell_constant: float = 5.0) -> tuple[float, float]:
    """Dodson et al.'s shell (Lemma 4.5, a Laurent–Massart bound) in squared units of σ:
    ``[r_in², r_out²] = [d − 2√(c·d), d + 2√(c·d) + 2c]`` with shell constant ``c`` (the paper's default 5; the
    χ²_d mass inside is ≥ 1 − 2e^{−c}, 0.9993 at d = 256). A noisy point ``y`` lies in training point ``x_i``'s
    shell at σ when ``‖y − x_i‖² / σ² ∈ [r_in², r_out²]``."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1; found {dim}")
    if not shell_constant > 0:
        raise ValueError(f"shell_constant must be > 0; found {shell_constant}")
    half_width = 2.0 * math.sqrt(shell_constant * dim)
    return max(0.0, dim - half_width), dim + half_width + 2.0 * shell_constant


def shell_coverage(
    train: TrainingData,
    sigmas: torch.Tensor | Sequence[float],
    *,
    num_probes: int = 256,
    generator: torch.Generator,
    population: torch.Tensor | None = None,
    shell_constant: float = 5.0,
    subsample: int | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    multiplicity: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-probe shell indicator (0./1.), shape (num_probes, S); its probe mean is :func:`shell_coverage_curve`."""
    sig, indices, probes, _ = _setup(train, sigmas, population, num_probes, subsample, generator, dtype, device,
                                     multiplicity)
    shell = shell_interval(probes.clean.shape[1], shell_constant)
    _, covered = _scan(train, indices, probes, sig, chunk_size, dtype, want_weights=False, shell=shell)
    return covered


def shell_coverage_curve(
    train: TrainingData,
    sigmas: torch.Tensor | Sequence[float],
    *,
    num_probes: int = 256,
    generator: torch.Generator,
    population: torch.Tensor | None = None,
    shell_constant: float = 5.0,
    subsample: int | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    multiplicity: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Gaussian-shell coverage ``C_σ``, shape (S,): Dodson et al.'s Definition 4.6,

        ``C_σ(p, D) = Pr_{x ~ p, z ~ N(0, I)}[ ∃ i : x + σz ∈ S_σ(x_i) ]``,
        ``S_σ(x_i) = {y : σ r_in ≤ ‖y − x_i‖ ≤ σ r_out}`` (:func:`shell_interval`, c = ``shell_constant``).

    In words: the probability that a noisy input the sampler may visit (a point of the data law p noised at σ) lies
    in the shell of some training point, where that point's own noisy training inputs ``x_i + σn`` fall. Limits: at
    small σ a fresh point is ``‖x − x_i‖ ≫ σ√d`` away from every training point, so ``C_σ → 0``; at large σ,
    ``(‖x + σz − x_i‖² − σ²‖z‖²)/σ² → 0`` and ``C_σ`` tends to the shell's χ² mass (≈ 1).

    ``population``: samples of the data law p — held-out images (latents) as the paper estimates it (shape (P, ...)).
    Without it the training (sub)sample stands in for p, *leave-one-out*: probe ``x_j`` is tested against the shells
    of every other row ``i ≠ j``. Pass distinct rows and their ``multiplicity`` (:func:`distinct_rows`) so that a
    duplicated image's own copies do not cover it (they would, at every σ); then probes are drawn ∝ multiplicity.
    (The paper's construction was checked through a co-author's documented reproduction; the paper gives no numeric
    band rule.) Cost as :func:`~mnemoguard.signals.posterior.max_posterior_weight_curve`.
    """
    return shell_coverage(
        train,
        sigmas,
        num_probes=num_probes,
        generator=generator,
        population=population,
        shell_constant=shell_constant,
        subsample=subsample,
        chunk_size=chunk_size,
        dtype=dtype,
        device=device,
        multiplicity=multiplicity,
    ).mean(0)
