"""A caption's conditioning as one object, whatever the family: token embeddings, pooled embeddings, extras.

=======================  ==========================  ==========================  ==================================
family                   ``embeds`` [B, L, D]        ``pooled`` [B, P]            ``extra``
=======================  ==========================  ==========================  ==================================
SD 1.x/2.x               the text encoder's states   —                           —
SDXL                     both CLIPs' penultimate     text_encoder_2's             ``time_ids`` [B, 6] (size, crop,
                         states, concatenated        ``text_embeds``              target size)
SD3/3.5                  CLIP-L/G + T5 states        both CLIPs' pooled           —
Flux                     T5 states                   CLIP's pooled                —
=======================  ==========================  ==========================  ==================================

The prompt encoder caches one :class:`Conditioning` row per caption; batches are made by :meth:`Conditioning.stack`,
tiled by :meth:`repeat`, split by indexing, joined by :meth:`cat` (the unconditional and conditional halves of one
classifier-free call), and a caption regularizer replaces rows whole (:meth:`replace_rows`), so SDXL's pooled
embeddings never go stale when a caption changes. Only the model adapter knows which keyword each part becomes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Conditioning", "as_conditioning"]


def _rows(value: Tensor, name: str, batch: int) -> None:
    if not isinstance(value, Tensor) or value.ndim < 1 or value.shape[0] != batch:
        found = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"Conditioning.{name}: expected one row per sample ([{batch}, ...]), found {found}")


@dataclass
class Conditioning:
    """Per-sample conditioning of a batch (module docstring). ``embeds`` is ``[B, L, D]``; ``pooled`` ``[B, P]`` or
    None; ``extra`` per-sample tensors ``[B, ...]`` by name (SDXL's ``time_ids``)."""

    embeds: Tensor
    pooled: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.embeds, Tensor) or self.embeds.ndim != 3:
            found = tuple(self.embeds.shape) if isinstance(self.embeds, Tensor) else type(self.embeds).__name__
            raise ValueError(f"Conditioning.embeds: expected token embeddings [B, L, D], found {found}")
        B = self.embeds.shape[0]
        if self.pooled is not None:
            _rows(self.pooled, "pooled", B)
        for name, value in self.extra.items():
            _rows(value, f"extra[{name!r}]", B)

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self)

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def _map(self, fn: Any) -> Conditioning:
        return Conditioning(fn(self.embeds), None if self.pooled is None else fn(self.pooled),
                            {k: fn(v) for k, v in self.extra.items()})

    def __getitem__(self, rows: Any) -> Conditioning:
        """The rows ``rows`` (an index tensor / list, a slice, or an int kept as a batch of one)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        elif isinstance(rows, Tensor):
            rows = rows.to(self.device)
        elif isinstance(rows, Sequence):
            rows = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        return self._map(lambda t: t[rows])

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Conditioning:
        """On ``device``; floating-point parts in ``dtype`` (the model's), integer extras unchanged."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return self._map(move)

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach())

    def repeat(self, k: int) -> Conditioning:
        """The batch tiled ``k`` times as whole blocks (``x.repeat(k, ...)``)."""
        return self._map(lambda t: t.repeat(int(k), *([1] * (t.ndim - 1))))

    def expand(self, n: int, *_: int) -> Conditioning:
        """A batch of one tiled to ``n`` rows (or ``n`` rows kept)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"Conditioning.expand: only a batch of one expands, found {len(self)} rows for {n}")
        return self.repeat(n)

    def tile(self, batch_size: int, name: str = "cond") -> Conditioning:
        """Tiled up to ``batch_size`` rows when its batch divides it (as the denoiser tiles per-sample inputs)."""
        n = len(self)
        if n == batch_size:
            return self
        if n == 0 or batch_size % n:
            raise ValueError(f"{name}: batch size {n} does not divide the batch size of x_t ({batch_size}); expected "
                             f"{batch_size} or a divisor of it")
        return self.repeat(batch_size // n)

    # ------------------------------------------------------------------ batches
    @staticmethod
    def stack(rows: Sequence[Conditioning]) -> Conditioning:
        """One batch from conditionings of equal structure (each row a batch of one or more)."""
        return Conditioning.cat(rows)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch; every part must have the same pieces and per-sample shapes."""
        parts = list(parts)
        if not parts:
            raise ValueError("Conditioning.cat: expected at least one part, found none")
        first = parts[0]
        for p in parts[1:]:
            if (p.pooled is None) != (first.pooled is None) or set(p.extra) != set(first.extra):
                raise ValueError("Conditioning.cat: the parts have different pieces (pooled / extra); encode every "
                                 "caption with the same encoder")
            if p.embeds.shape[1:] != first.embeds.shape[1:]:
                raise ValueError(f"Conditioning.cat: token embeddings of shapes {tuple(first.embeds.shape[1:])} and "
                                 f"{tuple(p.embeds.shape[1:])} cannot share a batch")
        dev, dt = first.embeds.device, first.embeds.dtype
        embeds = torch.cat([p.embeds.to(device=dev, dtype=dt) for p in parts])
        pooled = None if first.pooled is None else torch.cat(
            [p.pooled.to(device=dev, dtype=first.pooled.dtype) for p in parts])
        extra = {k: torch.cat([p.extra[k].to(device=dev, dtype=first.extra[k].dtype) for p in parts])
                 for k in first.extra}
        return Conditioning(embeds, pooled, extra)

    def replace_rows(self, rows: Tensor | Sequence[int], new: Conditioning) -> Conditioning:
        """A copy with ``rows`` replaced by ``new`` (token and pooled embeddings; the extras stay: they describe the
        image, not the caption)."""
        idx = torch.as_tensor(list(rows) if not isinstance(rows, Tensor) else rows, dtype=torch.long,
                              device=self.device)
        embeds = self.embeds.clone()
        embeds[idx] = new.embeds.to(device=embeds.device, dtype=embeds.dtype)
        pooled = self.pooled
        if pooled is not None:
            if new.pooled is None:
                raise ValueError("Conditioning.replace_rows: the new rows have no pooled embeddings")
            pooled = pooled.clone()
            pooled[idx] = new.pooled.to(device=pooled.device, dtype=pooled.dtype)
        return Conditioning(embeds, pooled, dict(self.extra))

    def with_embeds(self, embeds: Tensor) -> Conditioning:
        """The same conditioning with other token embeddings (embedding noise)."""
        return Conditioning(embeds, self.pooled, dict(self.extra))


def as_conditioning(value: Any, *, what: str = "conditioning") -> Conditioning:
    """A :class:`Conditioning` from what an encoder or a loop hands over: a Conditioning, token embeddings
    ``[B, L, D]``, a tuple ``(embeds, pooled[, text_ids])`` (diffusers' SDXL / SD3 / Flux ``encode_prompt``; Flux's
    ``text_ids`` are rebuilt by its adapter), or a mapping with ``embeds`` / ``pooled`` / ``extra``."""
    if isinstance(value, Conditioning):
        return value
    if isinstance(value, Tensor):
        return Conditioning(value)
    if isinstance(value, Mapping):
        unknown = set(value) - {"embeds", "pooled", "extra"}
        if unknown or "embeds" not in value:
            raise ValueError(f"{what}: a mapping needs 'embeds' (and optionally 'pooled', 'extra'); found "
                             f"{sorted(value)}")
        return Conditioning(value["embeds"], value.get("pooled"), dict(value.get("extra") or {}))
    if isinstance(value, (tuple, list)) and 1 <= len(value) <= 3 and all(
            isinstance(v, Tensor) or v is None for v in value):
        pooled = value[1] if len(value) > 1 else None
        return Conditioning(value[0], pooled)
    raise TypeError(f"{what}: expected token embeddings [B, L, D], an (embeds, pooled) tuple or a Conditioning, "
                    f"found {type(value).__name__}")
