"""Posterior concentration of the training set: the empirical posterior over training points, its max weight W_σ.

Dodson, Gao, Wang, Wang & Wan, "Two Calm Ends and the Wild Middle: A Geometric Picture of Memorization in Diffusion
Models" (arXiv 2602.17846, 2026): at small σ the empirical posterior over training points is one-hot (the optimal
denoiser snaps onto a training image), at large σ it is spread (≈ 1/N). The curve ``W_σ`` measures where the model
*can* memorize; :mod:`.danger_zone` pairs it with the shell coverage ``C_σ`` (:mod:`.shell_coverage`).

Noise convention (variance exploding, ``y = x + σ n``), data access in blocks and memory: see :mod:`.danger_zone` and
:mod:`._streaming`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._streaming import TrainingData, _blocks, _check_dim, _num_rows, _scan, _setup, _sigma_vector, _sq_dist

__all__ = [
    "empirical_optimal_denoiser",
    "max_posterior_weight_curve",
    "max_posterior_weights",
    "posterior_weights",
]


def posterior_weights(
    y: torch.Tensor,
    train: TrainingData,
    sigma: float | torch.Tensor,
    *,
    chunk_size: int = 4096,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Empirical posterior over training points, ``w_i(y; σ) = softmax_i(−‖y − x_i‖² / 2σ²)``.

    This is the posterior ``Pr(X = x_i | X + σ n = y)`` when X is uniform on the training set (Dodson et al. §4.2 of
    the research notes); the optimal denoiser is ``Σ_i w_i x_i``.

    Args:
        y: noisy points, shape (B, ...) with the same per-sample shape as the training rows.
        train: training points (N, ...): a tensor, numpy array or memmap, read ``chunk_size`` rows at a time.
        sigma: VE noise level, a scalar or one per point (B,).
    Returns:
        (B, N) weights in ``dtype`` (rows sum to 1). The output itself is B·N; use :func:`max_posterior_weights`
        or :func:`empirical_optimal_denoiser` for streaming reductions that never hold it.
    """
    flat = y.reshape(y.shape[0], -1).to(dtype)
    sig = _sigma_vector(sigma).to(device=flat.device, dtype=dtype)
    if sig.numel() not in (1, flat.shape[0]):
        raise ValueError(f"sigma must be a scalar or have one value per point ({flat.shape[0]}); found {sig.numel()}")
    n = _num_rows(train)
    logits = torch.empty(flat.shape[0], n, dtype=dtype, device=flat.device)
    shift = flat.mean(0, keepdim=True)
    yc = flat - shift
    for start, block in _blocks(train, None, chunk_size, dtype, flat.device):
        _check_dim(block, flat)
        logits[:, start : start + block.shape[0]] = -_sq_dist(yc, block - shift) / (2 * sig[:, None] ** 2)
    return torch.softmax(logits, dim=1)


def empirical_optimal_denoiser(
    y: torch.Tensor,
    train: TrainingData,
    sigma: float | torch.Tensor,
    *,
    chunk_size: int = 4096,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``D*(y; σ) = Σ_i w_i(y; σ) x_i``, streamed over training chunks (running log-sum-exp); same shape as ``y``."""
    flat = y.reshape(y.shape[0], -1).to(dtype)
    sig = _sigma_vector(sigma).to(device=flat.device, dtype=dtype)
    shift = flat.mean(0, keepdim=True)
    yc = flat - shift
    run_max = torch.full((flat.shape[0], 1), -math.inf, dtype=dtype, device=flat.device)
    run_sum = torch.zeros_like(run_max)
    acc = torch.zeros_like(flat)
    for _, block in _blocks(train, None, chunk_size, dtype, flat.device):
        _check_dim(block, flat)
        logits = -_sq_dist(yc, block - shift) / (2 * sig[:, None] ** 2)
        new_max = torch.maximum(run_max, logits.max(1, keepdim=True).values)
        scale = torch.exp(run_max - new_max)
        e = torch.exp(logits - new_max)
        run_sum = run_sum * scale + e.sum(1, keepdim=True)
        acc = acc * scale + e @ block
        run_max = new_max
    return (acc / run_sum).reshape(y.shape).to(y.dtype)


def max_posterior_weights(
    train: TrainingData,
    sigmas: torch.Tensor | Sequence[float],
    *,
    num_probes: int = 256,
    generator: torch.Generator,
    subsample: int | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    multiplicity: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-probe max posterior weight ``max_i w_i(x_j + σ z_j; σ)`` for every σ, shape (num_probes, S).

    Probes: ``j`` uniform over the (sub-sampled) training set, ``z_j ~ N(0, I)``; the same (j, z_j) for every σ.
    ``subsample`` draws that many training rows (without replacement) and uses them both as probes and as the
    posterior's support, as the paper does with a data subset. ``multiplicity``: when ``train`` holds *distinct*
    images and image ``i`` was trained ``m_i`` times (:func:`~mnemoguard.signals.distinct_rows`), probes are drawn
    ∝ ``m_i`` and the posterior is over distinct images with prior ∝ ``m_i`` (``w_i ∝ m_i exp(−‖y − x_i‖²/2σ²)``):
    the weights of identical copies summed. Dodson et al.'s D is a set of distinct images; fed the copies as
    separate rows, k identical copies split the posterior and cap ``max_i w_i`` at 1/k at every σ. See
    :func:`max_posterior_weight_curve`.
    """
    sig, indices, probes, log_mult = _setup(train, sigmas, None, num_probes, subsample, generator, dtype, device,
                                            multiplicity)
    weights, _ = _scan(train, indices, probes, sig, chunk_size, dtype, want_weights=True, shell=None,
                       log_mult=log_mult)
    return weights


def max_posterior_weight_curve(
    train: TrainingData,
    sigmas: torch.Tensor | Sequence[float],
    *,
    num_probes: int = 256,
    generator: torch.Generator,
    subsample: int | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    multiplicity: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Max posterior weight curve ``W_σ(D) = E_{j, z}[max_i w_i(x_j + σ z; σ)]`` (Dodson et al., 2026), shape (S,).

    ``W_σ → 1`` as ``σ → 0`` (the posterior of a noised training point collapses onto it; exact duplicates passed
    as separate rows share it, so a set of k-fold duplicates tends to 1/k: pass distinct rows and ``multiplicity``)
    and ``W_σ → 1/N`` as ``σ → ∞`` (uniform posterior). A high value means the ideal denoiser at that σ returns one
    training image: the model *can* memorize there.
    Monte Carlo with ``num_probes`` probes; cost O(num_probes · N · d) for the whole σ grid.
    """
    return max_posterior_weights(
        train,
        sigmas,
        num_probes=num_probes,
        generator=generator,
        subsample=subsample,
        chunk_size=chunk_size,
        dtype=dtype,
        device=device,
        multiplicity=multiplicity,
    ).mean(0)
