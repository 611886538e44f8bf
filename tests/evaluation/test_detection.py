"""ROC curve, AUC and TPR at a fixed FPR, including ties and both literature conventions."""

import numpy as np
import pytest
import torch

from mnemoguard.evaluation import detection_summary, max_balanced_accuracy, roc_auc, roc_curve, tpr_at_fpr

sk_metrics = pytest.importorskip("sklearn.metrics")


def test_auc_hand_computed_without_ties():
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 1 + 1 + 0 + 1 = 3 of 4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auc_counts_ties_as_one_half():
    assert roc_auc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)
    # positives {0.5, 0.9}, negatives {0.5, 0.1}: 0.5 + 1 + 1 + 1 = 3.5 of 4
    assert roc_auc([0.5, 0.5, 0.9, 0.1], [1, 0, 1, 0]) == pytest.approx(0.875)


def test_auc_is_one_for_perfect_and_zero_for_reversed_separation():
    assert roc_auc([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.0, 1.0, 2.0, 3.0], [1, 1, 0, 0]) == 0.0


def test_tied_scores_form_a_single_roc_point():
    curve = roc_curve([0.9, 0.5, 0.5, 0.5, 0.1], [1, 1, 0, 0, 0])
    np.testing.assert_allclose(curve.fpr, [0, 0, 2 / 3, 1])
    np.testing.assert_allclose(curve.tpr, [0, 0.5, 1, 1])
    assert curve.thresholds[0] == np.inf
    np.testing.assert_allclose(curve.thresholds[1:], [0.9, 0.5, 0.1])


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_curve_agree_with_sklearn_on_tied_random_scores(seed):
    rng = np.random.default_rng(seed)
    n = 60
    scores = rng.integers(0, 8, n).astype(float)  # many ties
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    assert roc_auc(scores, labels) == pytest.approx(sk_metrics.roc_auc_score(labels, scores), abs=1e-12)
    for drop in (False, True):
        fpr, tpr, thr = sk_metrics.roc_curve(labels, scores, drop_intermediate=drop)
        ours = roc_curve(scores, labels, drop_intermediate=drop)
        np.testing.assert_allclose(ours.fpr, fpr)
        np.testing.assert_allclose(ours.tpr, tpr)
        np.testing.assert_array_equal(ours.thresholds[1:], thr[1:])


@pytest.mark.parametrize("seed", range(6))
def test_tpr_conventions_reproduce_reference_formulas(seed):
    rng = np.random.default_rng(100 + seed)
    scores = np.round(rng.normal(size=300) + np.r_[np.zeros(200), np.full(100, 1.5)], 1)
    labels = np.r_[np.zeros(200, int), np.ones(100, int)]
    fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)  # default drop_intermediate=True, as both papers
    for x in (0.01, 0.03, 0.1):
        # Asthana & Belagiannis: tpr[argmin |fpr - x|]
        assert tpr_at_fpr(scores, labels, x, convention="closest") == tpr[np.argmin(np.abs(fpr - x))]
        # Wen et al.: tpr[np.where(fpr < x)[0][-1]]
        assert tpr_at_fpr(scores, labels, x, convention="last_strictly_below") == tpr[np.where(fpr < x)[0][-1]]
        assert tpr_at_fpr(scores, labels, x, convention="last_below") == tpr[np.where(fpr <= x)[0][-1]]


def _hundred_negatives_four_positives():
    # negatives 0..99 give FPR steps of exactly 0.01; positives interleave at the top
    scores = np.r_[np.arange(100.0), [99.5, 98.5, 97.5, 50.0]]
    labels = np.r_[np.zeros(100, int), np.ones(4, int)]
    return scores, labels


def test_conventions_differ_as_worked_out_by_hand():
    # ROC: (0,0) (0,.25) (.01,.25) (.01,.5) (.02,.5) (.02,.75) (.03,.75) ...
    s, y = _hundred_negatives_four_positives()
    assert tpr_at_fpr(s, y, 0.01, convention="closest") == 0.25  # first point at FPR 0.01
    assert tpr_at_fpr(s, y, 0.01, convention="last_below") == 0.5  # top of the vertical step at FPR 0.01
    assert tpr_at_fpr(s, y, 0.01, convention="last_strictly_below") == 0.25  # FPR 0 only
    assert tpr_at_fpr(s, y, 0.02, convention="closest") == 0.5
    assert tpr_at_fpr(s, y, 0.02, convention="last_below") == 0.75
    assert tpr_at_fpr(s, y, 0.02, convention="last_strictly_below") == 0.5


def test_drop_intermediate_changes_the_closest_point_like_sklearn():
    # every score tied between one positive and one negative: the ROC is the diagonal (0,0) (1/3,1/3) (2/3,2/3) (1,1)
    scores = [3.0, 3.0, 2.0, 2.0, 1.0, 1.0]
    labels = [1, 0, 1, 0, 1, 0]
    assert tpr_at_fpr(scores, labels, 0.6, drop_intermediate=False) == pytest.approx(2 / 3)
    # scikit-learn's default drops (2/3, 2/3), which sits between two equal steps ((0, 0) is added afterwards)
    assert tpr_at_fpr(scores, labels, 0.6, drop_intermediate=True) == pytest.approx(1 / 3)
    fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)
    assert tpr[np.argmin(np.abs(fpr - 0.6))] == pytest.approx(1 / 3)


def test_balanced_accuracy_and_summary():
    s, y = _hundred_negatives_four_positives()
    summary = detection_summary(s, y)
    assert set(summary) == {"auc", "balanced_accuracy", "tpr@1%fpr", "tpr@3%fpr"}
    assert summary["tpr@1%fpr"] == 0.25
    # (0.03, 0.75) lies inside the horizontal run after (0.02, 0.75), so the default point dropping removes it and
    # the first closest remaining point is (0.02, 0.5); on the full curve it is (0.03, 0.75)
    assert summary["tpr@3%fpr"] == 0.5
    assert detection_summary(s, y, drop_intermediate=False)["tpr@3%fpr"] == 0.75
    fpr, tpr, _ = sk_metrics.roc_curve(y, s)
    assert tpr[np.argmin(np.abs(fpr - 0.03))] == 0.5
    assert summary["auc"] == pytest.approx(roc_auc(s, y))
    assert max_balanced_accuracy([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1]) == 1.0
    assert detection_summary(s, y, convention="last_below")["tpr@1%fpr"] == 0.5


def test_accepts_tensors_and_bool_labels():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([False, False, True, True])
    assert roc_auc(scores, labels) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2, 0.3], [1, 1, 1], "both classes; found 3 positive"),
        ([0.1, 0.2], [0, 0], "found 0 positive"),
        ([0.1, 0.2], [0, 2], "0/1"),
        ([0.1, 0.2, 0.3], [0, 1], "same length"),
        ([0.1, float("nan")], [0, 1], "finite"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
    ],
)
def test_bad_inputs_raise(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        roc_auc(scores, labels)


def test_bad_convention_and_target_raise():
    with pytest.raises(ValueError, match="convention must be one of"):
        tpr_at_fpr([0.0, 1.0], [0, 1], 0.01, convention="nearest")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="target_fpr"):
            tpr_at_fpr([0.0, 1.0], [0, 1], bad)
