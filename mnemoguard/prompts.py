"""Caption -> text-embedding encoding that does not depend on the batch a caption came in.

A text encoder's output for one caption is, mathematically, independent of the other captions in its batch, but its
last bits are not: BLAS libraries pick kernels (and reduction orders) by the matrix shapes, so the same caption
encoded in a batch of 7 and in a batch of 32 can differ in the last place, and differently on Intel and AMD CPUs.
A cache filled batch by batch then makes every embedding depend on which batch first encoded its caption: turning
monitoring on (which encodes its probe captions), resuming (which starts from an empty cache) or another rank's data
order change the training run.

:class:`PromptEncoder` removes that dependence by construction: every caption is encoded **alone** (a batch of one,
the canonical layout), so its embedding is a function of the caption only, whoever asks and whenever. Results are
kept in a bounded least-recently-used cache on the CPU (the frozen encoder gives the same answer every time), so a
caption costs one batch-of-one forward the first time it is seen and a copy afterwards.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["PromptEncoder", "tokenize_and_encode"]


@torch.no_grad()
def tokenize_and_encode(text_encoder: Any, tokenizer: Any, captions: Sequence[str], max_length: int | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """Per-token text embeddings ``[B, L, D]`` (the UNet's ``encoder_hidden_states``), as diffusers' scripts make
    them: tokenised to ``max_length`` (default the tokenizer's ``model_max_length``) with padding and truncation; BERT-
    style encoders also get the attention mask."""
    device = device or next(text_encoder.parameters()).device
    length = max_length or tokenizer.model_max_length
    tok = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    kwargs = {}
    if getattr(text_encoder.config, "model_type", "") != "clip_text_model" and "attention_mask" in tok:
        kwargs["attention_mask"] = tok["attention_mask"].to(device)
    return text_encoder(tok["input_ids"].to(device), **kwargs)[0]


class PromptEncoder:
    """Captions -> ``[B, L, D]`` text embeddings, each caption encoded alone and cached (module docstring).

    Args:
        encode: ``fn(list[str]) -> Tensor [n, L, D]``, the raw (batched) encoder; it is only ever called with one
            caption.
        device: where the returned embeddings go (default: where ``encode`` put them).
        dtype: their dtype (default: as encoded), e.g. the mixed-precision weight dtype.
        max_bytes: size of the CPU cache; the least recently used captions are dropped beyond it (0: no cache).
    """

    def __init__(self, encode: Callable[[list[str]], Tensor], *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, max_bytes: int = 512 * 2**20) -> None:
        if not callable(encode):
            raise TypeError(f"PromptEncoder: expected a callable list[str] -> Tensor [n, L, D], found {encode!r}")
        if int(max_bytes) < 0:
            raise ValueError(f"PromptEncoder: max_bytes must be >= 0, found {max_bytes}")
        self.encode = encode
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.max_bytes = int(max_bytes)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._bytes = 0
        self.encoded = 0  # captions encoded (cache misses), for tests and diagnostics

    @classmethod
    def from_text_encoder(cls, text_encoder: Any, tokenizer: Any, max_length: int | None = None,
                          **kwargs: Any) -> PromptEncoder:
        """The encoder of a frozen ``text_encoder`` + ``tokenizer`` (see :func:`tokenize_and_encode`)."""
        return cls(lambda captions: tokenize_and_encode(text_encoder, tokenizer, captions, max_length), **kwargs)

    def _one(self, caption: str) -> Tensor:
        emb = self.encode([caption])
        if not isinstance(emb, Tensor) or emb.ndim != 3 or emb.shape[0] != 1:
            found = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise ValueError(f"encode([caption]) must return a [1, L, D] tensor (the UNet's encoder_hidden_states); "
                             f"found {found}")
        self.encoded += 1
        return emb[0].detach()

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], cache: bool = True) -> Tensor:
        """``[len(captions), L, D]`` on :attr:`device` in :attr:`dtype`; ``cache=False`` for one-off captions (random
        caption edits): encoded alone all the same, but not kept."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"PromptEncoder: expected a list of strings, found {captions!r}")
        if not captions:
            raise ValueError("PromptEncoder: expected at least one caption, found none")
        rows, device = [], self.device
        for caption in captions:
            emb = self._cache.get(caption)
            if emb is None:
                emb = self._one(caption)
                device = device or emb.device
                if cache:
                    self._store(caption, emb)
            else:
                self._cache.move_to_end(caption)
            rows.append(emb)
        device = device or rows[0].device
        return torch.stack([r.to(device=device, dtype=self.dtype or r.dtype) for r in rows])

    def _store(self, caption: str, emb: Tensor) -> None:
        if not self.max_bytes:
            return
        cpu = emb.to("cpu")
        size = cpu.numel() * cpu.element_size()
        if size > self.max_bytes:
            return
        self._cache[caption] = cpu
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()
        self._bytes = 0
