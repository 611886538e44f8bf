"""Which captions the benchmark probes at every checkpoint, in which group, with which seeds."""

from __future__ import annotations

import dataclasses

from ..testbed.ground_truth import GroundTruth
from .config import BenchConfig

__all__ = ["CaptionProbes"]


@dataclasses.dataclass
class CaptionProbes:
    """The probed captions, their groups, per-row seeds and their own training images.

    Rows are generation-major: row ``j * P + p`` is generation ``j`` of caption ``p``; negatives get fewer
    generations, so generation ``j`` only has the captions with more than ``j`` seeds.
    """

    captions: list[str]
    groups: list[str]  # planted | unseen | held_out
    own_index: list[int | None]
    rows: list[int]  # caption index of each row
    gens: list[int]  # generation index of each row
    seeds: list[int]

    @classmethod
    def build(cls, gt: GroundTruth, cfg: BenchConfig, train_captions: tuple[str, ...]) -> CaptionProbes:
        p = cfg.probes
        pos = gt.captions("global")[: p.num_positive]
        groups = {"planted": pos, "unseen": gt.captions("unseen", "global")[: p.num_unseen],
                  "held_out": gt.captions("held_out")[: p.num_held_out]}
        captions = [c for g in groups.values() for c in g]
        names = [g for g, cs in groups.items() for _ in cs]
        index = {c: i for i, c in enumerate(train_captions)}
        own = [index.get(c) if g == "planted" else None for c, g in zip(captions, names)]
        n_gen = [p.seeds_positive if g == "planted" else p.seeds_negative for g in names]
        rows, gens = [], []
        for j in range(max(n_gen, default=0)):
            for i, n in enumerate(n_gen):
                if j < n:
                    rows.append(i)
                    gens.append(j)
        base = cfg.seed * 1_000_003
        seeds = [base + 10_007 * j + i for i, j in zip(rows, gens)]
        return cls(captions, names, own, rows, gens, seeds)

    def first_rows(self) -> list[int]:
        """Row of generation 0 of every caption, in caption order."""
        return list(range(len(self.captions)))
