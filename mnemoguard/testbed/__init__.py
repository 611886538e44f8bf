"""Datasets with planted memorization and known ground truth, built offline from real images.

``build_testbed(config, out_dir)`` writes an imagefolder the reference trainer reads like any user dataset
(``data.source=<out_dir>/train``) together with ``ground_truth.json``: for every caption its kind (``global``
duplicated image with a specific caption, ``template`` stamped image sharing a phrase, ``plain`` class caption,
``held_out`` image never trained, ``unseen`` caption never trained), its files and its duplication count, plus
the template and constraint masks as PNGs. ``load_ground_truth(out_dir)`` reads it back as typed records with the
helpers the benchmark needs. See ``docs/testbed.md``.
"""

from .build import TestbedExistsError, build_testbed
from .config import (
    ConstraintConfig,
    DuplicatedConfig,
    HeldOutConfig,
    PlainConfig,
    SourceConfig,
    TemplateConfig,
    TestbedConfig,
    UnseenConfig,
    load_testbed_config,
)
from .ground_truth import CaptionRecord, GroundTruth, GroundTruthError, TrainingImages, load_ground_truth, read_image
from .plan import KINDS, REGIONS, TRAINED_KINDS, PlanError
from .render import Layout, LayoutError
from .sources import SourceError, SourceImages, load_source

__all__ = [
    "KINDS",
    "REGIONS",
    "TRAINED_KINDS",
    "CaptionRecord",
    "ConstraintConfig",
    "DuplicatedConfig",
    "GroundTruth",
    "GroundTruthError",
    "HeldOutConfig",
    "Layout",
    "LayoutError",
    "PlainConfig",
    "PlanError",
    "SourceConfig",
    "SourceError",
    "SourceImages",
    "TemplateConfig",
    "TestbedConfig",
    "TestbedExistsError",
    "TrainingImages",
    "UnseenConfig",
    "build_testbed",
    "load_ground_truth",
    "load_source",
    "load_testbed_config",
    "read_image",
]
