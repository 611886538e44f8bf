import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mnemoguard.config import DataConfig
from mnemoguard.data import DataError, ImageCaptionDataset, load_dataset_source, preprocess_image
from mnemoguard.trainer.loader import EpochShuffleSampler, collate


def _image_folder(root, n=4, size=20, bad_index=None, missing_caption=None):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img_{i}.png"
        if i == bad_index:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        else:
            Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / name)
        row = {"file_name": name, "text": f"caption {i}"}
        if i == missing_caption:
            row["text"] = None
        rows.append(row)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_imagefolder_with_metadata_captions(tmp_path):
    ds = ImageCaptionDataset(load_dataset_source(str(_image_folder(tmp_path / "f"))), DataConfig(resolution=16), 3)
    item = ds[1]
    assert item["pixel_values"].shape == (3, 16, 16) and item["caption"] == "caption 1"
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1


def test_save_to_disk_and_in_memory_sources(tmp_path):
    mem = datasets.Dataset.from_dict({"image": [Image.new("L", (16, 16), 255)] * 3, "caption": ["a", "b", "c"]})
    mem.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(caption_column="caption", resolution=16)
    for source in (mem, str(tmp_path / "saved")):
        ds = ImageCaptionDataset(load_dataset_source(source), cfg, 1)
        assert len(ds) == 3 and torch.allclose(ds[0]["pixel_values"], torch.ones(1, 16, 16))


def test_builtin_digits_are_captioned_by_class():
    ds = load_dataset_source("builtin:digits")
    assert len(ds) == 1797 and ds[0]["text"] == "a handwritten digit zero" and ds[0]["image"].size == (16, 16)


def test_corrupt_image_error_names_the_row_and_the_file(tmp_path):
    ds = ImageCaptionDataset(load_dataset_source(str(_image_folder(tmp_path / "f", bad_index=2))),
                             DataConfig(resolution=16), 3)
    with pytest.raises(DataError, match=r"row 2 \(.*img_2\.png\): cannot read the image"):
        ds[2]


def test_missing_caption_error_names_the_row(tmp_path):
    ds = ImageCaptionDataset(load_dataset_source(str(_image_folder(tmp_path / "f", missing_caption=1))),
                             DataConfig(resolution=16), 3)
    with pytest.raises(DataError, match=r"row 1 .*missing caption in column 'text' \(found None\)"):
        ds[1]


def test_skip_bad_samples_skips_and_counts(tmp_path):
    folder = _image_folder(tmp_path / "f", bad_index=0, missing_caption=3)
    ds = ImageCaptionDataset(load_dataset_source(str(folder)), DataConfig(resolution=16, skip_bad_samples=True), 3)
    batch = collate([ds[i] for i in range(4)])
    assert batch["num_skipped"] == 2 and batch["captions"] == ["caption 1", "caption 2"]
    with pytest.raises(DataError, match="every sample of a batch"):
        collate([None, None])


def test_empty_dataset_and_missing_columns_are_errors():
    empty = datasets.Dataset.from_dict({"image": [], "text": []})
    with pytest.raises(DataError, match="has no rows"):
        ImageCaptionDataset(empty, DataConfig(), 1)
    with pytest.raises(DataError, match=r"caption_column='text' is not a column.*\['image', 'caption'\]"):
        ImageCaptionDataset(datasets.Dataset.from_dict({"image": [None], "caption": ["x"]}), DataConfig(), 1)
    with pytest.raises(DataError, match="no such directory"):
        load_dataset_source("/definitely/not/here")


def test_preprocess_resizes_crops_and_flips():
    img = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (20, 1)))  # 40 wide, 20 high, ramp in x
    out = preprocess_image(img, 16, 1, center_crop=True)
    assert out.shape == (1, 16, 16) and out[0, 0, 0] < out[0, 0, -1]
    flips = [preprocess_image(img, 16, 1, flip=True, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(f[0, 0, 0] > f[0, 0, -1] for f in flips) and any(f[0, 0, 0] < f[0, 0, -1] for f in flips)


def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    b.set_epoch(1)
    first = list(a)
    a.set_epoch(1)
    assert list(a) == list(b) != first and sorted(first) == list(range(50))
