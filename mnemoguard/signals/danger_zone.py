"""The memorization danger zone of the noise schedule, estimated from the training data alone.

Dodson, Gao, Wang, Wang & Wan, "Two Calm Ends and the Wild Middle: A Geometric Picture of Memorization in Diffusion
Models" (arXiv 2602.17846, 2026) split the noise levels into three regimes using two curves of the training set
``D = {x_1..x_N}``:

* **posterior concentration** — the *max posterior weight* ``W_σ``: at small σ the empirical posterior over training
  points is one-hot (the optimal denoiser snaps onto a training image), at large σ it is spread (≈ 1/N);
* **coverage by Gaussian shells** — ``C_σ``: at small σ the noisy inputs seen in training (thin shells of radius
  ``σ√d`` around each ``x_i``) cover almost none of the inputs the sampler visits; at larger σ they do.

Memorization is induced where inputs are covered (``C_σ`` high: the sampler lands where training happened) while the
posterior is still concentrated (``W_σ`` high: the target there is one training image). No public code exists for the
paper; the formulas below are our reconstruction from the empirical-optimal-denoiser algebra (research notes §4.2).

Noise convention: variance exploding, ``y = x + σ n``. A DDPM latent ``x_t = sqrt(ᾱ_t) x + sqrt(1 − ᾱ_t) n`` is
``sqrt(ᾱ_t)·(x + σ_t n)`` with ``σ_t = sqrt((1 − ᾱ_t) / ᾱ_t)``, and the empirical posterior is scale invariant, so a
DDPM timestep maps to ``σ_t`` (:func:`sigmas_from_alphas_cumprod`). Pass the latents exactly as the UNet sees them
(after the VAE scaling factor).

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
from typing import Any, NamedTuple

import torch

__all__ = [
    "DangerZone",
    "DangerZoneCurves",
    "chi_square_interval",
    "danger_zone_band",
    "danger_zone_curves",
    "empirical_optimal_denoiser",
    "max_posterior_weight_curve",
    "max_posterior_weights",
    "posterior_weights",
    "shell_coverage",
    "shell_coverage_curve",
    "sigmas_from_alphas_cumprod",
    "sigma_to_timestep",
    "subsample_indices",
]

TrainingData = torch.Tensor | Sequence[Any] | Any  # tensor, numpy array / memmap: len() + row indexing


# ---------------------------------------------------------------------------------------------- data access
def _num_rows(train: TrainingData) -> int:
    try:
        return len(train)
    except TypeError as exc:  # pragma: no cover - defensive
        raise TypeError(f"training data must support len() and row indexing; found {type(train).__name__}") from exc


def _rows(train: TrainingData, index: slice | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows of ``train`` as a (rows, d) tensor in ``dtype`` on ``device``."""
    if isinstance(index, torch.Tensor) and not isinstance(train, torch.Tensor):
        index = index.cpu().numpy()
    elif isinstance(index, torch.Tensor):
        index = index.to(train.device)
    block = torch.as_tensor(train[index])
    return block.reshape(block.shape[0], -1).to(device=device, dtype=dtype)


def _blocks(train: TrainingData, indices: torch.Tensor | None, chunk_size: int, dtype, device):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; found {chunk_size}")
    n = _num_rows(train) if indices is None else indices.numel()
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        index = slice(start, stop) if indices is None else indices[start:stop]
        yield start, _rows(train, index, dtype, device)


def subsample_indices(num_train: int, num: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """Sorted indices of a uniform subsample without replacement (``None`` = use all ``num_train`` rows)."""
    if num is None or num >= num_train:
        return None
    if num < 1:
        raise ValueError(f"subsample size must be >= 1; found {num}")
    return torch.randperm(num_train, generator=generator, device=generator.device)[:num].sort().values.cpu()


def _sigma_vector(sigma: float | torch.Tensor, name: str = "sigma") -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    if s.numel() == 0 or not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{name} must be finite and > 0; found {s.tolist()}")
    return s


# ---------------------------------------------------------------------------------------------- posterior
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


def _check_dim(block: torch.Tensor, flat: torch.Tensor) -> None:
    if block.shape[1] != flat.shape[1]:
        raise ValueError(
            f"training rows have {block.shape[1]} coordinates but the points have {flat.shape[1]}; "
            "pass latents with the same per-sample shape"
        )


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖a_m − b_i‖²`` (M, c) through one matmul, clamped at 0."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


# ---------------------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class _Probes:
    """M noisy-probe anchors: clean points ``x_j`` (M, d), their training index (or −1) and unit-variance noise."""

    clean: torch.Tensor
    train_index: torch.Tensor
    noise: torch.Tensor


def _make_probes(
    train: TrainingData,
    population: torch.Tensor | None,
    num_probes: int,
    indices: torch.Tensor | None,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> _Probes:
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1; found {num_probes}")
    if population is None:
        n = _num_rows(train) if indices is None else indices.numel()
        pick = torch.randint(n, (num_probes,), generator=generator, device=generator.device).cpu()
        # probe positions inside the (sub)sample: the training row itself is excluded where leave-one-out applies
        clean = _rows(train, pick if indices is None else indices[pick], dtype, device)
        train_index = pick
    else:
        pool = population.reshape(population.shape[0], -1)
        pick = torch.randint(pool.shape[0], (num_probes,), generator=generator, device=generator.device).cpu()
        clean = pool[pick.to(pool.device)].to(device=device, dtype=dtype)
        train_index = torch.full((num_probes,), -1, dtype=torch.long)
    noise = torch.randn(clean.shape, generator=generator, device=generator.device, dtype=torch.float64)
    return _Probes(clean, train_index.to(device), noise.to(device=device, dtype=dtype))


def _stream_pair_terms(train, indices, probes: _Probes, chunk_size: int, dtype):
    """Yield, per training block, ``D_ji = ‖x_j − x_i‖²``, ``Z_ji = z_j·(x_j − x_i)`` and the rows' positions.

    With ``y_j = x_j + σ z_j``: ``‖y_j − x_i‖² = D_ji + 2σ Z_ji + σ²‖z_j‖²``, so one pass over the data serves
    every σ of the grid (common random numbers across σ: the curves are smooth in σ).
    """
    x = probes.clean
    shift = x.mean(0, keepdim=True)  # centring lowers cancellation in the matmul form
    xc = x - shift
    zx = (probes.noise * xc).sum(1, keepdim=True)
    for start, block in _blocks(train, indices, chunk_size, dtype, x.device):
        _check_dim(block, x)
        bc = block - shift
        dist = _sq_dist(xc, bc)
        z_term = zx - probes.noise @ bc.T
        positions = torch.arange(start, start + block.shape[0], device=x.device)
        yield dist, z_term, positions


def _setup(train, sigmas, population, num_probes, subsample, generator, dtype, device):
    sig = _sigma_vector(torch.as_tensor(sigmas), "sigmas")
    dev = torch.device(device) if device is not None else _default_device(train)
    indices = subsample_indices(_num_rows(train), subsample, generator)
    probes = _make_probes(train, population, num_probes, indices, generator, dtype, dev)
    return sig.to(device=dev, dtype=dtype), indices, probes


def _scan(
    train, indices, probes: _Probes, sig: torch.Tensor, chunk_size: int, dtype, *, want_weights: bool, level
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One pass over the data: per-probe max posterior weight and/or shell indicator, each (M, S) or None."""
    m, n_sig, dev = probes.clean.shape[0], sig.numel(), probes.clean.device
    run_max = torch.full((m, n_sig), -math.inf, dtype=dtype, device=dev)
    run_sum = torch.zeros_like(run_max)
    covered = torch.zeros(m, n_sig, dtype=torch.bool, device=dev)
    if level is not None:
        q_lo, q_hi = chi_square_interval(probes.clean.shape[1], level)
        z_sq = (probes.noise * probes.noise).sum(1, keepdim=True)
    for dist, z_term, positions in _stream_pair_terms(train, indices, probes, chunk_size, dtype):
        own = positions[None, :] == probes.train_index[:, None]  # leave-one-out: a point never covers itself
        for k, s in enumerate(sig):
            if want_weights:
                logits = -(dist + 2 * s * z_term) / (2 * s * s)  # the common σ²‖z‖² term cancels in the softmax
                new_max = torch.maximum(run_max[:, k], logits.max(1).values)
                scale = torch.exp(run_max[:, k] - new_max)
                run_sum[:, k] = run_sum[:, k] * scale + torch.exp(logits - new_max[:, None]).sum(1)
                run_max[:, k] = new_max
            if level is not None:
                stat = dist / (s * s) + 2 * z_term / s + z_sq  # ‖y_j − x_i‖² / σ²
                covered[:, k] |= ((stat >= q_lo) & (stat <= q_hi) & ~own).any(1)
    # max_i w_i = exp(max logit − logsumexp) = 1 / Σ_i exp(logit_i − max logit)
    weights = 1.0 / run_sum if want_weights else None
    return weights, (covered.to(dtype) if level is not None else None)


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
) -> torch.Tensor:
    """Per-probe max posterior weight ``max_i w_i(x_j + σ z_j; σ)`` for every σ, shape (num_probes, S).

    Probes: ``j`` uniform over the (sub-sampled) training set, ``z_j ~ N(0, I)``; the same (j, z_j) for every σ.
    ``subsample`` draws that many training rows (without replacement) and uses them both as probes and as the
    posterior's support, as the paper does with a data subset. See :func:`max_posterior_weight_curve`.
    """
    sig, indices, probes = _setup(train, sigmas, None, num_probes, subsample, generator, dtype, device)
    weights, _ = _scan(train, indices, probes, sig, chunk_size, dtype, want_weights=True, level=None)
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
) -> torch.Tensor:
    """Max posterior weight curve ``W_σ(D) = E_{j, z}[max_i w_i(x_j + σ z; σ)]`` (Dodson et al., 2026), shape (S,).

    ``W_σ → 1`` as ``σ → 0`` (the posterior of a noised training point collapses onto it; exact duplicates share it,
    so a set of k-fold duplicates tends to 1/k) and ``W_σ → 1/N`` as ``σ → ∞`` (uniform posterior). A high value
    means the ideal denoiser at that σ returns one training image: the model *can* memorize there.
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
    ).mean(0)


def _default_device(train: TrainingData) -> torch.device:
    return train.device if isinstance(train, torch.Tensor) else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- coverage
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
    _, covered = _scan(train, indices, probes, sig, chunk_size, dtype, want_weights=False, level=level)
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
    (an exact duplicate of ``x_j`` still covers it — as it should). Cost as :func:`max_posterior_weight_curve`.
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
    level: float = 0.99,
    subsample: int | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> DangerZoneCurves:
    """Both curves in ONE pass over the data: :func:`max_posterior_weight_curve` and the leave-one-out
    :func:`shell_coverage_curve` share their probes (noised training points) and their distance terms, so this
    costs what either curve costs alone. Feed the result to :func:`danger_zone_band`."""
    sig, indices, probes = _setup(train, sigmas, None, num_probes, subsample, generator, dtype, device)
    weights, covered = _scan(train, indices, probes, sig, chunk_size, dtype, want_weights=True, level=level)
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
    alphas_cumprod: torch.Tensor | None = None,
) -> DangerZone:
    """The band where training inputs cover the sampler's inputs *and* the posterior is still concentrated.

    ``sigma_lo`` = where ``C_σ`` first rises to ``coverage_threshold``; ``sigma_hi`` = where ``W_σ`` last falls below
    ``weight_threshold`` (both linearly interpolated in log σ on the grid). The band is empty
    (``sigma_lo > sigma_hi``) when coverage comes only after the posterior has spread — no danger zone. The
    thresholds are our operational choice (Dodson et al. describe the regimes, not a numeric rule). With
    ``alphas_cumprod`` (``scheduler.alphas_cumprod``) the band is mapped to the DDPM timesteps whose
    ``σ_t = sqrt((1 − ᾱ_t)/ᾱ_t)`` lie inside it (``t_lo = t_hi = None`` if none do).
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
    if alphas_cumprod is not None and sigma_lo <= sigma_hi:
        table = sigmas_from_alphas_cumprod(alphas_cumprod)
        inside = torch.nonzero((table >= sigma_lo) & (table <= sigma_hi)).reshape(-1)
        if inside.numel():
            t_lo, t_hi = int(inside.min()), int(inside.max())
    return DangerZone(sigma_lo, sigma_hi, t_lo, t_hi)
