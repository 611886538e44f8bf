"""Groups of exact and near-duplicate training images, whatever their captions: the rows most at risk of being
memorized (Somepalli et al. 2023 and Carlini et al. 2023 find that duplicated training images are the ones diffusion
models reproduce).

Two passes over the rows' canonical images (centre crop, no flip):

* **exact** duplicates: identical pixels after preprocessing (a hash of the canonical image's bytes);
* **near** duplicates among the distinct images: a thumbnail per image (``thumb`` × ``thumb`` area average, channels
  kept), Euclidean distances between thumbnails, and two images joined when their distance is below
  ``near_ratio`` × the median nearest-neighbour distance of the set (scale-free: a fraction of how far apart
  typical distinct images are; 1/3 echoes Gu et al.'s copy ratio). Groups are the connected components.

Only a thumbnail and a hash are kept per row, so memory is O(rows × thumb²); the cost is decoding every image once
(``max_rows`` bounds it: a uniform subsample, so an image with k copies among N rows is found when at least two of
its copies are drawn) plus the pairwise thumbnail distances, O(rows² × thumb²) in blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ImageGroups", "find_image_groups", "group_images"]


@dataclass
class ImageGroups:
    """Duplicate groups of training rows, largest first.

    Attributes:
        groups: each a sorted list of dataset rows holding the same (or a nearly the same) image; only groups of 2+.
        exact: per group, whether all its rows are bitwise identical after preprocessing.
        rows_scanned: how many rows were looked at (all, or the ``max_rows`` subsample).
        scale: the median nearest-neighbour thumbnail distance among distinct images (the near-duplicate unit).
    """

    groups: list[list[int]]
    exact: list[bool]
    rows_scanned: int
    scale: float

    def to_dict(self) -> dict:
        return {"groups": self.groups, "exact": self.exact, "rows_scanned": self.rows_scanned, "scale": self.scale}


def _components(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    out: dict[int, list[int]] = {}
    for i in range(n):
        out.setdefault(find(i), []).append(i)
    return list(out.values())


def group_images(keys: Sequence[bytes], thumbs: torch.Tensor, rows: Sequence[int], near_ratio: float = 1.0 / 3.0,
                 block: int = 512) -> ImageGroups:
    """Groups from per-row exact keys and thumbnails (``[R, ...]``, one per row of ``rows``); see the module
    docstring. ``near_ratio=0`` finds exact duplicates only."""
    if len(keys) != thumbs.shape[0] or len(rows) != len(keys):
        raise ValueError(f"keys, thumbnails and rows must have one entry per row; found {len(keys)}, "
                         f"{thumbs.shape[0]}, {len(rows)}")
    first: dict[bytes, int] = {}
    members: list[list[int]] = []
    for i, key in enumerate(keys):
        if key not in first:
            first[key] = len(members)
            members.append([])
        members[first[key]].append(i)
    flat = thumbs.reshape(thumbs.shape[0], -1).float()
    reps = flat[[m[0] for m in members]]  # one thumbnail per distinct image
    D = reps.shape[0]
    scale = 0.0
    pairs: list[tuple[int, int]] = []
    if near_ratio > 0 and D >= 3:
        nn = torch.full((D,), float("inf"))
        for s in range(0, D, block):
            d = torch.cdist(reps[s:s + block], reps)
            d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
            nn[s:s + block] = d.min(1).values
        scale = float(nn.median())
        limit = near_ratio * scale
        for s in range(0, D, block):
            d = torch.cdist(reps[s:s + block], reps)
            a, b = torch.nonzero(d < limit, as_tuple=True)
            pairs += [(int(i) + s, int(j)) for i, j in zip(a, b) if int(i) + s < int(j)]
    groups, exact = [], []
    for comp in _components(D, pairs):
        idx = sorted(i for k in comp for i in members[k])
        if len(idx) >= 2:
            groups.append(sorted(int(rows[i]) for i in idx))
            exact.append(len(comp) == 1)
    order = sorted(range(len(groups)), key=lambda k: (-len(groups[k]), groups[k][0]))
    return ImageGroups([groups[k] for k in order], [exact[k] for k in order], len(keys), scale)


def find_image_groups(num_rows: int, load: Callable[[int], torch.Tensor | None], *, near_ratio: float = 1.0 / 3.0,
                      thumb: int = 8, max_rows: int | None = 20_000, seed: int = 0) -> ImageGroups:
    """Duplicate groups among ``num_rows`` rows, reading each image once with ``load(row) -> [C, H, W]`` (the
    canonical image; None for an unreadable row, which is skipped). ``max_rows``: scan a uniform subsample of that
    many rows (None: all)."""
    rows = list(range(num_rows))
    if max_rows is not None and num_rows > max_rows:
        g = torch.Generator().manual_seed(seed)
        rows = sorted(torch.randperm(num_rows, generator=g)[:max_rows].tolist())
    keys, thumbs, kept = [], [], []
    for r in rows:
        image = load(r)
        if image is None:
            continue
        image = image.float()
        keys.append(hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest())
        thumbs.append(F.adaptive_avg_pool2d(image[None], thumb)[0])
        kept.append(r)
    if not kept:
        return ImageGroups([], [], 0, 0.0)
    return group_images(keys, torch.stack(thumbs), kept, near_ratio=near_ratio)
