"""Does an image the model made come back as a probe's own training image? And rank 0's answer on every rank.

One own-image copy check for the monitor's visual check and the danger-zone tracker: Gu et al.'s nearest-neighbour
ratio ``d1/d2`` (TMLR 2025) of each image against a reference set, and whether the nearest reference is the probe's
own image (a copy when it is and ``d1/d2 < copy_ratio``). Every rank computes the same images (ZeRO-3 needs equal
network calls), but float kernels may differ between ranks: :func:`from_rank_zero` hands rank 0's values to every
rank in one broadcast, so the decisions built on them are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["OwnCopies", "from_rank_zero", "own_copies"]


@dataclass(frozen=True)
class OwnCopies:
    """Per image: ``nearest`` (index into the reference), ``ratio`` (``d1/d2``), ``is_own`` (the nearest reference is
    the probe's own image), ``copies`` (``is_own`` and ``ratio < copy_ratio``); all ``[N]`` on the CPU."""

    nearest: Tensor
    ratio: Tensor
    is_own: Tensor
    copies: Tensor


def own_copies(images: Tensor, reference: Tensor, own: Tensor, copy_ratio: float) -> OwnCopies:
    """The check of the module docstring for ``images`` ``[N, ...]`` against ``reference`` ``[K, ...]`` (K >= 2, no
    two identical); ``own`` ``[N]`` is each image's probe's own image in ``reference`` (−1: none)."""
    from ..evaluation import nearest_neighbour_ratio

    nn = nearest_neighbour_ratio(images.reshape(images.shape[0], *reference.shape[1:]).float().cpu(),
                                 reference.float().cpu(), check_unique=False)
    nearest = nn.indices[:, 0]
    is_own = nearest == own.reshape(-1).cpu()
    return OwnCopies(nearest, nn.ratio, is_own, is_own & (nn.ratio < copy_ratio))


def from_rank_zero(context: Any, *values: Tensor) -> tuple[Tensor, ...]:
    """Rank 0's ``values`` on every rank (one broadcast; dtypes and shapes kept; unchanged in one process).
    ``context``: anything with ``num_processes`` and ``device`` (the guard's context)."""
    if context.num_processes <= 1:
        return values
    from accelerate.utils import broadcast

    sizes = [v.numel() for v in values]
    packed = torch.cat([v.reshape(-1).to(torch.float64).cpu() for v in values]).to(context.device)
    packed = broadcast(packed, from_process=0).cpu()
    return tuple(p.reshape(v.shape).to(v.dtype) for p, v in zip(packed.split(sizes), values))
