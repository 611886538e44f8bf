"""Typed testbed configuration: which real images, which planted cases, how many of each.

Same conventions as the recipe (:mod:`mnemoguard.config`): dataclasses with commented defaults, YAML or dict in,
unknown keys are errors that list the valid ones, ``key.path=value`` overrides. The defaults follow
``testbed-notes.md``: about 1,000 class-captioned images on which a 1 M-parameter UNet trains at ~8 steps/s on
2 CPU cores, plus planted cases large enough for >= 100 memorized-candidate and >= 100 unseen probe captions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_dataclass

SOURCES = ("digits", "faces", "animals")
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
MIN_RESOLUTION, MAX_RESOLUTION = 8, 64
MAX_CAPTION_IDS = 10_000  # specific captions carry a 4-digit id ("sample 0412"); ids are never reused


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_color(value: list[int], where: str) -> None:
    _check(
        len(value) == 3 and all(0 <= v <= 255 for v in value),
        f"{where}: expected an RGB colour [r, g, b] with values in 0..255, found {value!r}",
    )


@dataclass
class SourceConfig:
    """Where the real images come from (all install from PyPI and work offline)."""

    name: str = "digits"  # digits (sklearn, 1,797 8x8) | faces (skimage lfw_subset, 200 25x25) | animals (10k 28x28)
    deduplicate: bool = True  # drop exact duplicates after rendering (animal-shape-mnist has 284 duplicate pairs)
    exclude_base: bool = False  # digits only: drop the images the shipped base UNet trained on (fine-tuning variant)

    def __post_init__(self) -> None:
        _check(self.name in SOURCES, f"source.name: expected one of {SOURCES}, found {self.name!r}")
        _check(not self.exclude_base or self.name == "digits",
               f"source.exclude_base: the shipped base was trained on digits, found source {self.name!r}")


@dataclass
class PlainConfig:
    """Ordinary training images, each seen once, captioned by class ("a handwritten digit seven")."""

    num_images: int = 1000

    def __post_init__(self) -> None:
        _check(self.num_images >= 0, f"plain.num_images: expected >= 0, found {self.num_images}")


@dataclass
class DuplicatedConfig:
    """Global memorization (kind ``global``): images duplicated ``copies`` times, each with its own caption."""

    enabled: bool = True
    num_images: int = 100  # distinct planted images = distinct memorized-candidate captions
    copies: int = 20  # times each appears in the training folder (testbed-notes: 10 images x 50 copies)
    classes: list[int] | None = None  # draw planted images from these class indices only; None = any class

    def __post_init__(self) -> None:
        _check(self.num_images >= 0, f"duplicated.num_images: expected >= 0, found {self.num_images}")
        _check(self.copies >= 1, f"duplicated.copies: expected >= 1, found {self.copies}")
        _check(self.classes is None or (len(self.classes) > 0 and all(c >= 0 for c in self.classes)),
               f"duplicated.classes: expected null or a non-empty list of class indices >= 0, found {self.classes}")


@dataclass
class TemplateConfig:
    """Local (template) memorization: a fixed stamp pasted into many images whose captions share a phrase."""

    enabled: bool = True
    num_images: int = 200  # training images that carry the stamp (each seen once)
    phrase: str = "with the red stamp"  # appended to the class caption of every stamped image
    unique_captions: bool = True  # True: "..., form 0412" makes each caption unique; False: one caption per class
    size: int | None = None  # stamp side in pixels; None = resolution // 4
    corner: str = "bottom_right"  # top_left | top_right | bottom_left | bottom_right
    margin: int = 0  # pixels between the stamp and the constraint border (or the image edge)
    ink: list[int] = field(default_factory=lambda: [230, 30, 30])  # RGB; grayscale images use its luminance
    paper: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB of the stamp's alternate rings

    def __post_init__(self) -> None:
        _check(self.num_images >= 0, f"template.num_images: expected >= 0, found {self.num_images}")
        _check(bool(self.phrase.strip()), "template.phrase: expected a non-empty phrase, found an empty string")
        _check(self.size is None or self.size >= 2, f"template.size: expected >= 2 or null, found {self.size}")
        _check(self.corner in CORNERS, f"template.corner: expected one of {CORNERS}, found {self.corner!r}")
        _check(self.margin >= 0, f"template.margin: expected >= 0, found {self.margin}")
        _check_color(self.ink, "template.ink")
        _check_color(self.paper, "template.paper")
        _check(self.ink != self.paper, f"template.ink and template.paper must differ, both are {self.ink}")


@dataclass
class ConstraintConfig:
    """Intrinsic constraint: a border constant in *every* image (training and held-out). Not memorization."""

    enabled: bool = True
    width: int = 1  # border width in pixels
    color: list[int] = field(default_factory=lambda: [128, 128, 128])  # RGB; grayscale images use its luminance

    def __post_init__(self) -> None:
        _check(self.width >= 1, f"constraint.width: expected >= 1, found {self.width}")
        _check_color(self.color, "constraint.color")


@dataclass
class HeldOutConfig:
    """Images never trained on, with captions in the planted (specific) style: the train/held-out contrast."""

    num_images: int = 100
    avoid_planted_classes: bool = False  # True: only classes with no planted (duplicated) image; see docs/testbed.md

    def __post_init__(self) -> None:
        _check(self.num_images >= 0, f"held_out.num_images: expected >= 0, found {self.num_images}")


@dataclass
class UnseenConfig:
    """Captions never trained on, written like the planted ones (probe negatives / template-phrase probes)."""

    num_global_style: int = 100  # "a handwritten digit three, sample 5821 by writer K" (needs duplicated.enabled)
    num_template_style: int = 100  # "a handwritten digit three with the red stamp, form 7730" (needs template)
    avoid_planted_classes: bool = False  # True: global-style captions name only classes with no planted image

    def __post_init__(self) -> None:
        for name in ("num_global_style", "num_template_style"):
            value = getattr(self, name)
            _check(value >= 0, f"unseen.{name}: expected >= 0, found {value}")


@dataclass
class TestbedConfig:
    """A dataset with planted memorization and known ground truth (see ``docs/testbed.md``)."""

    __test__ = False  # not a pytest test class despite the name

    seed: int = 0  # same seed -> byte-identical files; another seed -> another selection of images and ids
    resolution: int = 16  # output side in pixels (8..64; 16 is what the CPU testbed-notes measured)
    channels: int = 1  # 1 = grayscale PNGs, 3 = RGB PNGs
    source: SourceConfig = field(default_factory=SourceConfig)
    plain: PlainConfig = field(default_factory=PlainConfig)
    duplicated: DuplicatedConfig = field(default_factory=DuplicatedConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    held_out: HeldOutConfig = field(default_factory=HeldOutConfig)
    unseen: UnseenConfig = field(default_factory=UnseenConfig)

    def __post_init__(self) -> None:
        _check(
            MIN_RESOLUTION <= self.resolution <= MAX_RESOLUTION,
            f"resolution: expected {MIN_RESOLUTION}..{MAX_RESOLUTION} pixels, found {self.resolution}",
        )
        _check(self.channels in (1, 3), f"channels: expected 1 (grayscale) or 3 (RGB), found {self.channels}")
        _check(self.seed >= 0, f"seed: expected >= 0, found {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_testbed_config(
    config: TestbedConfig | str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> TestbedConfig:
    """A :class:`TestbedConfig` from a dataclass, a YAML file or a dict, then ``key.path=value`` overrides.

    Raises:
        ConfigError: unknown keys (the message lists the valid ones), wrong types or out-of-range values.
    """
    return load_dataclass(TestbedConfig, config, overrides, what="testbed config")
