"""The training images an audit compares the checkpoints' generations with, in the layouts trainers read.

=======================================  ==========================================================================
layout                                   rows
=======================================  ==========================================================================
an imagefolder with ``metadata.jsonl``   one per image (``file_name``, ``text``): diffusers' scripts, SimpleTuner
a ``datasets.save_to_disk`` folder       one per row (``image``, ``text``)
kohya's ``<repeats>_<name>/`` folders    each image ``repeats`` times (kohya repeats it that often per epoch: that
                                         is duplication); its caption from a ``.txt`` / ``.caption`` sidecar, else
                                         the folder's ``<name>`` (kohya's class token)
=======================================  ==========================================================================

:func:`load_audit_data` returns the rows as the guard reads them (a ``datasets.Dataset`` with ``image`` and
``text``) and one :class:`ImageRecord` per distinct file (its file, caption, repeats and rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["ImageRecord", "load_audit_data"]

_IMAGES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageRecord:
    """One training image: ``file`` (or ``row <i>`` when the source keeps no file names), ``caption``, how many
    times the training data holds it (``repeats``) and at which rows."""

    file: str
    caption: str
    repeats: int = 1
    rows: list[int] = field(default_factory=list)


def _sidecar(image: Path) -> str | None:
    for suffix in (".txt", ".caption"):
        side = image.with_suffix(suffix)
        if side.is_file():
            return side.read_text(encoding="utf-8").strip()
    return None


def _kohya(path: Path, folders: list[Path]) -> tuple[Any, list[ImageRecord]]:
    import datasets

    images, texts, records = [], [], []
    for folder in folders:
        repeats, name = _KOHYA_FOLDER.match(folder.name).groups()
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGES)
        for f in files:
            caption = _sidecar(f) or name.replace("_", " ")
            rec = ImageRecord(str(f), caption, int(repeats))
            for _ in range(int(repeats)):
                rec.rows.append(len(images))
                images.append(str(f))
                texts.append(caption)
            records.append(rec)
    if not images:
        raise DataError(f"--data {str(path)!r}: kohya-style folders {[f.name for f in folders][:3]} hold no image "
                        f"({', '.join(sorted(_IMAGES))})")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "text": texts}, features=features), records


def load_audit_data(source: str | Path, image_column: str = "image", caption_column: str = "text",
                    max_rows: int | None = None) -> tuple[Any, list[ImageRecord]]:
    """``(rows, records)`` of ``source`` (module docstring), its first ``max_rows`` rows when given (a recipe's
    ``data.max_samples``); a :class:`~mnemoguard.errors.DataError` naming the folder when it is none of the
    layouts."""
    from ..data import load_dataset_source

    def first(rows: Any) -> Any:
        return rows if max_rows is None or len(rows) <= max_rows else rows.select(range(max_rows))

    path = Path(source)
    if str(source).startswith("builtin:"):  # a recipe's built-in data set
        return _rows_and_records(first(load_dataset_source(str(source))), str(source), image_column, caption_column)
    if not path.is_dir():
        raise DataError(f"--data: expected a folder (an imagefolder with metadata.jsonl, a save_to_disk folder or "
                        f"kohya's <repeats>_<name>/ folders), found {str(source)!r}")
    kohya = sorted(p for p in path.iterdir() if p.is_dir() and _KOHYA_FOLDER.match(p.name))
    if kohya and not (path / "metadata.jsonl").is_file():
        return _kohya(path, kohya)
    return _rows_and_records(first(load_dataset_source(str(path))), str(path), image_column, caption_column)


def _rows_and_records(rows: Any, where: str, image_column: str, caption_column: str) -> tuple[Any, list[ImageRecord]]:
    import datasets

    for column in (image_column, caption_column):
        if column not in rows.column_names:
            raise DataError(f"--data {where!r}: no column {column!r}; its columns are {rows.column_names}")
    paths = rows.cast_column(image_column, datasets.Image(decode=False))[image_column]
    records: dict[str, ImageRecord] = {}
    for i, (cell, caption) in enumerate(zip(paths, rows[caption_column])):
        key = (cell or {}).get("path") or f"row {i}"
        rec = records.setdefault(f"{key}\0{caption}", ImageRecord(str(key), str(caption), 0))
        rec.repeats += 1
        rec.rows.append(i)
    if image_column != "image" or caption_column != "text":
        rows = rows.rename_columns({c: n for c, n in ((image_column, "image"), (caption_column, "text")) if c != n})
    return rows, list(records.values())
