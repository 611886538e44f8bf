"""Which image goes where, with which caption: the testbed as data, before anything is written.

Rendered source images (resized, border painted) are de-duplicated on the pixels that planting leaves untouched,
shuffled with the seed, and cut into disjoint pools in a fixed order: global (duplicated), template, held-out,
plain. Changing a later pool's size never changes an earlier pool's images. Independent generators (spawned from
the seed) pick the images, the caption ids and the unseen captions' classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .captions import CaptionIds, specific_caption, template_caption
from .config import TestbedConfig
from .render import Layout, resize_gray, to_channels, unique_first
from .sources import SourceImages

KINDS = ("global", "template", "plain", "held_out", "unseen")
TRAINED_KINDS = ("global", "template", "plain")
REGIONS = ("full", "template", "none")


class PlanError(ValueError):
    """The source cannot supply what the config asks for."""


@dataclass
class PlannedCaption:
    """One caption of the testbed and the distinct images it goes with (none for unseen captions).

    Attributes:
        caption: the text.
        kind: ``global`` | ``template`` | ``plain`` | ``held_out`` | ``unseen``.
        style: caption style, ``global`` (specific) | ``template`` | ``plain``.
        region: the region a model that memorized this caption reproduces: ``full`` image, ``template`` square,
            or ``none``. A planted hypothesis, not a measurement.
        label: class index named by the caption.
        copies: times each image appears in the training folder (0 for held-out and unseen).
        source_indices: index of each image in the raw source.
        images: ``[n, H, W, C]`` uint8 distinct images.
    """

    caption: str
    kind: str
    style: str
    region: str
    label: int
    copies: int
    source_indices: list[int] = field(default_factory=list)
    images: np.ndarray | None = None


@dataclass
class Plan:
    """Everything :func:`~mnemoguard.testbed.build.build_testbed` writes, plus facts about the source."""

    captions: list[PlannedCaption]
    num_source_images: int
    num_duplicates_removed: int
    row_order_seed: int


def _render(cfg: TestbedConfig, source: SourceImages, layout: Layout) -> np.ndarray:
    images = to_channels(resize_gray(source.images, cfg.resolution), cfg.channels)
    return layout.apply_constraint(images) if layout.border else images


def _needed(cfg: TestbedConfig) -> dict[str, int]:
    return {
        "duplicated.num_images": cfg.duplicated.num_images if cfg.duplicated.enabled else 0,
        "template.num_images": cfg.template.num_images if cfg.template.enabled else 0,
        "held_out.num_images": cfg.held_out.num_images,
        "plain.num_images": cfg.plain.num_images,
    }


def _grouped(indices: np.ndarray, labels: np.ndarray, num_classes: int) -> list[tuple[int, np.ndarray]]:
    """``(label, indices of that label in pool order)`` for every class present."""
    return [(c, indices[labels[indices] == c]) for c in range(num_classes) if np.any(labels[indices] == c)]


def _cut_pools(
    order: np.ndarray, labels: np.ndarray, needed: dict[str, int], cfg: TestbedConfig, num_classes: int
) -> dict[str, np.ndarray]:
    """Disjoint pools cut from the shuffled ``order`` in the order of ``needed``, each the first images (of the
    remaining ones) whose class the pool allows: planted images only from ``duplicated.classes``, held-out images
    only from classes with no planted image when ``held_out.avoid_planted_classes``. Without class restrictions
    this is consecutive slices of ``order``, so a later pool's size never changes an earlier pool's images."""
    pools: dict[str, np.ndarray] = {}
    free = np.ones(len(order), dtype=bool)
    for key, n in needed.items():
        allowed = np.ones(len(order), dtype=bool)
        if key == "duplicated.num_images" and cfg.duplicated.classes is not None:
            allowed = np.isin(labels[order], cfg.duplicated.classes)
        if key == "held_out.num_images" and cfg.held_out.avoid_planted_classes:
            allowed = ~np.isin(labels[order], labels[pools["duplicated.num_images"]])
        candidates = np.flatnonzero(free & allowed)
        if len(candidates) < n:
            what = "planted classes " + str(cfg.duplicated.classes) if key.startswith("duplicated") else (
                "classes with no planted image" if key.startswith("held_out") else "any class")
            raise PlanError(f"{key}: expected {n} images from {what}, found only {len(candidates)} left in the "
                            f"source ({num_classes} classes); lower the count or widen the classes")
        take = candidates[:n]
        pools[key] = order[take]
        free[take] = False
    return pools


def make_plan(cfg: TestbedConfig, source: SourceImages, layout: Layout) -> Plan:
    """Select, caption and plant; raises :class:`PlanError` when the source has too few unique images."""
    rendered = _render(cfg, source, layout)
    keep = unique_first(layout.content_keys(rendered)) if cfg.source.deduplicate else np.arange(len(rendered))
    num_duplicates = len(rendered) - len(keep)
    if cfg.source.exclude_base:  # the fine-tuning variant: only images the shipped base never saw
        from ..trainer.base_model import base_training_indices

        keep = np.setdiff1d(keep, base_training_indices(len(rendered)))
    needed = _needed(cfg)
    total = sum(needed.values())
    if total > len(keep):
        parts = " + ".join(f"{k} {v}" for k, v in needed.items() if v)
        raise PlanError(
            f"source {source.name!r} has {len(keep)} usable images at {cfg.resolution}px "
            f"({num_duplicates} duplicates removed{', base images excluded' if cfg.source.exclude_base else ''}) "
            f"but the config needs {total} ({parts}); "
            "lower the counts or pick a larger source"
        )
    if total - needed["held_out.num_images"] == 0:
        raise PlanError("the config trains on no images: enable duplicated or template, or set plain.num_images > 0")

    pick_seq, id_seq, unseen_seq, rows_seq = np.random.SeedSequence(cfg.seed).spawn(4)
    order = keep[np.random.default_rng(pick_seq).permutation(len(keep))]
    labels = source.labels
    num_classes = len(source.class_captions)
    if cfg.duplicated.classes is not None and max(cfg.duplicated.classes) >= num_classes:
        raise PlanError(f"duplicated.classes: source {source.name!r} has classes 0..{num_classes - 1}, "
                        f"found {cfg.duplicated.classes}")
    pools = _cut_pools(order, labels, needed, cfg, num_classes)
    planted_classes = sorted({int(c) for c in labels[pools["duplicated.num_images"]]})
    free_classes = [c for c in range(num_classes) if c not in planted_classes]

    unique_template = cfg.template.enabled and cfg.template.unique_captions
    n_unseen_g = cfg.unseen.num_global_style if cfg.duplicated.enabled else 0
    n_unseen_t = cfg.unseen.num_template_style if cfg.template.enabled else 0
    n_ids = (
        needed["duplicated.num_images"]
        + (needed["template.num_images"] if unique_template else 0)
        + needed["held_out.num_images"]
        + n_unseen_g
        + n_unseen_t
    )
    try:
        ids = CaptionIds(np.random.default_rng(id_seq), n_ids)
    except ValueError as e:
        raise PlanError(str(e)) from e

    cls_caps, maker = source.class_captions, source.maker
    phrase = cfg.template.phrase
    out: list[PlannedCaption] = []

    def specific(label: int) -> str:
        number, writer = ids.take()
        return specific_caption(cls_caps[label], number, maker, writer)

    for i in pools["duplicated.num_images"]:
        lab = int(labels[i])
        out.append(PlannedCaption(specific(lab), "global", "global", "full", lab, cfg.duplicated.copies, [int(i)],
                                  rendered[[i]]))

    template_pool = pools["template.num_images"]
    if len(template_pool):
        stamped = layout.apply_stamp(rendered[template_pool])
        if unique_template:
            for j, i in enumerate(template_pool):
                lab = int(labels[i])
                number, _ = ids.take()
                out.append(PlannedCaption(template_caption(cls_caps[lab], phrase, number), "template", "template",
                                          "template", lab, 1, [int(i)], stamped[[j]]))
        else:
            position = {int(i): j for j, i in enumerate(template_pool)}
            for lab, idx in _grouped(template_pool, labels, len(cls_caps)):
                out.append(PlannedCaption(template_caption(cls_caps[lab], phrase), "template", "template", "template",
                                          lab, 1, idx.tolist(), stamped[[position[int(i)] for i in idx]]))

    for i in pools["held_out.num_images"]:
        lab = int(labels[i])
        out.append(PlannedCaption(specific(lab), "held_out", "global", "none", lab, 0, [int(i)], rendered[[i]]))

    for lab, idx in _grouped(pools["plain.num_images"], labels, len(cls_caps)):
        out.append(PlannedCaption(cls_caps[lab], "plain", "plain", "none", lab, 1, idx.tolist(), rendered[idx]))

    unseen_rng = np.random.default_rng(unseen_seq)
    global_classes = free_classes if cfg.unseen.avoid_planted_classes else list(range(num_classes))
    if n_unseen_g and not global_classes:
        raise PlanError(f"unseen.avoid_planted_classes: every class has a planted image ({planted_classes}); "
                        "restrict duplicated.classes or set unseen.avoid_planted_classes=false")
    for k in unseen_rng.integers(0, max(len(global_classes), 1), size=n_unseen_g).tolist():
        lab = global_classes[k]
        out.append(PlannedCaption(specific(lab), "unseen", "global", "none", lab, 0))
    for lab in unseen_rng.integers(0, len(cls_caps), size=n_unseen_t).tolist():
        number, _ = ids.take()
        out.append(PlannedCaption(template_caption(cls_caps[lab], phrase, number), "unseen", "template", "template",
                                  lab, 0))

    row_seed = int(np.random.default_rng(rows_seq).integers(0, 2**31 - 1))
    return Plan(out, len(source.images), num_duplicates, row_seed)
