r"""Prompt fidelity: does a generated image show the class its caption asks for?

A mitigation that stops copying by making the model ignore its captions is no success. On class-captioned
test beds (e.g. digits, shapes) we check prompt adherence with a small classifier trained on *real* labelled
images and applied to generated ones:

.. math:: \mathrm{fidelity} = \frac{1}{N} \sum_{i=1}^{N} \mathbb 1\left[f(\hat x_i) = y_i\right],

where :math:`y_i` is the class named by the caption of generation :math:`i` and :math:`f` is a standardised
multinomial logistic regression on raw pixels (scikit-learn, L-BFGS; deterministic). This is the project's own
check, in the spirit of the accuracy-of-a-pretrained-classifier measures used for class-conditional generators;
it is not taken from a specific paper. Requires scikit-learn (``pip install mnemoguard[data]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._checks import ArrayLike, check_positive_int

__all__ = ["PromptFidelityClassifier"]


def _to_features(images: ArrayLike, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype == object or arr.dtype == bool:
        raise TypeError(f"{name} must hold numeric pixel values; got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"{name} must have shape [N, ...] with at least one pixel dimension; got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty; need at least one image")
    x = arr.reshape(arr.shape[0], -1).astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite; found {int(np.sum(~np.isfinite(x)))} NaN/inf value(s)")
    return x, tuple(arr.shape[1:])


def _to_labels(labels: Any, n: int, name: str) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{name} must have one label per image; got {y.shape[0]} labels for {n} images")
    return y


class PromptFidelityClassifier:
    """Pixel logistic-regression classifier for prompt fidelity; ``fit`` on real images, ``score`` generated ones.

    Args:
        C: inverse L2 regularisation strength of the logistic regression.
        max_iter: L-BFGS iteration cap.
        standardize: standardise each pixel with the training mean / std before the regression.
        range_tolerance: images passed to :meth:`predict` / :meth:`score` must lie within the training value
            range widened by this fraction of its span on each side (catches ``[-1, 1]`` samples scored against a
            ``[0, 1]``-trained classifier); ``None`` disables the check. Nothing is rescaled.

    Attributes (after :meth:`fit`):
        classes_: the class labels, sorted.
        image_shape_: the per-image shape seen in ``fit``.
        value_range_: ``(min, max)`` of the training pixels.
    """

    def __init__(
        self,
        *,
        C: float = 1.0,
        max_iter: int = 2000,
        standardize: bool = True,
        range_tolerance: float | None = 0.05,
    ) -> None:
        if not C > 0:
            raise ValueError(f"C must be positive; got {C!r}")
        check_positive_int(max_iter, "max_iter")
        if range_tolerance is not None and range_tolerance < 0:
            raise ValueError(f"range_tolerance must be >= 0 or None; got {range_tolerance!r}")
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.standardize = bool(standardize)
        self.range_tolerance = range_tolerance
        self._model: Any = None
        self.classes_: np.ndarray | None = None
        self.image_shape_: tuple[int, ...] | None = None
        self.value_range_: tuple[float, float] | None = None

    def fit(self, images: ArrayLike, labels: ArrayLike) -> PromptFidelityClassifier:
        """Train on real labelled images ``[N, ...]`` with labels ``[N]`` (ints or strings, >= 2 classes)."""
        try:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError("PromptFidelityClassifier needs scikit-learn: pip install 'mnemoguard[data]'") from err
        x, shape = _to_features(images, "images")
        y = _to_labels(labels, x.shape[0], "labels")
        classes = np.unique(y)
        if classes.size < 2:
            raise ValueError(f"fit needs at least 2 classes; got {classes.size} ({classes.tolist()})")
        steps: list[Any] = [StandardScaler()] if self.standardize else []
        steps.append(LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=0))
        self._model = make_pipeline(*steps).fit(x, y)
        self.classes_ = classes
        self.image_shape_ = shape
        self.value_range_ = (float(x.min()), float(x.max()))
        return self

    def _check_images(self, images: ArrayLike) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("PromptFidelityClassifier is not fitted; call fit(real_images, labels) first")
        x, shape = _to_features(images, "images")
        if shape != self.image_shape_:
            raise ValueError(f"images must have per-image shape {self.image_shape_} as in fit; got {shape}")
        if self.range_tolerance is not None:
            lo, hi = self.value_range_
            margin = self.range_tolerance * (hi - lo)
            found = (float(x.min()), float(x.max()))
            if found[0] < lo - margin or found[1] > hi + margin:
                raise ValueError(
                    f"images lie in [{found[0]:g}, {found[1]:g}] but the classifier was fitted on [{lo:g}, {hi:g}] "
                    f"(tolerance {self.range_tolerance:g} of the span); convert them to the training range first"
                )
        return x

    def predict(self, images: ArrayLike) -> np.ndarray:
        """Predicted class of each image, ``[N]``."""
        return self._model.predict(self._check_images(images))

    def score(self, images: ArrayLike, labels: ArrayLike) -> float:
        """Fraction of images classified as their caption's class (accuracy), a float in [0, 1].

        Raises:
            ValueError: if ``labels`` names a class never seen in :meth:`fit` (it could never be matched).
        """
        x = self._check_images(images)
        y = _to_labels(labels, x.shape[0], "labels")
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(
                f"labels contain classes not seen in fit: {unknown[:10].tolist()}; known classes: "
                f"{self.classes_[:20].tolist()}"
            )
        return float(np.mean(self._model.predict(x) == y))
