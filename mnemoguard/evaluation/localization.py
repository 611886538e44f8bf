r"""Localisation metrics: how well a memorization map marks the memorized region of an image.

Implements the evaluation protocol of Kim & Lee, "Localizing Memorized Regions in Diffusion Models via
Coordinate-Wise Curvature Differences" (ICML 2026; code ``evaluate_metrics.py``):

1. each raw map (e.g. 64x64 latent resolution) is resized to the mask size (256x256) by **bilinear**
   interpolation;
2. :math:`\log(1 + \cdot)` is applied, then a **global** min-max normalisation over the whole evaluated set
   (one minimum and one maximum for all maps, never per map);
3. 101 thresholds :math:`\theta_k` = ``linspace(-1e-6, 1 + 1e-6, 101)``; the prediction at :math:`\theta_k` is
   :math:`\hat m = [\tilde a > \theta_k]` (strict);
4. at every threshold: per-sample IoU (1 when prediction and mask are both empty) and its mean (**mIoU**),
   **global IoU** :math:`\sum_i |\hat m_i \cap m_i| / \sum_i |\hat m_i \cup m_i|`, and pixel **accuracy**
   (mean agreement over all pixels of all samples);
5. each metric is reported at its own best threshold (an oracle threshold per metric).

Plus **pixel AUROC**: the ROC AUC of all pixels of all maps against all mask pixels, threshold-free
(a standard anomaly-localisation metric, e.g. MVTec AD, Bergmann et al. 2019; not part of Kim & Lee's tables).

Per-sample empty masks are legitimate (Kim & Lee's "ALL" set gives non-memorized prompts an all-zero mask and
MV/RV prompts an all-ones mask); pixel AUROC needs at least one positive and one negative pixel in the set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import ArrayLike, as_tensor, check_binary, check_finite, check_positive_int
from .detection import roc_auc

__all__ = [
    "KIM_LEE_THRESHOLDS",
    "LocalizationSweep",
    "upsample_maps",
    "normalize_maps_global",
    "localization_sweep",
    "pixel_auroc",
]

#: The 101 thresholds of Kim & Lee's sweep.
KIM_LEE_THRESHOLDS: torch.Tensor = torch.from_numpy(np.linspace(-1e-6, 1.0 + 1e-6, 101))


def _as_maps(maps: ArrayLike) -> torch.Tensor:
    m = as_tensor(maps, "maps")
    if m.dtype == torch.bool or not (m.is_floating_point() or m.dtype in (torch.uint8, torch.int32, torch.int64)):
        raise TypeError(f"maps must be real-valued; got dtype {m.dtype}")
    if m.ndim != 3:
        raise ValueError(f"maps must have shape [N, h, w]; got {tuple(m.shape)}")
    if m.shape[0] == 0:
        raise ValueError("maps is empty; need at least one map")
    check_finite(m, "maps")
    return m


def _as_masks(masks: ArrayLike, n: int) -> torch.Tensor:
    t = as_tensor(masks, "masks")
    if t.ndim != 3:
        raise ValueError(f"masks must have shape [N, H, W]; got {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"maps and masks must hold the same number of samples; got {n} maps and {t.shape[0]} masks")
    return check_binary(t, "masks")


def upsample_maps(maps: ArrayLike, size: tuple[int, int], *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""Bilinear resize of ``[N, h, w]`` maps to ``[N, H, W]`` (half-pixel centres, edge clamping, no antialias).

    Sample :math:`(y, x)` of the output reads the input at :math:`((y + \tfrac12) h/H - \tfrac12,\;
    (x + \tfrac12) w/W - \tfrac12)`, clamped to the border, with bilinear weights — the same as
    ``PIL.Image.resize(..., BILINEAR)`` on a mode-"F" image when enlarging, which Kim & Lee use.
    When ``size`` equals the map size the maps are returned unchanged (cast to ``dtype``).
    """
    m = _as_maps(maps).to(dtype)
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive; got {size!r}")
    if tuple(m.shape[1:]) == (h, w):
        return m
    return F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False, antialias=False)[:, 0]


def _check_nonnegative(m: torch.Tensor) -> None:
    lo = float(m.min())
    if lo < 0:
        raise ValueError(
            f"maps must be non-negative for log1p normalisation; found a minimum of {lo:g}. "
            "Kim & Lee's maps are ReLU'd curvature differences or squared score differences; clamp or shift "
            "your maps explicitly if that is what you mean."
        )


def normalize_maps_global(maps: ArrayLike) -> torch.Tensor:
    r"""Kim & Lee's normalisation: :math:`\tilde a = (\log(1+a) - \min) / (\max - \min)`, min and max over the set.

    The minimum and maximum are taken over **all** pixels of **all** maps, so maps stay comparable: a weak map
    stays dark.

    Args:
        maps: ``[N, H, W]`` non-negative maps (already at evaluation size).

    Raises:
        ValueError: negative values, or a constant set (max = min: normalisation undefined).
    """
    m = _as_maps(maps).to(torch.float64)
    _check_nonnegative(m)
    a = torch.log1p(m)
    lo, hi = a.min(), a.max()
    if not hi > lo:
        raise ValueError(f"all map values are equal ({float(lo):g} after log1p); global min-max is undefined")
    return (a - lo) / (hi - lo)


@dataclass(frozen=True)
class LocalizationSweep:
    """Result of :func:`localization_sweep`.

    Per-threshold curves are ``[T]`` float64 tensors; each ``best_*`` is the maximum of its curve and
    ``best_*_threshold`` the first threshold reaching it (thresholds ascending).
    """

    thresholds: torch.Tensor
    global_iou: torch.Tensor
    mean_iou: torch.Tensor
    accuracy: torch.Tensor
    best_global_iou: float
    best_global_iou_threshold: float
    best_mean_iou: float
    best_mean_iou_threshold: float
    best_accuracy: float
    best_accuracy_threshold: float


def _log1p_range(m: torch.Tensor, size: tuple[int, int], chunk_size: int) -> tuple[float, float]:
    lo, hi = float("inf"), float("-inf")
    for s in range(0, m.shape[0], chunk_size):
        a = torch.log1p(upsample_maps(m[s : s + chunk_size], size))
        lo = min(lo, float(a.min()))
        hi = max(hi, float(a.max()))
    return lo, hi


@torch.no_grad()
def localization_sweep(
    maps: ArrayLike,
    masks: ArrayLike,
    *,
    thresholds: ArrayLike | None = None,
    chunk_size: int = 64,
) -> LocalizationSweep:
    r"""Kim & Lee's threshold sweep: best global IoU, mIoU and pixel accuracy over 101 thresholds.

    Steps (see the module docstring): bilinear resize of each raw map to the mask size, :math:`\log(1+a)`,
    global min-max over the set, then for each threshold :math:`\theta` and sample :math:`i` with prediction
    :math:`P_i = \{p: \tilde a_{ip} > \theta\}` and mask :math:`M_i`:

    .. math::
        \mathrm{IoU}_i = \frac{|P_i \cap M_i|}{|P_i \cup M_i|}\ (=1 \text{ if } P_i \cup M_i = \emptyset),\quad
        \mathrm{mIoU} = \tfrac1N \textstyle\sum_i \mathrm{IoU}_i,\quad
        \mathrm{gIoU} = \frac{\sum_i |P_i \cap M_i|}{\sum_i |P_i \cup M_i|},\quad
        \mathrm{Acc} = \frac{\sum_i |P_i \cap M_i| + |\overline{P_i} \cap \overline{M_i}|}{N\,HW}.

    gIoU is defined as 1 when every union is empty. Each metric is maximised over thresholds independently.

    Counting uses one bucket index per pixel (``torch.bucketize``), so the cost is one pass over the pixels
    whatever the number of thresholds, and memory is bounded by ``chunk_size`` maps at mask resolution.

    Args:
        maps: ``[N, h, w]`` raw non-negative maps (any resolution; resized to the masks').
        masks: ``[N, H, W]`` binary ground-truth masks (bool or 0/1).
        thresholds: ascending thresholds in normalised units; Kim & Lee's 101 by default.
        chunk_size: maps processed at a time.
    """
    check_positive_int(chunk_size, "chunk_size")
    m = _as_maps(maps)
    gt = _as_masks(masks, m.shape[0])
    _check_nonnegative(m.to(torch.float64))
    size = (int(gt.shape[1]), int(gt.shape[2]))
    th = KIM_LEE_THRESHOLDS if thresholds is None else as_tensor(thresholds, "thresholds", dtype=torch.float64)
    if th.ndim != 1 or th.numel() == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D sequence; got shape {tuple(th.shape)}")
    if th.numel() > 1 and not bool((th[1:] > th[:-1]).all()):
        raise ValueError("thresholds must be strictly ascending")
    th = th.cpu()
    n_th = th.numel()

    lo, hi = _log1p_range(m, size, chunk_size)
    if not hi > lo:
        raise ValueError(f"all map values are equal ({lo:g} after log1p); global min-max is undefined")

    n_pix = size[0] * size[1]
    inter = torch.zeros(m.shape[0], n_th, dtype=torch.float64)
    pred = torch.zeros(m.shape[0], n_th, dtype=torch.float64)
    gt_count = gt.reshape(gt.shape[0], -1).sum(1).to(torch.float64).cpu()
    for s in range(0, m.shape[0], chunk_size):
        a = (torch.log1p(upsample_maps(m[s : s + chunk_size], size)) - lo) / (hi - lo)
        a = a.reshape(a.shape[0], -1).cpu()
        g = gt[s : s + chunk_size].reshape(a.shape[0], -1).cpu()
        # bucket b: th[b-1] < a <= th[b]; the pixel is predicted positive exactly for thresholds k < b
        b = torch.bucketize(a, th, right=False)
        hist_all = torch.zeros(a.shape[0], n_th + 1, dtype=torch.float64)
        hist_all.scatter_add_(1, b, torch.ones_like(a))
        hist_in = torch.zeros(a.shape[0], n_th + 1, dtype=torch.float64)
        hist_in.scatter_add_(1, b, g.to(torch.float64))
        # count(b > k) = sum_{j > k} hist[j]: reverse cumulative sum, shifted by one
        pred[s : s + a.shape[0]] = hist_all.flip(1).cumsum(1).flip(1)[:, 1:]
        inter[s : s + a.shape[0]] = hist_in.flip(1).cumsum(1).flip(1)[:, 1:]

    union = pred + gt_count[:, None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
    mean_iou = iou.mean(0)
    total_union = union.sum(0)
    global_iou = torch.where(total_union > 0, inter.sum(0) / total_union.clamp_min(1.0), torch.ones_like(total_union))
    correct = inter + (n_pix - union)  # true positives + true negatives
    accuracy = correct.sum(0) / (m.shape[0] * n_pix)

    def best(curve: torch.Tensor) -> tuple[float, float]:
        k = int(torch.argmax(curve))  # first maximum
        return float(curve[k]), float(th[k])

    bg, bgt = best(global_iou)
    bm, bmt = best(mean_iou)
    ba, bat = best(accuracy)
    return LocalizationSweep(
        thresholds=th.clone(),
        global_iou=global_iou,
        mean_iou=mean_iou,
        accuracy=accuracy,
        best_global_iou=bg,
        best_global_iou_threshold=bgt,
        best_mean_iou=bm,
        best_mean_iou_threshold=bmt,
        best_accuracy=ba,
        best_accuracy_threshold=bat,
    )


@torch.no_grad()
def pixel_auroc(maps: ArrayLike, masks: ArrayLike, *, chunk_size: int = 64) -> float:
    r"""ROC AUC over all pixels of the set: map values as scores, mask pixels as labels.

    .. math:: \mathrm{AUROC} = \Pr\left[a_p > a_q\right] + \tfrac12 \Pr\left[a_p = a_q\right],
              \quad p \in \bigcup_i M_i,\ q \notin \bigcup_i M_i,

    pooled over every pixel of every sample after the same bilinear resize to the mask size as
    :func:`localization_sweep`. :math:`\log(1+\cdot)` and the global min-max are strictly increasing, so they do
    not change it and are skipped. Needs all resized maps in memory (``N x H x W`` float64).

    Raises:
        ValueError: if the masks hold no positive pixel (all empty) or no negative pixel (all full).
    """
    check_positive_int(chunk_size, "chunk_size")
    m = _as_maps(maps)
    gt = _as_masks(masks, m.shape[0])
    size = (int(gt.shape[1]), int(gt.shape[2]))
    n_pos = int(gt.sum())
    n_all = gt.numel()
    if n_pos == 0 or n_pos == n_all:
        kind = "empty" if n_pos == 0 else "full (all ones)"
        raise ValueError(
            f"pixel AUROC needs positive and negative pixels; every mask is {kind} ({n_pos} of {n_all} pixels set)"
        )
    parts = [upsample_maps(m[s : s + chunk_size], size).reshape(-1).cpu() for s in range(0, m.shape[0], chunk_size)]
    scores = torch.cat(parts).numpy()
    labels = gt.reshape(-1).cpu().numpy()
    return roc_auc(scores, labels.astype(np.int8))
