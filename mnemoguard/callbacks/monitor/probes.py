"""The monitor's probe set: a plain, JSON-able spec chosen once from the training rows (and held-out samples).

- *at-risk* probes, one row per group: groups of exact and near-duplicate training images, whatever their captions
  (kind ``image_duplicate``, :mod:`mnemoguard.image_groups`), largest first, then training rows whose caption is
  repeated verbatim elsewhere (kind ``duplicate``), most repeated first — the pairs most at risk of being memorized
  (Somepalli et al. 2023, Carlini et al. 2023);
- *random* probes: further training rows drawn uniformly, never with the content (canonical image and caption) of a
  probe already chosen;
- *held-out* probes: unseen captions (``heldout_captions``; evaluated at the inputs of training probe ``h mod P``) or
  held-out samples with images (never trained: ``heldout_data`` or ``heldout=``), or none.

Per probe, band and draw: a fixed timestep drawn inside the band from the monitor's own seeded generator; the spec
also holds the rows of the nearest-neighbour pool. The spec carries a *fingerprint* of the settings and data it was
chosen from, so a resumed run with changed settings knows its checkpointed probe set no longer fits.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from ...config.guard import MonitorConfig
from ...data import DataError
from ...image_groups import ImageGroups, find_image_groups

logger = logging.getLogger("mnemoguard")

__all__ = ["SPEC_VERSION", "choose_probes", "duplicated_caption_rows", "heldout_item", "image_groups",
           "probe_fingerprint"]

SPEC_VERSION = 3


def duplicated_caption_rows(captions: Sequence[str]) -> list[tuple[int, int]]:
    """``(first row, count)`` for every caption that occurs more than once, most repeated first (ties: earliest)."""
    counts = Counter(captions)
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    dups = [(first[c], n) for c, n in counts.items() if n > 1 and isinstance(c, str) and c.strip()]
    return sorted(dups, key=lambda fc: (-fc[1], fc[0]))


def heldout_item(heldout: Any, j: int, image_column: str = "image", caption_column: str = "text") -> tuple[Any, str]:
    """Held-out sample ``j`` as ``(image, caption)``: a row of a ``datasets.Dataset`` (the training columns, else
    ``image`` / ``text``), an ``(image, caption)`` pair, or a dict."""
    item = heldout[int(j)]
    if isinstance(item, dict):
        image_key = image_column if image_column in item else "image"
        caption_key = caption_column if caption_column in item else "text"
        if image_key not in item or caption_key not in item:
            raise KeyError(f"held-out item {j}: expected keys {image_column!r} / {caption_column!r} (or 'image' / "
                           f"'text'), found {sorted(item)}")
        return item[image_key], item[caption_key]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise TypeError(f"held-out item {j}: expected an (image, caption) pair or a dict, found {type(item).__name__}")


def probe_fingerprint(config: MonitorConfig, num_rows: int, num_heldout: int,
                      bands: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What the probe set is a function of: the probe settings, the bands, the sizes of the data."""
    return {
        "num_duplicate_probes": config.num_duplicate_probes, "num_random_probes": config.num_random_probes,
        "num_heldout_probes": config.num_heldout_probes, "heldout_captions": list(config.heldout_captions),
        "heldout_data": config.heldout_data, "draws_per_band": config.draws_per_band, "seed": config.seed,
        "nearest_pool_size": config.nearest_pool_size, "bands": {k: list(v) for k, v in bands.items()},
        "near_duplicate_ratio": config.near_duplicate_ratio, "duplicate_scan_rows": config.duplicate_scan_rows,
        "num_rows": int(num_rows), "num_heldout": int(num_heldout),
    }


def _content(dataset: Any, row: int, captions: Sequence[str]) -> bytes | None:
    """The row's canonical image and caption as bytes (None when the image cannot be read: not a probe)."""
    try:
        pixels = dataset.canonical_image(row)
    except DataError as err:
        logger.warning("MemorizationMonitor: training row %d cannot be used as a probe: %s", row, err)
        return None
    return pixels.numpy().tobytes() + captions[row].encode()


def choose_probes(dataset: Any, config: MonitorConfig, bands: dict[str, tuple[int, int]], num_train_timesteps: int,
                  heldout: Any = None) -> dict[str, Any]:
    """The probe spec (module docstring) from an :class:`~mnemoguard.data.ImageCaptionDataset` and held-out samples
    (``None``, a ``datasets.Dataset`` or a sequence); deterministic given ``config.seed``."""
    c = config
    captions = dataset.captions
    n = len(captions)
    g = torch.Generator().manual_seed(c.seed)
    groups = image_groups(dataset, c)
    at_risk = [(grp[0], len(grp), "image_duplicate") for grp in groups.groups]
    at_risk += [(row, count, "duplicate") for row, count in duplicated_caption_rows(captions)]
    # Duplicated images first (most copies first), then repeated captions: a class caption shared by a hundred
    # different images is a far weaker risk than one image trained thirty times.
    at_risk.sort(key=lambda rck: (rck[2] != "image_duplicate", -rck[1]))
    rows, kinds, seen = [], [], set()
    for row, _count, kind in at_risk:
        if len(rows) == c.num_duplicate_probes:
            break
        key = _content(dataset, row, captions)
        if key is not None and key not in seen:
            rows.append(row)
            kinds.append(kind)
            seen.add(key)
    chosen = set(rows)
    rest = [i for i in range(n) if i not in chosen]
    extra = 0
    for k in torch.randperm(len(rest), generator=g).tolist():
        if extra == c.num_random_probes:
            break
        key = _content(dataset, rest[k], captions)
        if key is not None and key not in seen:
            rows.append(rest[k])
            kinds.append("random")
            seen.add(key)
            extra += 1
    if not rows:
        raise ValueError("MemorizationMonitor: no readable training row to use as a probe")
    chosen = set(rows)

    source, h_rows, h_captions = None, [], []
    if c.num_heldout_probes and c.heldout_captions:
        train_set = set(captions)
        unseen = [cap for cap in c.heldout_captions if cap not in train_set]
        if len(unseen) < len(c.heldout_captions):
            logger.warning("MemorizationMonitor: %d of heldout_captions are training captions and were dropped",
                           len(c.heldout_captions) - len(unseen))
        h_captions = unseen[: c.num_heldout_probes]
        h_rows = [j % len(rows) for j in range(len(h_captions))]
        source = "captions" if h_captions else None
    elif c.num_heldout_probes and heldout is not None:
        order = torch.randperm(len(heldout), generator=g).tolist()[: c.num_heldout_probes]
        h_rows = sorted(order)
        cols = (dataset.cfg.image_column, dataset.cfg.caption_column)
        h_captions = [heldout_item(heldout, j, *cols)[1] for j in h_rows]
        source = "samples" if h_rows else None

    # Fixed timesteps: per training probe, band, draw; then per held-out sample (unseen captions share).
    timesteps = []
    n_own = len(rows) + (len(h_rows) if source == "samples" else 0)
    for _ in range(n_own):
        for lo, hi in bands.values():
            for _ in range(c.draws_per_band):
                timesteps.append(int(torch.randint(lo, hi, (1,), generator=g)))
    pool_rest = [i for i in range(n) if i not in chosen]
    pool_perm = torch.randperm(len(pool_rest), generator=g).tolist()[: c.nearest_pool_size]
    return {
        "version": SPEC_VERSION,
        "fingerprint": probe_fingerprint(c, n, len(heldout) if heldout is not None else 0, bands),
        "seed": int(c.seed),
        "num_train_timesteps": int(num_train_timesteps),
        "bands": {k: list(v) for k, v in bands.items()},
        "draws_per_band": int(c.draws_per_band),
        "train_rows": rows,
        "train_kinds": kinds,
        "train_captions": [captions[r] for r in rows],
        "heldout_source": source,
        "heldout_rows": h_rows,
        "heldout_captions": h_captions,
        "timesteps": timesteps,
        "pool_rows": sorted(pool_rest[k] for k in pool_perm),
        "image_groups": groups.to_dict(),
    }


def image_groups(dataset: Any, config: MonitorConfig) -> ImageGroups:
    """Exact and near-duplicate image groups of the training rows (:func:`~mnemoguard.image_groups.find_image_groups`
    on their canonical images; unreadable rows are skipped here and reported by the probe choice)."""

    def load(row: int) -> torch.Tensor | None:
        try:
            return dataset.canonical_image(row)
        except DataError:
            return None

    return find_image_groups(len(dataset), load, near_ratio=config.near_duplicate_ratio,
                             max_rows=config.duplicate_scan_rows, seed=config.seed)
