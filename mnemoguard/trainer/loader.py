"""The reference trainer's data loading: batches of rows, an epoch order that depends only on ``(seed, epoch)``."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..data import DataError, ImageCaptionDataset

__all__ = ["EpochShuffleSampler", "collate", "make_dataloader", "steps_per_epoch"]


def collate(rows: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack good rows; count skipped (``None``) ones in ``num_skipped``."""
    good = [r for r in rows if r is not None]
    if not good:
        raise DataError(
            f"every sample of a batch of {len(rows)} was unreadable (skip_bad_samples only skips single rows)"
        )
    return {
        "pixel_values": torch.stack([r["pixel_values"] for r in good]),
        "captions": [r["caption"] for r in good],
        "indices": torch.tensor([r["index"] for r in good]),
        "num_skipped": len(rows) - len(good),
    }


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation that depends only on ``(seed, epoch)``: resuming mid-run replays the same data order."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


def make_dataloader(
    dataset: ImageCaptionDataset, batch_size: int, seed: int, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    if batch_size > len(dataset):
        raise DataError(f"train_batch_size={batch_size} is larger than the dataset ({len(dataset)} rows)")
    sampler = EpochShuffleSampler(len(dataset), seed)
    # The loader's own generator: creating an iterator draws a worker base seed, which must not come from the global
    # RNG (a resumed run creates its iterator at a different point of the stream than an uninterrupted one).
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    return math.ceil(num_batches / gradient_accumulation_steps)
