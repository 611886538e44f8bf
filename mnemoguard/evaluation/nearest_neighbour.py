r"""Output-space ground truth: is a generated image a copy of a training image? The nearest-neighbour ratio.

The **nearest-neighbour ratio** :math:`d_1/d_2` of Gu et al. (TMLR 2025): a generation counts as a copy when its
nearest training image is much nearer than the second nearest. The other output-space checks live beside it:

* :mod:`.bootstrap` - the memorized fraction with a bootstrap confidence interval (the percentile bootstrap of
  Bonnaire et al., 2025);
* :mod:`.template_verbatim` - the **template-verbatim** distance of Webster (2023) as used by Kim & Lee (ICML
  2026): a squared distance restricted to a template mask;
* :mod:`.overshoot` - an **overshoot-aware** direction check motivated by Kim, Kim & Lee ("How Diffusion Models
  Memorize", Cor. 3): with guidance :math:`w` a memorized prediction lands near :math:`\mu + w(x^* - \mu)`, past the
  training image, so distances grow while the direction :math:`x^* - \mu` is kept.

All distances are Euclidean in pixel space on flattened images. Images are ``[N, ...]`` tensors (any trailing
shape, e.g. ``[N, C, H, W]``); numpy arrays are accepted too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ._checks import (
    ArrayLike,
    as_tensor,
    check_finite,
    check_positive_int,
    check_probability,
    check_range,
)

__all__ = [
    "GU_RATIO_THRESHOLD",
    "NearestNeighbourRatio",
    "find_duplicates",
    "is_memorized",
    "nearest_neighbour_distances",
    "nearest_neighbour_ratio",
]

#: Gu et al. (2025): a sample is memorized when d1/d2 < 1/3.
GU_RATIO_THRESHOLD: float = 1.0 / 3.0


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _flatten_images(x: ArrayLike, name: str) -> torch.Tensor:
    t = as_tensor(x, name)
    if t.dtype == torch.bool:
        raise TypeError(f"{name} must hold pixel values, not booleans")
    if t.ndim < 2:
        raise ValueError(f"{name} must have shape [N, ...] with at least one pixel dimension; got {tuple(t.shape)}")
    check_finite(t, name)
    return t.reshape(t.shape[0], -1)


def _check_value_range(t: torch.Tensor, name: str, value_range: tuple[float, float] | None) -> None:
    if value_range is not None:
        check_range(t, name, float(value_range[0]), float(value_range[1]))


def find_duplicates(images: ArrayLike, *, chunk_size: int = 4096) -> list[list[int]]:
    """Groups of indices of bit-identical images (only groups with two or more members).

    Exact duplicates make the nearest-neighbour ratio meaningless (a copy of a duplicated image has
    :math:`d_1 = d_2`), so :func:`nearest_neighbour_ratio` requires a set of unique training images. Rows are
    hashed (BLAKE2b of their bytes) chunk by chunk, so memory stays bounded. Near-duplicates (re-encoded,
    resized) are *not* found: deduplicate those with your own tolerance.

    Args:
        images: ``[M, ...]`` tensor or array.
        chunk_size: rows moved to the CPU at a time.

    Returns:
        A list of index groups, each sorted ascending, ordered by their first index.
    """
    check_positive_int(chunk_size, "chunk_size")
    flat = _flatten_images(images, "images")
    seen: dict[bytes, list[int]] = {}
    for start in range(0, flat.shape[0], chunk_size):
        block = flat[start : start + chunk_size].cpu().contiguous().numpy()
        for offset, row in enumerate(block):
            key = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            seen.setdefault(key, []).append(start + offset)
    groups = [g for g in seen.values() if len(g) > 1]
    groups.sort(key=lambda g: g[0])
    return groups


# --------------------------------------------------------------------------------------------------------------
# nearest neighbours
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def nearest_neighbour_distances(
    queries: ArrayLike,
    references: ArrayLike,
    k: int = 2,
    *,
    query_chunk_size: int = 256,
    reference_chunk_size: int = 4096,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ``k`` nearest references of each query in pixel L2, computed in chunks.

    .. math:: d_j(x) = \lVert x - r_{(j)} \rVert_2, \qquad d_1(x) \le d_2(x) \le \dots \le d_k(x),

    over the flattened images. Candidates are found with the expansion
    :math:`\lVert x-r \rVert^2 = \lVert x\rVert^2 - 2\langle x, r\rangle + \lVert r\rVert^2` on blocks of
    ``query_chunk_size x reference_chunk_size`` (so memory is bounded by that block, not by the data set), then
    the ``k`` selected distances are recomputed directly so that they carry no cancellation error (an exact copy
    gives exactly 0).

    Gu et al. divide distances by :math:`\sqrt{CHW}`; that constant cancels in the ratio and is not applied.

    Args:
        queries: ``[N, ...]`` generated images.
        references: ``[M, ...]`` training images with the same trailing shape, ``M >= k``.
        k: number of neighbours.
        query_chunk_size: queries per block.
        reference_chunk_size: references per block (moved to the queries' device block by block).
        dtype: floating dtype of the computation (float64 by default; float32 is faster on GPUs).

    Returns:
        ``(distances, indices)``, both ``[N, k]``, ascending along the last axis; ``indices`` index ``references``.
    """
    check_positive_int(k, "k")
    check_positive_int(query_chunk_size, "query_chunk_size")
    check_positive_int(reference_chunk_size, "reference_chunk_size")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype; got {dtype}")
    q_img = as_tensor(queries, "queries")
    r_img = as_tensor(references, "references")
    q = _flatten_images(q_img, "queries")
    r = _flatten_images(r_img, "references")
    if q_img.shape[1:] != r_img.shape[1:]:
        raise ValueError(
            "queries and references must have the same image shape; got "
            f"{tuple(q_img.shape[1:])} and {tuple(r_img.shape[1:])}"
        )
    if r.shape[0] < k:
        raise ValueError(f"need at least k={k} references; got {r.shape[0]}")
    device = q.device
    n = q.shape[0]
    out_d = torch.empty(n, k, dtype=dtype, device=device)
    out_i = torch.empty(n, k, dtype=torch.long, device=device)
    for qs in range(0, n, query_chunk_size):
        qc = q[qs : qs + query_chunk_size].to(dtype)
        q_sq = (qc * qc).sum(1, keepdim=True)
        best_d = torch.full((qc.shape[0], k), float("inf"), dtype=dtype, device=device)
        best_i = torch.full((qc.shape[0], k), -1, dtype=torch.long, device=device)
        for rs in range(0, r.shape[0], reference_chunk_size):
            rc = r[rs : rs + reference_chunk_size].to(device=device, dtype=dtype)
            d2 = q_sq - 2.0 * (qc @ rc.T) + (rc * rc).sum(1)[None, :]
            idx = torch.arange(rs, rs + rc.shape[0], device=device).expand(qc.shape[0], -1)
            cand_d = torch.cat([best_d, d2], dim=1)
            cand_i = torch.cat([best_i, idx], dim=1)
            best_d, pos = torch.topk(cand_d, k, dim=1, largest=False, sorted=True)
            best_i = torch.gather(cand_i, 1, pos)
        # exact recomputation of the selected distances
        chosen = r[best_i.flatten().to(r.device)].to(device=device, dtype=dtype)
        diff = qc.repeat_interleave(k, dim=0) - chosen
        exact = diff.pow(2).sum(1).sqrt().reshape(-1, k)
        exact, order = torch.sort(exact, dim=1, stable=True)
        out_d[qs : qs + qc.shape[0]] = exact
        out_i[qs : qs + qc.shape[0]] = torch.gather(best_i, 1, order)
    return out_d, out_i


@dataclass(frozen=True)
class NearestNeighbourRatio:
    """Result of :func:`nearest_neighbour_ratio`.

    Attributes:
        ratio: ``[N]`` :math:`d_1/d_2`.
        distances: ``[N, 2]`` :math:`(d_1, d_2)`.
        indices: ``[N, 2]`` training indices of the first and second nearest neighbour.
    """

    ratio: torch.Tensor
    distances: torch.Tensor
    indices: torch.Tensor

    def memorized(self, threshold: float = GU_RATIO_THRESHOLD) -> torch.Tensor:
        """``[N]`` bool: ``ratio < threshold`` (see :func:`is_memorized`)."""
        return is_memorized(self.ratio, threshold)


def nearest_neighbour_ratio(
    generated: ArrayLike,
    training: ArrayLike,
    *,
    query_chunk_size: int = 256,
    reference_chunk_size: int = 4096,
    dtype: torch.dtype = torch.float64,
    check_unique: bool = True,
    value_range: tuple[float, float] | None = None,
) -> NearestNeighbourRatio:
    r"""Nearest-neighbour distance ratio of Gu et al. (2025).

    For a generated image :math:`x` and a set of **unique** training images, with :math:`d_1 \le d_2` the
    Euclidean distances (flattened pixels) to its nearest and second-nearest training image,

    .. math:: \rho(x) = \frac{d_1(x)}{d_2(x)} \in [0, 1],

    and :math:`x` counts as memorized when :math:`\rho(x) < 1/3` (Gu, Du, Pang, Li, Lin, Wang, "On Memorization
    in Diffusion Models", TMLR 2025, ``mem_ratio.py``; the same criterion in Yoon et al. 2023, Bonnaire et al.
    2025). The ratio is scale-free, so any pixel range works as long as both sets share it.

    Args:
        generated: ``[N, ...]`` generated images.
        training: ``[M, ...]`` training images, ``M >= 2``, no two identical.
        query_chunk_size, reference_chunk_size, dtype: see :func:`nearest_neighbour_distances`.
        check_unique: raise if ``training`` holds bit-identical images (see :func:`find_duplicates`).
        value_range: if given, ``(low, high)`` that both sets must lie in (catches e.g. ``[-1, 1]`` samples
            compared with ``[0, 255]`` training images); nothing is rescaled.

    Returns:
        :class:`NearestNeighbourRatio` with the ratios, the two distances and the two training indices.

    Raises:
        ValueError: on duplicates, on a mismatch of shapes or ranges, or when :math:`d_2 = 0`.
    """
    g = as_tensor(generated, "generated")
    tr = as_tensor(training, "training")
    if tr.ndim >= 1 and tr.shape[0] < 2:
        raise ValueError(f"the nearest-neighbour ratio needs at least 2 training images; got {tr.shape[0]}")
    _check_value_range(g, "generated", value_range)
    _check_value_range(tr, "training", value_range)
    if check_unique:
        groups = find_duplicates(tr)
        if groups:
            n_extra = sum(len(gr) - 1 for gr in groups)
            raise ValueError(
                f"training must hold unique images; found {len(groups)} group(s) of identical images "
                f"({n_extra} redundant), e.g. indices {groups[0][:5]}; a copy of a duplicated image has d1 = d2. "
                "Drop the redundant copies (find_duplicates(training) lists them) and pass the unique set."
            )
    dist, idx = nearest_neighbour_distances(
        g, tr, 2, query_chunk_size=query_chunk_size, reference_chunk_size=reference_chunk_size, dtype=dtype
    )
    d1, d2 = dist[:, 0], dist[:, 1]
    if bool((d2 == 0).any()):
        bad = int(torch.nonzero(d2 == 0)[0, 0])
        raise ValueError(
            f"d2 = 0 for generated[{bad}]: it equals two training images, so training holds duplicates "
            f"(indices {idx[bad].tolist()}); the ratio is undefined"
        )
    return NearestNeighbourRatio(ratio=d1 / d2, distances=dist, indices=idx)


def is_memorized(ratio: ArrayLike, threshold: float = GU_RATIO_THRESHOLD) -> torch.Tensor:
    r"""Gu et al.'s criterion :math:`d_1/d_2 < \tau` (strict), :math:`\tau = 1/3` by default.

    Args:
        ratio: ``[N]`` ratios in ``[0, 1]``.
        threshold: :math:`\tau \in (0, 1]`.

    Returns:
        ``[N]`` bool tensor.
    """
    check_probability(float(threshold), "threshold", open_high=False)
    r = as_tensor(ratio, "ratio")
    if r.ndim != 1:
        raise ValueError(f"ratio must be 1-D; got shape {tuple(r.shape)}")
    check_finite(r, "ratio")
    check_range(r, "ratio", 0.0, 1.0)
    return r < threshold
