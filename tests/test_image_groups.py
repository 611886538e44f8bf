"""Duplicate image groups: exact copies under different captions and near copies are found, distinct images are
not joined, the at-risk probes come from them first."""

import datasets
import torch

from mnemoguard.callbacks.bands import resolve_bands
from mnemoguard.callbacks.monitor import choose_probes
from mnemoguard.config import DataConfig, MonitorConfig
from mnemoguard.data import ImageCaptionDataset, digits_dataset
from mnemoguard.image_groups import find_image_groups, group_images


def _digits(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 8 - 1  # [-1, 1]
    return x[:, None]


def test_exact_and_near_copies_are_grouped_and_distinct_digits_are_not():
    x = _digits(200)
    near = (x[7] + 0.02 * torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    images = [*x, x[3], x[3], x[3], near]  # rows 200-202: copies of row 3; row 203: a near copy of row 7
    groups = find_image_groups(len(images), lambda r: images[r], thumb=8, max_rows=None)
    assert groups.groups[:2] == [[3, 200, 201, 202], [7, 203]] and groups.exact[:2] == [True, False]
    # The real digits themselves (many similar 1s and 0s by different writers): almost never joined.
    joined = sum(len(g) for g in groups.groups[2:])
    assert joined <= 4, groups.groups[2:]
    exact_only = find_image_groups(len(images), lambda r: images[r], near_ratio=0.0, max_rows=None)
    assert exact_only.groups == [[3, 200, 201, 202]]


def test_group_images_checks_its_inputs_and_subsampling_keeps_frequent_copies():
    x = _digits(50)
    images = [*x, *[x[0]] * 50]
    groups = find_image_groups(len(images), lambda r: images[r], max_rows=30, seed=1)
    assert groups.rows_scanned == 30 and groups.groups and groups.groups[0][0] in (0, *range(50, 100))
    try:
        group_images([b"a"], torch.zeros(2, 4), [0])
    except ValueError as err:
        assert "one entry per row" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_an_image_copied_under_different_captions_is_the_first_probe():
    base = digits_dataset().select(range(8))
    # Row 0's image 20 times, each with its own caption (no caption repeats); row 1's caption repeated 3 times.
    rows = [0] * 20 + [1, 1, 1, 2, 3, 4, 5, 6, 7]
    captions = [f"photo {i}" for i in range(20)] + ["a one", "a one", "a one"] + [f"other {i}" for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": [base[i]["image"] for i in rows], "text": captions},
                                      features=features)
    ds = ImageCaptionDataset(data, DataConfig(resolution=16), 1)
    cfg = MonitorConfig(num_duplicate_probes=2, num_random_probes=1, num_heldout_probes=0)
    from diffusers import DDPMScheduler

    from mnemoguard.family import noise_schedule

    spec = choose_probes(ds, cfg, resolve_bands(cfg, noise_schedule(DDPMScheduler())), 1000)
    assert spec["train_rows"][:2] == [0, 20] and spec["train_kinds"] == ["image_duplicate", "image_duplicate",
                                                                         "random"]
    assert spec["image_groups"]["groups"][0] == list(range(20))
