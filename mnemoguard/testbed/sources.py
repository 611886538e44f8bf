"""Real image sources that install from PyPI and work offline (``pip install 'mnemoguard[data]'``).

* ``digits``: scikit-learn's 1,797 handwritten digits, 8x8, 10 classes ("a handwritten digit seven").
* ``faces``: scikit-image's ``lfw_subset``, 200 25x25 grayscale crops: 100 faces, then 100 background patches.
* ``animals``: ``animal-shape-mnist`` 0.39, 10,000 28x28 white silhouettes on black, 10 named classes, 1,000 each
  ("a silhouette of a zebra"). Its gzip pickles are read directly through an unpickler that only admits numpy's
  array reconstruction; the package's own loader is never imported (it imports tensorflow). The data holds 284
  exact-duplicate pairs; the builder de-duplicates by default.

Every source returns uint8 grayscale images at their native size; :mod:`.render` resizes them.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANIMAL_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
FACE_CLASSES = ("face", "background patch")


class SourceError(RuntimeError):
    """A source whose package is missing or whose files do not look as expected."""


@dataclass(frozen=True)
class SourceImages:
    """Native-size images of one source.

    Attributes:
        name: the source name (``digits`` | ``faces`` | ``animals``).
        images: ``[N, h, w]`` uint8 grayscale.
        labels: ``[N]`` int64 class indices.
        class_names: name of each class ("seven", "zebra").
        class_captions: the plain caption of each class ("a handwritten digit seven").
        maker: who made a sample, for specific captions ("sample 0412 by writer Q").
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    class_captions: tuple[str, ...]
    maker: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SourceError(f"this source needs {package}: pip install '{package}' (or 'mnemoguard[data]')")


def load_digits_source() -> SourceImages:
    """scikit-learn's digits, scaled from [0, 16] to uint8 exactly as ``builtin:digits`` does."""
    _require("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).round().astype(np.uint8)
    return SourceImages(
        name="digits",
        images=images,
        labels=digits.target.astype(np.int64),
        class_names=DIGIT_NAMES,
        class_captions=tuple(f"a handwritten digit {n}" for n in DIGIT_NAMES),
        maker="writer",
    )


def load_faces_source() -> SourceImages:
    """scikit-image's ``lfw_subset``: 100 faces (class 0) then 100 background patches (class 1)."""
    _require("skimage", "scikit-image")
    from skimage.data import lfw_subset

    raw = np.asarray(lfw_subset())
    if raw.shape != (200, 25, 25):
        raise SourceError(f"skimage lfw_subset: expected shape (200, 25, 25), found {raw.shape}")
    images = (raw * 255).round().astype(np.uint8) if raw.dtype.kind == "f" else raw.astype(np.uint8)
    labels = np.repeat(np.arange(2, dtype=np.int64), 100)
    return SourceImages(
        name="faces",
        images=images,
        labels=labels,
        class_names=FACE_CLASSES,
        class_captions=tuple(f"a photo of {_article(c)} {c}" for c in FACE_CLASSES),
        maker="photographer",
    )


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Admits only what a pickled numpy array needs; anything else is refused (no code runs from the file)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected here")


def _load_numpy_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        value = _NumpyArrayUnpickler(f).load()
    if not isinstance(value, np.ndarray):
        raise SourceError(f"{path}: expected a pickled numpy array, found {type(value).__name__}")
    return value


def animal_shape_mnist_dir() -> Path:
    """The data folder inside the installed ``animal-shape-mnist`` package (found without importing it)."""
    spec = importlib.util.find_spec("animal_shape_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the animals source needs animal-shape-mnist: pip install 'animal-shape-mnist>=0.39'")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal Shape"


def load_animals_source() -> SourceImages:
    """``animal-shape-mnist``: 10,000 silhouettes, classes in alphabetical order (0 bear ... 9 zebra)."""
    folder = animal_shape_mnist_dir()
    files = (folder / "animal_data_version_3.gz", folder / "animal_label_version_3.gz")
    for f in files:
        if not f.is_file():
            raise SourceError(f"animal-shape-mnist: expected the data file {f}, it does not exist")
    images, labels = (_load_numpy_pickle(f) for f in files)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise SourceError(
            f"animal-shape-mnist: expected images [N, 28, 28] and labels [N], found {images.shape} and {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= len(ANIMAL_NAMES):
        raise SourceError(f"animal-shape-mnist: expected labels 0..9, found {labels.min()}..{labels.max()}")
    return SourceImages(
        name="animals",
        images=images.astype(np.uint8),
        labels=labels.astype(np.int64),
        class_names=ANIMAL_NAMES,
        class_captions=tuple(f"a silhouette of {_article(n)} {n}" for n in ANIMAL_NAMES),
        maker="artist",
    )


_LOADERS = {"digits": load_digits_source, "faces": load_faces_source, "animals": load_animals_source}


def load_source(name: str) -> SourceImages:
    """The source called ``name`` (``digits`` | ``faces`` | ``animals``)."""
    if name not in _LOADERS:
        raise SourceError(f"unknown image source {name!r}; expected one of {tuple(_LOADERS)}")
    return _LOADERS[name]()
