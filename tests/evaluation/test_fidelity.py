"""Prompt fidelity classifier: accuracy of generated images against their caption's class."""

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402

from mnemoguard.evaluation import PromptFidelityClassifier  # noqa: E402


def _two_constant_classes(n=20, seed=0):
    rng = np.random.default_rng(seed)
    dark = rng.uniform(0.0, 0.2, size=(n, 1, 4, 4))
    light = rng.uniform(0.8, 1.0, size=(n, 1, 4, 4))
    return np.concatenate([dark, light]), np.r_[np.zeros(n, int), np.ones(n, int)]


def test_separable_classes_score_one_and_swapped_labels_score_zero():
    x, y = _two_constant_classes()
    clf = PromptFidelityClassifier().fit(x, y)
    assert clf.score(x, y) == 1.0
    assert clf.score(x, 1 - y) == 0.0
    assert clf.classes_.tolist() == [0, 1]
    assert clf.image_shape_ == (1, 4, 4)


def test_real_digits_are_classified_well_held_out():
    digits = load_digits()
    x = digits.images / 16.0
    y = digits.target
    clf = PromptFidelityClassifier().fit(x[:1000], y[:1000])
    assert clf.score(x[1000:], y[1000:]) > 0.9


def test_fit_is_deterministic():
    digits = load_digits()
    x, y = digits.images[:600] / 16.0, digits.target[:600]
    a = PromptFidelityClassifier().fit(x[:400], y[:400]).predict(x[400:])
    b = PromptFidelityClassifier().fit(x[:400], y[:400]).predict(x[400:])
    np.testing.assert_array_equal(a, b)


def test_accepts_tensors_and_string_labels():
    x, y = _two_constant_classes()
    names = np.where(y == 1, "light", "dark")
    clf = PromptFidelityClassifier().fit(torch.from_numpy(x).float(), list(names))
    assert clf.score(torch.from_numpy(x).float(), list(names)) == 1.0


def test_score_before_fit_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        PromptFidelityClassifier().score(np.zeros((2, 4)), [0, 1])


def test_images_in_another_range_are_rejected():
    x, y = _two_constant_classes()
    clf = PromptFidelityClassifier().fit(x, y)
    with pytest.raises(ValueError, match="fitted on"):
        clf.score(x * 2 - 1, y)  # [-1, 1] images against a [0, 1] classifier
    assert PromptFidelityClassifier(range_tolerance=None).fit(x, y).score(x * 2 - 1, y) >= 0.0


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((3, 1, 2, 2)), [0, 1, 0], r"per-image shape \(1, 4, 4\)"),
        (np.full((2, 1, 4, 4), 0.5), [0, 7], r"not seen in fit: \[7\]"),
        (np.full((2, 1, 4, 4), 0.5), [0, 1, 0], "one label per image"),
    ],
)
def test_score_rejects_mismatched_input(images, labels, match):
    x, y = _two_constant_classes()
    clf = PromptFidelityClassifier().fit(x, y)
    with pytest.raises(ValueError, match=match):
        clf.score(images, labels)


def test_fit_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        PromptFidelityClassifier().fit(np.zeros((4, 2)), [3, 3, 3, 3])
