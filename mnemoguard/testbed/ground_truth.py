"""Reading a built testbed: typed caption records, masks, and the image tensors the benchmark needs.

``ground_truth.json`` (format ``mnemoguard-testbed``, version 1) lists every caption of the testbed with its kind,
its files and how often each of its images is trained on; see ``docs/testbed.md`` for the full format. Paths in
it are relative to the testbed folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .plan import KINDS, REGIONS, TRAINED_KINDS

FORMAT = "mnemoguard-testbed"
VERSION = 1
GROUND_TRUTH_FILE = "ground_truth.json"
TRAIN_DIR, HELD_OUT_DIR, MASK_DIR = "train", "held_out", "masks"
TEMPLATE_MASK, TEMPLATE_STAMP = "masks/template.png", "masks/template_stamp.png"
CONSTRAINT_MASK = "masks/constraint.png"
STYLES = ("global", "template", "plain")

ValueRange = tuple[float, float]


class GroundTruthError(ValueError):
    """A testbed folder or ``ground_truth.json`` that is missing or does not match the format."""


@dataclass(frozen=True)
class CaptionRecord:
    """One caption of the testbed.

    Attributes:
        caption: the text.
        kind: ``global`` (duplicated image, specific caption) | ``template`` (stamped image, shared phrase) |
            ``plain`` (class caption) | ``held_out`` (image and caption never trained) | ``unseen`` (caption only).
        style: ``global`` (specific "sample 0412 by writer Q") | ``template`` | ``plain``.
        region: what a model that memorized this caption reproduces: ``full`` | ``template`` | ``none``.
            Planted, not measured: whether the trained model did is for the evaluation metrics to say.
        label: class index named by the caption; ``class_name`` and ``class_caption`` spell it out.
        copies: times each of its images is in the training folder (``global``: the duplication count; 1 for
            ``template`` and ``plain``; 0 for ``held_out`` and ``unseen``).
        files: image files, relative to the testbed folder; for ``global`` every copy is its own file. Training
            files for trained kinds, held-out files for ``held_out``, none for ``unseen``.
        source_indices: index of each distinct image in the raw source.
    """

    caption: str
    kind: str
    style: str
    region: str
    label: int
    class_name: str
    class_caption: str
    copies: int
    files: tuple[str, ...]
    source_indices: tuple[int, ...]

    @property
    def trained(self) -> bool:
        """True when the caption appears in the training folder."""
        return self.kind in TRAINED_KINDS

    @property
    def distinct_files(self) -> tuple[str, ...]:
        """One file per distinct image (the first copy of each duplicated image)."""
        return self.files[:: self.copies] if self.copies > 1 else self.files

    def to_json(self) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "kind": self.kind,
            "style": self.style,
            "region": self.region,
            "label": self.label,
            "class_name": self.class_name,
            "class_caption": self.class_caption,
            "copies": self.copies,
            "files": list(self.files),
            "source_indices": list(self.source_indices),
        }

    @classmethod
    def from_json(cls, row: dict[str, Any], where: str) -> CaptionRecord:
        expected = {f for f in cls.__dataclass_fields__}
        if set(row) != expected:
            raise GroundTruthError(
                f"{where}: expected keys {sorted(expected)}, found {sorted(row)} "
                f"(missing {sorted(expected - set(row))}, unknown {sorted(set(row) - expected)})"
            )
        for key, allowed in (("kind", KINDS), ("style", STYLES), ("region", REGIONS)):
            if row[key] not in allowed:
                raise GroundTruthError(f"{where}: {key} must be one of {allowed}, found {row[key]!r}")
        return cls(**{**row, "files": tuple(row["files"]), "source_indices": tuple(row["source_indices"])})


@dataclass(frozen=True)
class TrainingImages:
    """The distinct training images (each duplicated image once), index-aligned with their captions.

    Attributes:
        images: ``[M, C, H, W]`` float32 in the requested value range.
        files: one file per image, relative to the testbed folder.
        captions: the training caption of each image.
        kinds: the kind of that caption (``global`` | ``template`` | ``plain``).
        labels: ``[M]`` int64 class indices.
    """

    images: torch.Tensor
    files: tuple[str, ...]
    captions: tuple[str, ...]
    kinds: tuple[str, ...]
    labels: torch.Tensor

    def index_of(self, caption: str) -> list[int]:
        """Indices of the images trained with ``caption`` (one for ``global`` captions)."""
        return [i for i, c in enumerate(self.captions) if c == caption]


def read_image(path: Path, channels: int, value_range: ValueRange = (-1.0, 1.0)) -> torch.Tensor:
    """A PNG as ``[C, H, W]`` float32, pixel ``v`` in 0..255 mapped to ``low + (high - low) * v / 255``."""
    with Image.open(path) as im:
        array = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    low, high = float(value_range[0]), float(value_range[1])
    array = low + (high - low) * array / 255.0
    t = torch.from_numpy(array)
    return (t[None] if t.ndim == 2 else t.permute(2, 0, 1)).contiguous()


def _read_mask(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("L")) > 127)


@dataclass(frozen=True)
class GroundTruth:
    """A built testbed: its folder, records and facts (see :func:`load_ground_truth`).

    Attributes:
        root: the testbed folder.
        records: every caption, trained ones first, in the order of ``ground_truth.json``.
        resolution, channels: image geometry.
        seed: the seed it was built with.
        source: facts about the image source (name, class names and captions, duplicates removed).
        template: ``{"box": [top, left, size], "phrase": ...}`` or ``None``.
        constraint: ``{"width": ..., "value": [...]}`` or ``None``.
        config: the full testbed config it was built from.
    """

    root: Path
    records: tuple[CaptionRecord, ...]
    resolution: int
    channels: int
    seed: int
    source: dict[str, Any]
    template: dict[str, Any] | None
    constraint: dict[str, Any] | None
    config: dict[str, Any]

    # ---------------------------------------------------------------------------------------- paths
    @property
    def train_dir(self) -> Path:
        """The training image folder: pass it as ``data.source``."""
        return self.root / TRAIN_DIR

    @property
    def held_out_dir(self) -> Path:
        """The held-out image folder (same imagefolder format, never trained on)."""
        return self.root / HELD_OUT_DIR

    def recipe_overrides(self, pixel_space: bool = True) -> list[str]:
        """``--set`` overrides that make the reference trainer read this testbed unchanged (no flips, no resize).

        ``pixel_space`` also sets ``model.tiny.sample_size`` to the resolution (leave it out for latent models).
        """
        out = [
            f"data.source={self.train_dir}",
            f"data.resolution={self.resolution}",
            "data.center_crop=true",
            "data.random_flip=false",  # a flip would move the template stamp off its mask
            f"model.tiny.channels={self.channels}",
        ]
        return out + ([f"model.tiny.sample_size={self.resolution}"] if pixel_space else [])

    # ---------------------------------------------------------------------------------------- captions
    def by_kind(self, kind: str, style: str | None = None) -> list[CaptionRecord]:
        """Records of one kind (and, if given, one caption style)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, found {kind!r}")
        if style is not None and style not in STYLES:
            raise ValueError(f"style must be one of {STYLES} or None, found {style!r}")
        return [r for r in self.records if r.kind == kind and (style is None or r.style == style)]

    def captions(self, kind: str, style: str | None = None) -> list[str]:
        """Caption texts of one kind (and style), in record order."""
        return [r.caption for r in self.by_kind(kind, style)]

    def probe_captions(self) -> dict[str, list[str]]:
        """Probe caption lists per role: ``global``, ``template``, ``plain``, ``held_out`` (specific captions of
        never-trained images), ``unseen_global`` and ``unseen_template`` (captions only)."""
        return {
            "global": self.captions("global"),
            "template": self.captions("template"),
            "plain": self.captions("plain"),
            "held_out": self.captions("held_out"),
            "unseen_global": self.captions("unseen", "global"),
            "unseen_template": self.captions("unseen", "template"),
        }

    def record(self, caption: str) -> CaptionRecord:
        """The record of a caption text."""
        for r in self.records:
            if r.caption == caption:
                return r
        raise KeyError(f"caption {caption!r} is not part of the testbed at {self.root}")

    # ---------------------------------------------------------------------------------------- masks
    def template_mask(self) -> torch.Tensor:
        """``[H, W]`` bool: the template stamp's square (all False without a template)."""
        path = self.root / TEMPLATE_MASK
        return _read_mask(path) if self.template else torch.zeros(self.resolution, self.resolution, dtype=torch.bool)

    def constraint_mask(self) -> torch.Tensor:
        """``[H, W]`` bool: the border constant in every image (all False without a constraint)."""
        path = self.root / CONSTRAINT_MASK
        return _read_mask(path) if self.constraint else torch.zeros(self.resolution, self.resolution, dtype=torch.bool)

    def region_mask(self, region: str) -> torch.Tensor:
        """``[H, W]`` bool mask of a region: ``full`` (all True), ``template``, ``none`` (all False)."""
        if region == "full":
            return torch.ones(self.resolution, self.resolution, dtype=torch.bool)
        if region == "none":
            return torch.zeros(self.resolution, self.resolution, dtype=torch.bool)
        if region == "template":
            return self.template_mask()
        raise ValueError(f"region must be one of {REGIONS}, found {region!r}")

    def masks_for(self, captions: list[str]) -> torch.Tensor:
        """``[N, H, W]`` bool ground-truth masks of captions (Kim & Lee's "ALL" convention: memorized regions,
        all-ones for whole-image copies, all-zeros for non-memorized captions)."""
        cache: dict[str, torch.Tensor] = {}
        rows = []
        for c in captions:
            region = self.record(c).region
            if region not in cache:
                cache[region] = self.region_mask(region)
            rows.append(cache[region])
        if not rows:
            return torch.zeros(0, self.resolution, self.resolution, dtype=torch.bool)
        return torch.stack(rows)

    def template_reference(self, value_range: ValueRange = (0.0, 1.0)) -> torch.Tensor:
        """``[1, C, H, W]``: the stamp in place, zeros elsewhere (the template of ``template_verbatim``)."""
        if not self.template:
            raise GroundTruthError(f"the testbed at {self.root} has no template (template.enabled was false)")
        return read_image(self.root / TEMPLATE_STAMP, self.channels, value_range)[None]

    # ---------------------------------------------------------------------------------------- images
    def load_images(self, files: list[str] | tuple[str, ...], value_range: ValueRange = (-1.0, 1.0)) -> torch.Tensor:
        """``[N, C, H, W]`` float32 images of files relative to the testbed folder."""
        if not files:
            return torch.zeros(0, self.channels, self.resolution, self.resolution)
        return torch.stack([read_image(self.root / f, self.channels, value_range) for f in files])

    def unique_training_images(self, value_range: ValueRange = (-1.0, 1.0)) -> TrainingImages:
        """Every distinct training image once (the reference set of the nearest-neighbour ratio).

        Duplicated (``global``) images appear once; any other bit-identical images (only possible when the build
        did not de-duplicate) are merged, keeping the first caption.
        """
        files, captions, kinds, labels, seen = [], [], [], [], set()
        for r in self.records:
            if not r.trained:
                continue
            for f in r.distinct_files:
                key = hashlib.blake2b((self.root / f).read_bytes(), digest_size=16).digest()
                if key in seen:
                    continue
                seen.add(key)
                files.append(f)
                captions.append(r.caption)
                kinds.append(r.kind)
                labels.append(r.label)
        return TrainingImages(
            images=self.load_images(files, value_range),
            files=tuple(files),
            captions=tuple(captions),
            kinds=tuple(kinds),
            labels=torch.tensor(labels, dtype=torch.int64),
        )

    def held_out_images(self, value_range: ValueRange = (-1.0, 1.0)) -> tuple[torch.Tensor, list[str]]:
        """``([N, C, H, W], captions)`` of the held-out images (never trained on)."""
        records = self.by_kind("held_out")
        return self.load_images([r.files[0] for r in records], value_range), [r.caption for r in records]


def load_ground_truth(out_dir: str | Path) -> GroundTruth:
    """Read ``<out_dir>/ground_truth.json`` written by :func:`~mnemoguard.testbed.build.build_testbed`.

    Raises:
        GroundTruthError: no such file, another format or version, or malformed records.
    """
    root = Path(out_dir)
    path = root / GROUND_TRUTH_FILE
    if not path.is_file():
        raise GroundTruthError(f"expected a testbed folder with {GROUND_TRUTH_FILE}; {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GroundTruthError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise GroundTruthError(f"{path}: expected format {FORMAT!r}, found {found!r}")
    if data.get("version") != VERSION:
        raise GroundTruthError(f"{path}: expected version {VERSION}, found {data.get('version')!r}")
    records = tuple(CaptionRecord.from_json(row, f"{path} record {i}") for i, row in enumerate(data["records"]))
    return GroundTruth(
        root=root,
        records=records,
        resolution=int(data["image"]["resolution"]),
        channels=int(data["image"]["channels"]),
        seed=int(data["seed"]),
        source=data["source"],
        template=data["template"],
        constraint=data["constraint"],
        config=data["config"],
    )
