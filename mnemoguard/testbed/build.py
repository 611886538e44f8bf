"""Write a testbed to disk: training image folder, held-out folder, masks and ``ground_truth.json``.

Layout of ``out_dir``::

    ground_truth.json          every caption: kind, style, region, files, copies (see docs/testbed.md)
    train/metadata.jsonl       {"file_name": "images/....png", "text": caption}, one row per training image
    train/images/*.png         global_NNNN_copyRR.png, template_NNNN.png, plain_NNNN.png
    held_out/metadata.jsonl    the same format, never trained on
    held_out/images/*.png
    masks/template.png         255 on the template stamp's square, 0 elsewhere
    masks/template_stamp.png   the stamp in place, 0 elsewhere
    masks/constraint.png       255 on the constant border, 0 elsewhere

``train/`` is an ordinary imagefolder: ``data.source=<out_dir>/train`` trains on it like any user dataset.
``data.source=<out_dir>`` gives the same rows (``datasets`` takes the ``train`` split from the folder name and
reads nothing else), but the ``/train`` form does not depend on that inference. Output is deterministic: the same
config (seed included) gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import TestbedConfig, load_testbed_config
from .ground_truth import (
    CONSTRAINT_MASK,
    FORMAT,
    GROUND_TRUTH_FILE,
    HELD_OUT_DIR,
    MASK_DIR,
    TEMPLATE_MASK,
    TEMPLATE_STAMP,
    TRAIN_DIR,
    VERSION,
    CaptionRecord,
    GroundTruth,
    load_ground_truth,
)
from .plan import Plan, PlannedCaption, make_plan
from .render import Layout
from .sources import SourceImages, load_source

_OUTPUTS = (GROUND_TRUTH_FILE, TRAIN_DIR, HELD_OUT_DIR, MASK_DIR)


class TestbedExistsError(FileExistsError):
    """``out_dir`` already holds a testbed and ``overwrite`` is false."""

    __test__ = False


def _png_bytes(array: np.ndarray) -> bytes:
    """``[H, W, C]`` uint8 -> PNG bytes (mode L or RGB); PIL writes no timestamps, so bytes depend on pixels only."""
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _save_png(array: np.ndarray, path: Path) -> None:
    path.write_bytes(_png_bytes(array))


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path, format="PNG")


def _write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _prepare(out: Path, overwrite: bool) -> None:
    existing = [name for name in _OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise TestbedExistsError(
            f"{out} already holds testbed output ({', '.join(existing)}); pass overwrite=True or pick an empty folder"
        )
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for sub in (TRAIN_DIR, HELD_OUT_DIR, MASK_DIR):
        (out / sub / "images" if sub != MASK_DIR else out / sub).mkdir(parents=True, exist_ok=True)


def _write_images(
    out: Path, plan: Plan, source: SourceImages
) -> tuple[list[CaptionRecord], list[dict[str, str]], list[dict[str, str]]]:
    """Save every planned image; return the records and the train / held-out metadata rows."""
    records, train_rows, held_rows = [], [], []
    counters = {"global": 0, "template": 0, "plain": 0, "held_out": 0}

    def record(p: PlannedCaption, files: list[str]) -> CaptionRecord:
        return CaptionRecord(
            caption=p.caption, kind=p.kind, style=p.style, region=p.region, label=p.label,
            class_name=source.class_names[p.label], class_caption=source.class_captions[p.label], copies=p.copies,
            files=tuple(files), source_indices=tuple(p.source_indices),
        )

    for p in plan.captions:
        files: list[str] = []
        if p.kind == "unseen":
            records.append(record(p, files))
            continue
        folder = HELD_OUT_DIR if p.kind == "held_out" else TRAIN_DIR
        for image in p.images:
            n = counters[p.kind]
            counters[p.kind] += 1
            names = (
                [f"images/global_{n:04d}_copy{c:02d}.png" for c in range(p.copies)]
                if p.kind == "global"
                else [f"images/{p.kind}_{n:04d}.png"]
            )
            encoded = _png_bytes(image)
            for name in names:
                (out / folder / name).write_bytes(encoded)
                files.append(f"{folder}/{name}")
                (held_rows if p.kind == "held_out" else train_rows).append({"file_name": name, "text": p.caption})
        records.append(record(p, files))
    return records, train_rows, held_rows


def _ground_truth_json(
    cfg: TestbedConfig, plan: Plan, source: SourceImages, layout: Layout, records: list[CaptionRecord],
    num_train_rows: int,
) -> dict[str, Any]:
    kinds = ("global", "template", "plain", "held_out", "unseen")
    return {
        "format": FORMAT,
        "version": VERSION,
        "seed": cfg.seed,
        "image": {"resolution": cfg.resolution, "channels": cfg.channels, "mode": "L" if cfg.channels == 1 else "RGB"},
        "source": {
            "name": source.name,
            "num_images": plan.num_source_images,
            "num_duplicates_removed": plan.num_duplicates_removed,
            "class_names": list(source.class_names),
            "class_captions": list(source.class_captions),
        },
        "paths": {
            "train": TRAIN_DIR,
            "held_out": HELD_OUT_DIR,
            "template_mask": TEMPLATE_MASK if layout.stamp_box else None,
            "template_stamp": TEMPLATE_STAMP if layout.stamp_box else None,
            "constraint_mask": CONSTRAINT_MASK if layout.border else None,
        },
        "template": (
            {"box": list(layout.stamp_box), "phrase": cfg.template.phrase}
            if layout.stamp_box
            else None
        ),
        "constraint": (
            {"width": layout.border, "value": layout.border_value.tolist()} if layout.border else None
        ),
        "counts": {
            "train_rows": num_train_rows,
            "captions": {k: sum(r.kind == k for r in records) for k in kinds},
            "images": {k: sum(len(r.distinct_files) for r in records if r.kind == k) for k in kinds[:4]},
        },
        "config": cfg.to_dict(),
        "records": [r.to_json() for r in records],
    }


def build_testbed(
    config: TestbedConfig | str | Path | dict[str, Any] | None, out_dir: str | Path, *,
    overrides: list[str] | None = None, overwrite: bool = False,
) -> GroundTruth:
    """Build a testbed with planted memorization and write it to ``out_dir``; return its ground truth.

    Args:
        config: a :class:`TestbedConfig`, a YAML file, a dict, or ``None`` for the defaults.
        out_dir: destination folder (created if missing). Other files in it are left alone.
        overrides: ``key.path=value`` strings applied on top of ``config``.
        overwrite: replace an existing testbed in ``out_dir`` (only the paths the builder writes are removed).

    Returns:
        The :class:`GroundTruth` read back from ``out_dir``; train with ``data.source=<out_dir>/train``
        (``GroundTruth.recipe_overrides()`` lists the settings).

    Raises:
        ConfigError: a bad config. PlanError: the source has too few unique images. LayoutError: the stamp does
        not fit. SourceError: a missing data package. TestbedExistsError: output exists and ``overwrite`` is false.
    """
    cfg = load_testbed_config(config, overrides)
    layout = Layout.from_config(cfg)
    source = load_source(cfg.source.name)
    plan = make_plan(cfg, source, layout)
    texts = [p.caption for p in plan.captions]
    if len(set(texts)) != len(texts):  # guaranteed by construction; a violation would corrupt the ground truth
        dup = next(t for t in texts if texts.count(t) > 1)
        raise RuntimeError(f"internal error: caption {dup!r} was generated twice")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare(out, overwrite)
    records, train_rows, held_rows = _write_images(out, plan, source)
    order = np.random.default_rng(plan.row_order_seed).permutation(len(train_rows))
    _write_jsonl([train_rows[i] for i in order], out / TRAIN_DIR / "metadata.jsonl")
    _write_jsonl(held_rows, out / HELD_OUT_DIR / "metadata.jsonl")
    if layout.stamp_box:
        _save_mask(layout.template_mask(), out / TEMPLATE_MASK)
        _save_png(layout.stamp_reference(), out / TEMPLATE_STAMP)
    if layout.border:
        _save_mask(layout.constraint_mask(), out / CONSTRAINT_MASK)
    data = _ground_truth_json(cfg, plan, source, layout, records, len(train_rows))
    (out / GROUND_TRUTH_FILE).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return load_ground_truth(out)
