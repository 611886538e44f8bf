"""Training data: ``datasets`` image folders (``metadata.jsonl`` captions), ``save_to_disk`` directories and in-memory
``Dataset`` objects, with resize / crop / flip / normalise done in PIL + numpy (no torchvision).

Images are decoded lazily, one row at a time, so that a corrupt file is reported with its row and path; with
``skip_bad_samples`` it is skipped and counted instead (the count rides on each batch as ``num_skipped``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import DataConfig
from .errors import DataError

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]




# ----------------------------------------------------------------------------------------------- sources
def digits_dataset():
    """sklearn's 1,797 real 8x8 handwritten digits as 16x16 grayscale PIL images, captioned by class."""
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        Image.fromarray((img / 16.0 * 255).round().astype(np.uint8), mode="L").resize((16, 16), Image.BILINEAR)
        for img in digits.images
    ]
    captions = [f"a handwritten digit {DIGIT_NAMES[t]}" for t in digits.target]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict(
        {"image": images, "text": captions, "label": [int(t) for t in digits.target]}, features=features
    )


def load_dataset_source(source: Any):
    """A ``datasets.Dataset`` from a builtin name, a directory, or a ``Dataset`` passed through."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        if "train" not in source:
            raise DataError(f"DatasetDict has no 'train' split (found {list(source)})")
        return source["train"]
    if not isinstance(source, str):
        raise DataError(f"data.source: expected a path, 'builtin:digits' or a datasets.Dataset, found {source!r}")
    if source == "builtin:digits":
        return digits_dataset()
    if source.startswith("builtin:"):
        raise DataError(f"data.source: unknown builtin {source!r}; available: builtin:digits")
    path = Path(source)
    if not path.exists():
        raise DataError(f"data.source: no such directory {source!r}")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return load_dataset_source(datasets.load_from_disk(str(path)))
    meta = path / "metadata.jsonl"
    if meta.is_file() and not meta.read_text().strip():
        raise DataError(f"{meta} is empty: expected one JSON line per image, e.g. "
                        '{"file_name": "0001.png", "text": "a caption"}')
    if not any(p.suffix.lower() in _IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise DataError(f"data.source: {source!r} holds no image file ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    return datasets.load_dataset("imagefolder", data_dir=str(path), split="train")


# ----------------------------------------------------------------------------------------------- transforms
def preprocess_image(
    image: Image.Image, resolution: int, channels: int, center_crop: bool = True, flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PIL image -> float tensor ``(C, resolution, resolution)`` in [-1, 1]: resize shorter side, crop, flip."""
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        tensor = tensor.flip(-1)
    return tensor.contiguous()


def decode_image(value: Any) -> Image.Image:
    """An undecoded ``datasets.Image`` cell ({'bytes', 'path'}) or a PIL image -> a loaded PIL image."""
    if isinstance(value, Image.Image):
        value.load()
        return value
    if isinstance(value, dict):
        data = value.get("bytes")
        image = Image.open(io.BytesIO(data)) if data is not None else Image.open(value["path"])
        image.load()
        return image
    raise TypeError(f"expected an image, found {type(value).__name__}")


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Rows of ``(image, caption)`` -> ``{"pixel_values", "caption", "index"}``, or ``None`` for a skipped row."""

    def __init__(self, hf_dataset, cfg: DataConfig, channels: int) -> None:
        import datasets

        self.cfg = cfg
        self.channels = channels
        columns = hf_dataset.column_names
        for role, name in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)):
            if name not in columns:
                raise DataError(f"data.{role}={name!r} is not a column of the dataset; its columns are {columns}")
        if cfg.max_samples is not None:
            hf_dataset = hf_dataset.select(range(min(cfg.max_samples, len(hf_dataset))))
        if len(hf_dataset) == 0:
            raise DataError(f"the dataset at data.source={cfg.source!r} has no rows")
        feature = hf_dataset.features[cfg.image_column]
        if isinstance(feature, datasets.Image):  # decode ourselves so a bad file names its row and path
            hf_dataset = hf_dataset.cast_column(cfg.image_column, datasets.Image(decode=False))
        self.ds = hf_dataset

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def captions(self) -> list[str]:
        """Every row's caption, in row order."""
        return list(self.ds[self.cfg.caption_column])

    def column(self, name: str) -> list[Any]:
        """Every row's value of column ``name`` (a :class:`DataError` lists the columns when it is absent)."""
        if name not in self.ds.column_names:
            raise DataError(f"column {name!r} is not in the training dataset; its columns are {self.ds.column_names}")
        return list(self.ds[name])

    def canonical_image(self, index: int) -> torch.Tensor:
        """Row ``index``'s image in its canonical view (centre crop, no flip), ``[C, H, W]`` in [-1, 1]: what the
        guard's probes use, independent of any RNG. A :class:`DataError` names the row and file when it cannot be
        read."""
        cell = self.ds[int(index)][self.cfg.image_column]
        try:
            image = decode_image(cell)
        except Exception as e:
            raise DataError(f"{self._where(index, cell)}: cannot read the image: {e}") from e
        return preprocess_image(image, self.cfg.resolution, self.channels, center_crop=True, flip=False)

    def _where(self, index: int, cell: Any) -> str:
        path = cell.get("path") if isinstance(cell, dict) else getattr(cell, "filename", None)
        return f"row {index}" + (f" ({path})" if path else "")

    def check_rows(self) -> list[int]:
        """Every row's caption and image header, before training (a bad file found only when its batch comes up
        would stop the run there, and again at the same place after a resume). Opening an image reads its header
        only, not the pixels. Returns the bad rows when ``skip_bad_samples`` (they are skipped and counted in
        training); raises a :class:`DataError` naming the first bad row and its file otherwise."""
        bad = []
        captions = self.ds[self.cfg.caption_column]
        cells = self.ds[self.cfg.image_column]
        for index, (cell, caption) in enumerate(zip(cells, captions)):
            try:
                if not isinstance(caption, str) or not caption.strip():
                    raise DataError(f"{self._where(index, cell)}: missing caption in column "
                                    f"{self.cfg.caption_column!r} (found {caption!r})")
                if isinstance(cell, dict):
                    data = cell.get("bytes")
                    with Image.open(io.BytesIO(data) if data is not None else cell["path"]) as image:
                        image.size  # noqa: B018 - the header is parsed on open; size proves it
            except DataError:
                if not self.cfg.skip_bad_samples:
                    raise
                bad.append(index)
            except Exception as e:
                if not self.cfg.skip_bad_samples:
                    raise DataError(f"{self._where(index, cell)}: cannot read the image: {e}") from None
                bad.append(index)
        return bad

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = self.ds[int(index)]
        cell, caption = row[self.cfg.image_column], row[self.cfg.caption_column]
        try:
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(
                    f"{self._where(index, cell)}: missing caption in column {self.cfg.caption_column!r} "
                    f"(found {caption!r})"
                )
            try:
                image = decode_image(cell)
            except Exception as e:
                raise DataError(f"{self._where(index, cell)}: cannot read the image: {e}") from e
        except DataError:
            if self.cfg.skip_bad_samples:
                return None
            raise
        pixels = preprocess_image(image, self.cfg.resolution, self.channels, self.cfg.center_crop,
                                  self.cfg.random_flip)
        return {"pixel_values": pixels, "caption": caption, "index": int(index)}
