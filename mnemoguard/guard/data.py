"""The training data as the guard reads it (probe images and captions, caption columns): whatever the loop has,
turned into an :class:`~mnemoguard.data.ImageCaptionDataset` whose rows are the loop's dataset rows."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger("mnemoguard")

__all__ = ["as_training_dataset"]


def as_training_dataset(train_dataset: Any, image_column: str, caption_column: str, resolution: int,
                        channels: int) -> Any:
    """``train_dataset`` as an :class:`~mnemoguard.data.ImageCaptionDataset`.

    Accepted: an ``ImageCaptionDataset``; a ``datasets.Dataset`` / ``DatasetDict`` (its ``train`` split) with
    ``image_column`` and ``caption_column`` — also one with a transform set (``with_transform``, as diffusers' scripts
    do): its untransformed rows are read, so row ``i`` is still the loop's row ``i``; a dataset directory; or a list of
    ``(image, caption)`` pairs / dicts. Anything else is a ``TypeError`` naming what was found.
    """
    import datasets

    from ..config import DataConfig
    from ..data import ImageCaptionDataset, load_dataset_source

    if isinstance(train_dataset, ImageCaptionDataset):
        return train_dataset
    if isinstance(train_dataset, (str, os.PathLike)):
        hf = load_dataset_source(os.fspath(train_dataset))
    elif isinstance(train_dataset, (datasets.Dataset, datasets.DatasetDict)):
        hf = load_dataset_source(train_dataset)
        if hf.format.get("type") is not None:  # with_transform / set_format: read the stored rows instead
            logger.info("Guard: train_dataset has a %s format or transform set; the guard reads its untransformed "
                        "rows (the same row order)", hf.format.get("type"))
            hf = hf.with_format(None)
    elif isinstance(train_dataset, Sequence) and len(train_dataset) and not isinstance(train_dataset, str):
        images, captions = [], []
        for i, item in enumerate(train_dataset):
            if isinstance(item, Mapping) and image_column in item and caption_column in item:
                image, caption = item[image_column], item[caption_column]
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                image, caption = item
            else:
                raise TypeError(f"train_dataset[{i}]: expected an (image, caption) pair or a dict with keys "
                                f"{image_column!r} and {caption_column!r}; found {type(item).__name__}")
            images.append(image)
            captions.append(caption)
        features = datasets.Features({image_column: datasets.Image(), caption_column: datasets.Value("string")})
        hf = datasets.Dataset.from_dict({image_column: images, caption_column: captions}, features=features)
    else:
        raise TypeError("train_dataset: expected a datasets.Dataset (image and caption columns), a dataset directory "
                        f"or a list of (image, caption) pairs; found {type(train_dataset).__name__}")
    for role, name in (("image_column", image_column), ("caption_column", caption_column)):
        if name not in hf.column_names:
            raise ValueError(f"Guard: {role}={name!r} is not a column of train_dataset; its columns are "
                             f"{hf.column_names}")
    cfg = DataConfig(source="<train_dataset passed to mnemoguard.Guard>", image_column=image_column,
                     caption_column=caption_column, resolution=resolution, center_crop=True, random_flip=False)
    return ImageCaptionDataset(hf, cfg, channels)
