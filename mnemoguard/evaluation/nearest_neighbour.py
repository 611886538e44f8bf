r"""Output-space ground truth: is a generated image a copy of a training image?

Three checks, each a pure function of pixel tensors:

* the **nearest-neighbour ratio** :math:`d_1/d_2` of Gu et al. (TMLR 2025), with a bootstrap confidence
  interval for the memorized fraction (the percentile bootstrap of Bonnaire et al., 2025);
* the **template-verbatim** distance of Webster (2023) as used by Kim & Lee (ICML 2026): a squared distance
  restricted to a template mask;
* an **overshoot-aware** direction check motivated by Kim, Kim & Lee ("How Diffusion Models Memorize",
  Cor. 3): with guidance :math:`w` a memorized prediction lands near :math:`\mu + w(x^* - \mu)`, past the
  training image, so distances grow while the direction :math:`x^* - \mu` is kept.

All distances are Euclidean in pixel space on flattened images. Images are ``[N, ...]`` tensors (any trailing
shape, e.g. ``[N, C, H, W]``); numpy arrays are accepted too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import (
    ArrayLike,
    as_numpy_1d,
    as_tensor,
    check_finite,
    check_positive_int,
    check_probability,
    check_range,
)

__all__ = [
    "GU_RATIO_THRESHOLD",
    "KIM_LEE_TV_THRESHOLD",
    "BootstrapEstimate",
    "NearestNeighbourRatio",
    "OvershootAlignment",
    "bootstrap_mean",
    "find_duplicates",
    "is_memorized",
    "masked_sq_distance",
    "memorized_fraction",
    "nearest_neighbour_distances",
    "nearest_neighbour_ratio",
    "overshoot_alignment",
    "overshoot_memorized",
    "template_verbatim",
]

#: Gu et al. (2025): a sample is memorized when d1/d2 < 1/3.
GU_RATIO_THRESHOLD: float = 1.0 / 3.0
#: Kim & Lee / Webster template-verbatim threshold on the masked distance (pixels in [0, 1], 256x256x3).
KIM_LEE_TV_THRESHOLD: float = 2.5e3


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


# --------------------------------------------------------------------------------------------------------------
# memorized fraction with a bootstrap interval
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapEstimate:
    """A mean with a percentile-bootstrap confidence interval.

    Attributes:
        estimate: the sample mean.
        low, high: the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of the bootstrap means.
        level: confidence level, e.g. 0.95.
        n: number of observations.
        n_resamples: number of bootstrap resamples.
        seed: seed of the resampling generator.
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int
    n_resamples: int
    seed: int


def bootstrap_mean(
    values: ArrayLike, *, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> BootstrapEstimate:
    r"""Sample mean with a percentile-bootstrap confidence interval.

    Draw :math:`B` = ``n_resamples`` resamples of size :math:`n` with replacement (``numpy.random.default_rng(seed)``),
    take each resample's mean :math:`\bar v^{*}_b`, and report the empirical quantiles
    :math:`q_{(1-\ell)/2}` and :math:`q_{(1+\ell)/2}` of :math:`\{\bar v^{*}_b\}` (linear interpolation), with
    :math:`\ell` = ``level``. Bonnaire et al. (2025, ``compute_fmem.py``) report the memorized fraction this way
    with :math:`B = 1000` and the 2.5 / 97.5 percentiles.

    Resamples are drawn in blocks of bounded size; the block size depends only on :math:`n`, so the result is a
    deterministic function of ``(values, n_resamples, level, seed)``.

    Raises:
        ValueError: empty or non-finite ``values``, ``level`` outside (0, 1), ``n_resamples < 1``.
    """
    v = as_numpy_1d(values, "values")
    if v.size == 0:
        raise ValueError("values is empty; a mean needs at least one observation")
    check_positive_int(n_resamples, "n_resamples")
    check_probability(float(level), "level")
    rng = np.random.default_rng(seed)
    n = v.size
    block = max(1, (1 << 22) // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        means[start : start + b] = v[idx].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return BootstrapEstimate(
        estimate=float(v.mean()),
        low=float(low),
        high=float(high),
        level=float(level),
        n=int(n),
        n_resamples=int(n_resamples),
        seed=int(seed),
    )


def memorized_fraction(
    ratio: ArrayLike | NearestNeighbourRatio,
    threshold: float = GU_RATIO_THRESHOLD,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapEstimate:
    r"""Fraction of generated images with :math:`d_1/d_2 < \tau`, with a percentile-bootstrap interval.

    .. math:: \hat f = \frac{1}{N}\sum_{i=1}^{N} \mathbb 1\left[\rho(x_i) < \tau\right]

    (Gu et al.'s "memorization ratio"; Bonnaire et al.'s :math:`f_\mathrm{mem}`), with the interval of
    :func:`bootstrap_mean` over the 0/1 indicators.

    Args:
        ratio: ``[N]`` ratios, or a :class:`NearestNeighbourRatio`.
        threshold: :math:`\tau`, 1/3 by default.
        n_resamples, level, seed: see :func:`bootstrap_mean`.
    """
    r = ratio.ratio if isinstance(ratio, NearestNeighbourRatio) else ratio
    flags = is_memorized(r, threshold)
    if flags.numel() == 0:
        raise ValueError("ratio is empty; the memorized fraction needs at least one generated image")
    return bootstrap_mean(flags.cpu().numpy().astype(np.float64), n_resamples=n_resamples, level=level, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# template verbatim (Webster 2023; Kim & Lee 2026)
# --------------------------------------------------------------------------------------------------------------


def _as_images(x: ArrayLike, name: str) -> torch.Tensor:
    t = as_tensor(x, name)
    if t.dtype == torch.bool:
        raise TypeError(f"{name} must hold pixel values, not booleans")
    if t.ndim != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W]; got {tuple(t.shape)}")
    check_finite(t, name)
    return t


@torch.no_grad()
def masked_sq_distance(
    generated: ArrayLike,
    templates: ArrayLike,
    masks: ArrayLike,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    r"""Masked squared distance of every generated image to every template (Webster 2023; Kim & Lee 2026).

    For a generated image :math:`g`, a template :math:`t` and its mask :math:`m` (1 on the template's fixed
    region, 0 on its variable region), over all :math:`D = CHW` pixel entries,

    .. math::
        D(g, t, m) = \frac{\sum_{p} \left(m_p t_p - m_p g_p\right)^2}{\tfrac{1}{D}\sum_p m_p}
                   = D \cdot \frac{\sum_p m_p^2 (t_p - g_p)^2}{\sum_p m_p},

    i.e. the squared distance restricted to the mask, scaled up to the whole image (for a binary mask it is
    :math:`D` times the mean squared error inside the mask). This is the template-verbatim test of Kim & Lee's
    ground-truth pipeline (``gather_groundtruth_labels.py``): generated images and templates resized to
    256x256, pixels in [0, 1], match when :math:`D < 2.5\cdot 10^3`.

    Computed by the same expansion as :func:`nearest_neighbour_distances` (memory :math:`O((N + M) D)`).

    Args:
        generated: ``[N, C, H, W]``.
        templates: ``[M, C, H, W]``.
        masks: ``[M, H, W]``, ``[M, 1, H, W]`` or ``[M, C, H, W]``, values in [0, 1] (bool allowed). A mask is
            broadcast over channels when it has one; the mean in the denominator is over the broadcast mask.

    Returns:
        ``[N, M]`` distances.

    Raises:
        ValueError: shape mismatches, mask values outside [0, 1], or an all-zero mask (the distance would divide
            by zero: there is no region to compare).
    """
    g = _as_images(generated, "generated")
    t = _as_images(templates, "templates")
    m = as_tensor(masks, "masks")
    if g.shape[1:] != t.shape[1:]:
        raise ValueError(
            f"generated and templates must share [C, H, W]; got {tuple(g.shape[1:])} and {tuple(t.shape[1:])}"
        )
    c, h, w = t.shape[1:]
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[0] != t.shape[0] or m.shape[2:] != (h, w) or m.shape[1] not in (1, c):
        raise ValueError(
            f"masks must have shape [M, H, W], [M, 1, H, W] or [M, C, H, W] with M={t.shape[0]}, C={c}, "
            f"H={h}, W={w}; got {tuple(as_tensor(masks, 'masks').shape)}"
        )
    m = m.to(dtype)
    check_finite(m, "masks")
    check_range(m, "masks", 0.0, 1.0)
    m = m.expand(-1, c, -1, -1).reshape(t.shape[0], -1)
    mask_mean = m.mean(1)
    if bool((mask_mean == 0).any()):
        empty = torch.nonzero(mask_mean == 0).flatten().tolist()
        raise ValueError(f"masks {empty[:10]} are all zero: the masked distance has no region to compare")
    device = g.device
    gf = g.reshape(g.shape[0], -1).to(dtype)
    tf = t.reshape(t.shape[0], -1).to(device=device, dtype=dtype)
    w2 = (m * m).to(device)
    # sum_p w_p (t_p - g_p)^2 = sum w t^2 - 2 g . (w t) + (g^2) . w
    sq = (w2 * tf * tf).sum(1)[None, :] - 2.0 * gf @ (w2 * tf).T + (gf * gf) @ w2.T
    sq = sq.clamp_min(0.0)
    return sq / mask_mean.to(device)[None, :]


def template_verbatim(
    generated: ArrayLike,
    templates: ArrayLike,
    masks: ArrayLike,
    threshold: float = KIM_LEE_TV_THRESHOLD,
) -> torch.Tensor:
    r"""Template-verbatim matches: :math:`D(g, t, m) < \tau` (Kim & Lee 2026, after Webster 2023).

    :math:`D` is :func:`masked_sq_distance`; :math:`\tau = 2.5\cdot 10^3` is calibrated for 256x256x3 images in
    [0, 1] (it equals a masked mean squared error of :math:`2500/196608 \approx 0.0127`). At another resolution
    keep the masked MSE fixed: :math:`\tau' = \tau\,C'H'W'/196608`. Pixels must lie in [0, 1]; nothing is rescaled.

    Returns:
        ``[N, M]`` bool: generated image ``i`` reproduces template ``j`` on its mask.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive; got {threshold!r}")
    g = _as_images(generated, "generated")
    t = _as_images(templates, "templates")
    check_range(g, "generated", 0.0, 1.0)
    check_range(t, "templates", 0.0, 1.0)
    return masked_sq_distance(g, t, masks) < threshold


# --------------------------------------------------------------------------------------------------------------
# overshoot-aware check (guidance pushes copies past the training image)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OvershootAlignment:
    r"""Result of :func:`overshoot_alignment`.

    Attributes:
        cosine: ``[N]`` :math:`\cos\angle(\hat x_0 - \mu,\; x^* - \mu)`.
        coefficient: ``[N]`` least-squares scale :math:`a` in :math:`\hat x_0 - \mu \approx a (x^* - \mu)`.
    """

    cosine: torch.Tensor
    coefficient: torch.Tensor


@torch.no_grad()
def overshoot_alignment(
    generated: ArrayLike, targets: ArrayLike, mean: ArrayLike, *, dtype: torch.dtype = torch.float64
) -> OvershootAlignment:
    r"""Direction and scale of each generated image relative to its paired training image, about the data mean.

    With :math:`u = \hat x_0 - \mu` and :math:`v = x^* - \mu` (flattened),

    .. math::
        \cos = \frac{\langle u, v\rangle}{\lVert u\rVert\,\lVert v\rVert}, \qquad
        a = \frac{\langle u, v\rangle}{\lVert v\rVert^2}.

    Kim, Kim & Lee ("How Diffusion Models Memorize", Cor. 3) show that for a memorized pair the guided
    prediction tends to :math:`\mu + w(x^* - \mu)` with guidance :math:`w`: the copy overshoots the training
    image by :math:`w`, so :math:`a \approx w` and :math:`\cos \approx 1` while :math:`\lVert \hat x_0 - x^*\rVert`
    (and the nearest-neighbour ratio) can be large. Clipping to the pixel range shrinks :math:`a` but keeps the
    direction roughly. Their guidance-overshoot coefficient is this :math:`a` averaged over seeds.

    Args:
        generated: ``[N, ...]`` generated images (or first-step :math:`\hat x_0` predictions).
        targets: ``[N, ...]`` the training image paired with each generation's caption.
        mean: the data mean :math:`\mu`, shape ``[...]`` (one image) or ``[N, ...]``.

    Raises:
        ValueError: shape mismatches, or a zero vector (:math:`x^* = \mu` or :math:`\hat x_0 = \mu`), for which
            the direction is undefined.
    """
    g = as_tensor(generated, "generated")
    x = as_tensor(targets, "targets")
    mu = as_tensor(mean, "mean")
    for name, tns in (("generated", g), ("targets", x), ("mean", mu)):
        if tns.dtype == torch.bool:
            raise TypeError(f"{name} must hold pixel values, not booleans")
        check_finite(tns, name)
    if g.ndim < 2 or g.shape != x.shape:
        raise ValueError(
            f"generated and targets must both be [N, ...] with the same shape; got {tuple(g.shape)} and "
            f"{tuple(x.shape)}"
        )
    if mu.shape != g.shape[1:] and mu.shape != g.shape:
        raise ValueError(
            f"mean must have shape {tuple(g.shape[1:])} (one image) or {tuple(g.shape)}; got {tuple(mu.shape)}"
        )
    device = g.device
    u = (g.to(dtype) - mu.to(device=device, dtype=dtype)).reshape(g.shape[0], -1)
    v = (x.to(device=device, dtype=dtype) - mu.to(device=device, dtype=dtype)).reshape(g.shape[0], -1)
    nu, nv = u.norm(dim=1), v.norm(dim=1)
    if bool((nv == 0).any()):
        bad = torch.nonzero(nv == 0).flatten().tolist()
        raise ValueError(f"targets {bad[:10]} equal the mean: the direction x* - mu is undefined")
    if bool((nu == 0).any()):
        bad = torch.nonzero(nu == 0).flatten().tolist()
        raise ValueError(f"generated {bad[:10]} equal the mean: the direction x0 - mu is undefined")
    dot = (u * v).sum(1)
    return OvershootAlignment(cosine=dot / (nu * nv), coefficient=dot / (nv * nv))


def overshoot_memorized(
    generated: ArrayLike,
    targets: ArrayLike,
    mean: ArrayLike,
    *,
    cosine_threshold: float = 0.9,
    min_coefficient: float | None = None,
) -> torch.Tensor:
    r"""Overshoot-aware copy check: :math:`\cos\angle(\hat x_0-\mu, x^*-\mu) \ge c` (and :math:`a \ge a_\min`).

    A complement to the nearest-neighbour ratio at guidance :math:`w > 1`, where copies overshoot the training
    image (see :func:`overshoot_alignment`). The default :math:`c = 0.9` is this project's choice, not a value
    from the literature: calibrate it against :func:`nearest_neighbour_ratio` at :math:`w = 1` on your data.
    ``min_coefficient`` (off by default) additionally requires a scale :math:`a \ge a_\min`, which rejects faint
    images that merely point the same way.

    Returns:
        ``[N]`` bool.
    """
    if not -1.0 <= cosine_threshold <= 1.0:
        raise ValueError(f"cosine_threshold must be in [-1, 1]; got {cosine_threshold!r}")
    res = overshoot_alignment(generated, targets, mean)
    flags = res.cosine >= cosine_threshold
    if min_coefficient is not None:
        flags = flags & (res.coefficient >= min_coefficient)
    return flags
