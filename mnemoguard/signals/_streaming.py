"""One pass over a training set too large to hold twice: the engine behind the danger-zone curves.

The training set is read in blocks of ``chunk_size`` rows (a torch tensor, a numpy array or a numpy memmap:
anything with ``len`` and row indexing), cast to ``dtype`` one block at a time. Peak extra memory is about
``(M + chunk_size)·d + 3·M·chunk_size`` elements for M probe points, whatever N is. Distances use float64 by default:
at small σ the logits are ``‖y − x_i‖² / 2σ²`` and float32 rounding of ``‖y − x_i‖²`` (≈ 1e-7·‖x‖²) would break ties
between duplicated training images, the very case the curves are meant to expose.

Probes are noised points ``y_j = x_j + σ z_j`` with the same ``(x_j, z_j)`` for every σ of a grid, so one scan of the
data gives the max posterior weight (:mod:`.posterior`) and the shell indicator (:mod:`.shell_coverage`) on the
whole grid (Dodson et al. 2026; see :mod:`.danger_zone`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TrainingData", "distinct_rows", "subsample_indices"]

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


def _check_dim(block: torch.Tensor, flat: torch.Tensor) -> None:
    if block.shape[1] != flat.shape[1]:
        raise ValueError(
            f"training rows have {block.shape[1]} coordinates but the points have {flat.shape[1]}; "
            "pass latents with the same per-sample shape"
        )


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖a_m − b_i‖²`` (M, c) through one matmul, clamped at 0."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def _default_device(train: TrainingData) -> torch.device:
    return train.device if isinstance(train, torch.Tensor) else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class _Probes:
    """M noisy-probe anchors: clean points ``x_j`` (M, d), their training index (or −1) and unit-variance noise."""

    clean: torch.Tensor
    train_index: torch.Tensor
    noise: torch.Tensor


def _multiplicity(multiplicity: torch.Tensor | Sequence[int] | None, n: int) -> torch.Tensor | None:
    """Copies per training row (float64, (n,)), or None: every row once."""
    if multiplicity is None:
        return None
    m = torch.as_tensor(multiplicity, dtype=torch.float64).reshape(-1)
    if m.numel() != n or (m < 1).any() or (m != m.round()).any():
        raise ValueError(f"multiplicity must hold one integer >= 1 per training row ({n}); found {m.numel()} values "
                         f"with min {float(m.min()) if m.numel() else None}")
    return m


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact duplicates merged: ``(distinct rows, multiplicity, inverse)`` with ``x == distinct[inverse]`` and
    ``multiplicity[k]`` the number of rows equal to ``distinct[k]`` (bitwise), in order of first appearance."""
    flat = x.reshape(x.shape[0], -1)
    first: dict[bytes, int] = {}
    inverse = torch.empty(x.shape[0], dtype=torch.long)
    keep: list[int] = []
    for i, row in enumerate(flat):
        key = row.cpu().numpy().tobytes()
        if key not in first:
            first[key] = len(keep)
            keep.append(i)
        inverse[i] = first[key]
    counts = torch.bincount(inverse, minlength=len(keep))
    return x[torch.tensor(keep, dtype=torch.long, device=x.device)], counts, inverse


def _make_probes(
    train: TrainingData,
    population: torch.Tensor | None,
    num_probes: int,
    indices: torch.Tensor | None,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    multiplicity: torch.Tensor | None = None,
) -> _Probes:
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1; found {num_probes}")
    if population is None:
        n = _num_rows(train) if indices is None else indices.numel()
        if multiplicity is None:
            pick = torch.randint(n, (num_probes,), generator=generator, device=generator.device).cpu()
        else:  # the empirical law of the rows as trained: a row with k copies is drawn k times as often
            weights = multiplicity if indices is None else multiplicity[indices]
            pick = torch.multinomial(weights.to(generator.device), num_probes, replacement=True,
                                     generator=generator).cpu()
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


def _setup(train, sigmas, population, num_probes, subsample, generator, dtype, device, multiplicity=None):
    """``(σ grid, subsample indices, probes, log-multiplicity of the scanned rows or None)``."""
    sig = _sigma_vector(torch.as_tensor(sigmas), "sigmas")
    dev = torch.device(device) if device is not None else _default_device(train)
    mult = _multiplicity(multiplicity, _num_rows(train))
    indices = subsample_indices(_num_rows(train), subsample, generator)
    probes = _make_probes(train, population, num_probes, indices, generator, dtype, dev, mult)
    log_mult = None
    if mult is not None:
        log_mult = (mult if indices is None else mult[indices]).log().to(device=dev, dtype=dtype)
    return sig.to(device=dev, dtype=dtype), indices, probes, log_mult


def _scan(
    train,
    indices,
    probes: _Probes,
    sig: torch.Tensor,
    chunk_size: int,
    dtype,
    *,
    want_weights: bool,
    shell: tuple[float, float] | None,
    log_mult: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One pass over the data: per-probe max posterior weight and/or shell indicator, each (M, S) or None.

    ``shell``: the interval ``[q_lo, q_hi]`` that ``‖y_j − x_i‖² / σ²`` must fall in for ``x_i`` to cover probe j
    (:func:`~mnemoguard.signals.shell_coverage.shell_interval`), or ``None`` for no coverage. ``log_mult``: log of
    each scanned row's multiplicity (the posterior's prior is proportional to it: a row with k copies weighs k).
    """
    m, n_sig, dev = probes.clean.shape[0], sig.numel(), probes.clean.device
    run_max = torch.full((m, n_sig), -math.inf, dtype=dtype, device=dev)
    run_sum = torch.zeros_like(run_max)
    covered = torch.zeros(m, n_sig, dtype=torch.bool, device=dev)
    if shell is not None:
        q_lo, q_hi = shell
        z_sq = (probes.noise * probes.noise).sum(1, keepdim=True)
    for dist, z_term, positions in _stream_pair_terms(train, indices, probes, chunk_size, dtype):
        own = positions[None, :] == probes.train_index[:, None]  # leave-one-out: a point never covers itself
        prior = None if log_mult is None else log_mult[positions][None, :]
        for k, s in enumerate(sig):
            if want_weights:
                logits = -(dist + 2 * s * z_term) / (2 * s * s)  # the common σ²‖z‖² term cancels in the softmax
                if prior is not None:
                    logits = logits + prior
                new_max = torch.maximum(run_max[:, k], logits.max(1).values)
                scale = torch.exp(run_max[:, k] - new_max)
                run_sum[:, k] = run_sum[:, k] * scale + torch.exp(logits - new_max[:, None]).sum(1)
                run_max[:, k] = new_max
            if shell is not None:
                stat = dist / (s * s) + 2 * z_term / s + z_sq  # ‖y_j − x_i‖² / σ²
                covered[:, k] |= ((stat >= q_lo) & (stat <= q_hi) & ~own).any(1)
    # max_i w_i = exp(max logit − logsumexp) = 1 / Σ_i exp(logit_i − max logit)  (the prior is inside the logits)
    weights = 1.0 / run_sum if want_weights else None
    return weights, (covered.to(dtype) if shell is not None else None)
