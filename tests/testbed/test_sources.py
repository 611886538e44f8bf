"""Real offline image sources; animal-shape-mnist is read through a numpy-only unpickler."""

import gzip
import pickle
import sys

import numpy as np
import pytest

from mnemoguard.testbed import load_source
from mnemoguard.testbed.sources import SourceError, _load_numpy_pickle


def test_digits_and_faces():
    digits = load_source("digits")
    assert digits.images.shape == (1797, 8, 8) and digits.images.dtype == np.uint8
    assert digits.class_captions[7] == "a handwritten digit seven"
    faces = load_source("faces")
    assert faces.images.shape == (200, 25, 25) and np.bincount(faces.labels).tolist() == [100, 100]
    assert faces.class_captions == ("a photo of a face", "a photo of a background patch")


def test_animals_read_directly_without_importing_the_package_loader():
    animals = load_source("animals")
    assert animals.images.shape == (10000, 28, 28) and animals.images.dtype == np.uint8
    assert np.bincount(animals.labels).tolist() == [1000] * 10
    assert animals.class_captions[5] == "a silhouette of an elephant"
    assert not any(name.startswith("animal_shape_mnist") for name in sys.modules)  # its loader imports tensorflow
    flat = animals.images.reshape(len(animals.images), -1)
    assert len(np.unique(flat, axis=0)) == 9716  # 284 natural exact-duplicate pairs (env notes 11.5)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_numpy_only_unpickler_refuses_other_globals(tmp_path):
    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        _load_numpy_pickle(path)
    ok = tmp_path / "ok.gz"
    with gzip.open(ok, "wb") as f:
        pickle.dump(np.arange(4, dtype=np.uint8), f)
    assert _load_numpy_pickle(ok).tolist() == [0, 1, 2, 3]


def test_unknown_source():
    with pytest.raises(SourceError, match="unknown image source 'mnist'; expected one of"):
        load_source("mnist")
