r"""Detection metrics for memorization detectors: ROC curve, ROC AUC, TPR at a fixed FPR.

Convention throughout: a **higher score means "memorized"** (label 1). A sample is flagged at threshold
:math:`\theta` when :math:`s \ge \theta`. Negate scores where lower means memorized.

Reference protocols (see ``docs/evaluation.md``):

* Asthana & Belagiannis (ICLR 2026, ``detect_eval.py``): AUC with ``sklearn.metrics.roc_auc_score``;
  TPR@1 % / 3 % FPR as ``tpr[argmin |fpr - x|]`` on ``sklearn.metrics.roc_curve`` — the **"closest"**
  convention here (SAIL and Ren et al. use it too, per the project's survey).
* Wen et al. (ICLR 2024, ``examples/det_mem_viz.ipynb``): TPR@1 % FPR as ``tpr[last index with fpr < 0.01]``
  — the **"last_strictly_below"** convention here. **"last_below"** is its inclusive variant (FPR <= x), the
  best TPR a single threshold reaches without exceeding the FPR budget.

Both reference implementations ran ``roc_curve`` with scikit-learn's default ``drop_intermediate=True``, which
removes some ROC points and can change which point is "closest" or "last below"; ``drop_intermediate`` below
reproduces that rule so published numbers can be matched.

Inputs are 1-D tensors / arrays / sequences; outputs are floats or numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ._checks import ArrayLike, as_numpy_1d, check_probability

__all__ = [
    "TprConvention",
    "RocCurve",
    "roc_curve",
    "roc_auc",
    "tpr_at_fpr",
    "max_balanced_accuracy",
    "detection_summary",
]

TprConvention = Literal["closest", "last_below", "last_strictly_below"]
_CONVENTIONS = ("closest", "last_below", "last_strictly_below")


@dataclass(frozen=True)
class RocCurve:
    """ROC points in order of decreasing threshold.

    Attributes:
        fpr: false-positive rates, starting at 0 and ending at 1.
        tpr: true-positive rates, starting at 0 and ending at 1.
        thresholds: ``thresholds[i]`` gives ``(fpr[i], tpr[i])`` when flagging ``score >= thresholds[i]``;
            ``thresholds[0] = +inf`` (nothing flagged).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def _validate(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = as_numpy_1d(scores, "scores")
    y_raw = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if y_raw.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {tuple(y_raw.shape)}")
    if y_raw.shape[0] != s.shape[0]:
        raise ValueError(f"scores and labels must have the same length; got {s.shape[0]} and {y_raw.shape[0]}")
    if y_raw.dtype == bool:
        y = y_raw
    else:
        try:
            yf = y_raw.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"labels must be bool or 0/1 numbers; got dtype {y_raw.dtype}") from err
        ok = (yf == 0) | (yf == 1)
        if not ok.all():
            bad = np.unique(y_raw[~ok])[:5]
            raise ValueError(f"labels must be bool or 0/1 (1 = memorized); found other values {bad.tolist()}")
        y = yf == 1
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"ROC metrics need both classes; found {n_pos} positive(s) and {n_neg} negative(s) among {y.size} labels"
        )
    return s, y


def _roc_counts(s: np.ndarray, y: np.ndarray, drop_intermediate: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives, threshold) at each distinct score, from high to low."""
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    # last position of each run of equal scores: tied samples enter the ROC together (a diagonal segment)
    ends = np.flatnonzero(np.diff(s_sorted) != 0)
    ends = np.append(ends, s_sorted.size - 1)
    tp = np.cumsum(y_sorted, dtype=np.int64)[ends]
    fp = (ends + 1) - tp
    thr = s_sorted[ends]
    if drop_intermediate and tp.size > 2:
        # scikit-learn's rule: drop a point when both count sequences have a zero second difference there,
        # i.e. it sits between two equal steps on a straight segment.
        interior = (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0)
        keep = np.concatenate([[True], interior, [True]])
        fp, tp, thr = fp[keep], tp[keep], thr[keep]
    fp = np.concatenate([[0], fp])
    tp = np.concatenate([[0], tp])
    thr = np.concatenate([[np.inf], thr])
    return fp, tp, thr


def roc_curve(scores: ArrayLike, labels: ArrayLike, *, drop_intermediate: bool = False) -> RocCurve:
    r"""ROC curve with ties grouped: one point per distinct score.

    For each distinct threshold :math:`\theta` (descending), :math:`\mathrm{TPR}(\theta) = |\{i: y_i=1,
    s_i \ge \theta\}| / n_1` and :math:`\mathrm{FPR}(\theta) = |\{i: y_i=0, s_i \ge \theta\}| / n_0`, preceded by
    the point (0, 0) at :math:`\theta = +\infty`. Tied scores are never split: a tie between positives and
    negatives is one diagonal step.

    Args:
        scores: ``[n]`` detector scores (higher = memorized).
        labels: ``[n]`` bool or 0/1, 1 = memorized.
        drop_intermediate: drop points that lie between two equal steps (scikit-learn's default rule), as the
            reference implementations did. Off by default: every threshold is kept.

    Raises:
        ValueError: mismatched lengths, non-finite scores, labels not 0/1, or only one class present.
    """
    s, y = _validate(scores, labels)
    fp, tp, thr = _roc_counts(s, y, drop_intermediate)
    return RocCurve(fpr=fp / fp[-1], tpr=tp / tp[-1], thresholds=thr)


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    r"""Area under the ROC curve, ties counted as one half.

    .. math::
        \mathrm{AUC} = \frac{1}{n_1 n_0} \sum_{i: y_i = 1} \sum_{j: y_j = 0}
            \left(\mathbb 1[s_i > s_j] + \tfrac12 \mathbb 1[s_i = s_j]\right),

    the probability that a random memorized sample outscores a random non-memorized one (Mann–Whitney U / n1 n0),
    computed as the trapezoidal area under :func:`roc_curve` (tied groups are straight diagonal segments, which
    gives exactly the one-half credit). Matches ``sklearn.metrics.roc_auc_score`` (used by Asthana &
    Belagiannis) and ``sklearn.metrics.auc`` on ``roc_curve`` (Wen et al.).
    """
    s, y = _validate(scores, labels)
    fp, tp, _ = _roc_counts(s, y, drop_intermediate=False)
    fpr = fp / fp[-1]
    tpr = tp / tp[-1]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _pick_tpr(curve: RocCurve, target_fpr: float, convention: str) -> float:
    fpr, tpr = curve.fpr, curve.tpr
    if convention == "closest":
        # first index of the minimum, as numpy.argmin: among equally close points the earliest (lowest FPR/TPR)
        return float(tpr[int(np.argmin(np.abs(fpr - target_fpr)))])
    if convention == "last_below":
        idx = np.flatnonzero(fpr <= target_fpr)
    else:
        idx = np.flatnonzero(fpr < target_fpr)
    # (0, 0) always satisfies fpr <= target; fpr < target holds there because target > 0
    return float(tpr[idx[-1]])


def tpr_at_fpr(
    scores: ArrayLike,
    labels: ArrayLike,
    target_fpr: float = 0.01,
    *,
    convention: TprConvention = "closest",
    drop_intermediate: bool = True,
) -> float:
    r"""True-positive rate at a target false-positive rate :math:`x`, read off the ROC curve.

    Conventions (``convention``):

    * ``"closest"``: :math:`\mathrm{TPR}_k` with :math:`k = \arg\min_k |\mathrm{FPR}_k - x|`, the first such
      point on ties (numpy ``argmin``). Asthana & Belagiannis (2026) ``detect_eval.py``, for x in {1 %, 3 %};
      also SAIL (Jeon et al. 2025) and Ren et al. (2024) per the survey. The chosen point may have FPR above x.
    * ``"last_below"``: the last point with :math:`\mathrm{FPR}_k \le x`, i.e. the largest TPR any threshold
      reaches within the FPR budget.
    * ``"last_strictly_below"``: the last point with :math:`\mathrm{FPR}_k < x`, exactly Wen et al. (2024)'s
      ``tpr[np.where(fpr < .01)[0][-1]]``. It differs from ``"last_below"`` when some threshold gives FPR
      exactly x (e.g. 5 of 500 negatives at 1 %).

    Args:
        scores: ``[n]`` detector scores (higher = memorized).
        labels: ``[n]`` bool or 0/1.
        target_fpr: :math:`x \in (0, 1)`.
        convention: see above.
        drop_intermediate: read the curve after scikit-learn's default point dropping (on by default, as both
            reference implementations did); ``False`` uses every threshold.
    """
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}; got {convention!r}")
    check_probability(float(target_fpr), "target_fpr")
    return _pick_tpr(roc_curve(scores, labels, drop_intermediate=drop_intermediate), float(target_fpr), convention)


def max_balanced_accuracy(scores: ArrayLike, labels: ArrayLike) -> float:
    r"""Best balanced accuracy over thresholds, :math:`\max_k 1 - (\mathrm{FPR}_k + 1 - \mathrm{TPR}_k)/2`.

    Wen et al. (2024) report it as "ACC". It is unaffected by point dropping (it is linear along each segment).
    """
    curve = roc_curve(scores, labels)
    return float(np.max(1.0 - (curve.fpr + 1.0 - curve.tpr) / 2.0))


def detection_summary(
    scores: ArrayLike,
    labels: ArrayLike,
    target_fprs: tuple[float, ...] = (0.01, 0.03),
    *,
    convention: TprConvention = "closest",
    drop_intermediate: bool = True,
) -> dict[str, float]:
    """AUC, best balanced accuracy and TPR at each target FPR, as plain floats.

    Keys: ``"auc"``, ``"balanced_accuracy"``, and ``"tpr@{100x:g}%fpr"`` per target (e.g. ``"tpr@1%fpr"``).
    """
    for x in target_fprs:
        check_probability(float(x), "target_fprs entry")
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}; got {convention!r}")
    out = {"auc": roc_auc(scores, labels), "balanced_accuracy": max_balanced_accuracy(scores, labels)}
    curve = roc_curve(scores, labels, drop_intermediate=drop_intermediate)
    for x in target_fprs:
        out[f"tpr@{100 * x:g}%fpr"] = _pick_tpr(curve, float(x), convention)
    return out
