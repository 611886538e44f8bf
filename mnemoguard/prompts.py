"""Caption -> conditioning encoding that does not depend on the batch a caption came in.

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

What is cached is the caption's whole :class:`~mnemoguard.family.conditioning.Conditioning`: token embeddings and, for
SDXL / SD3 / Flux, the pooled embeddings of the same encoders (one, two or three text encoders: the ``encode``
function is the loop's own, e.g. diffusers' ``encode_prompt``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .family.conditioning import Conditioning, as_conditioning

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
    """Captions -> their :class:`~mnemoguard.family.conditioning.Conditioning` (``embeds`` ``[B, L, D]``, ``pooled``),
    each caption encoded alone and cached (module docstring).

    Args:
        encode: ``fn(list[str]) ->`` token embeddings ``[n, L, D]``, an ``(embeds, pooled[, text_ids])`` tuple
            (diffusers' SDXL / SD3 / Flux ``encode_prompt``) or a Conditioning: the raw (batched) encoder; it is only
            ever called with one caption.
        device: where the returned embeddings go (default: where ``encode`` put them).
        dtype: their dtype (default: as encoded), e.g. the mixed-precision weight dtype.
        max_bytes: size of the CPU cache; the least recently used captions are dropped beyond it (0: no cache).
    """

    def __init__(self, encode: Callable[[list[str]], Tensor], *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, max_bytes: int = 512 * 2**20) -> None:
        if not callable(encode):
            raise TypeError(f"PromptEncoder: expected a callable list[str] -> token embeddings [n, L, D] (or an "
                            f"(embeds, pooled) tuple), found {encode!r}")
        if int(max_bytes) < 0:
            raise ValueError(f"PromptEncoder: max_bytes must be >= 0, found {max_bytes}")
        self.encode = encode
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.max_bytes = int(max_bytes)
        self._cache: OrderedDict[str, Conditioning] = OrderedDict()
        self._bytes = 0
        self.encoded = 0  # captions encoded (cache misses), for tests and diagnostics

    @classmethod
    def from_text_encoder(cls, text_encoder: Any, tokenizer: Any, max_length: int | None = None,
                          **kwargs: Any) -> PromptEncoder:
        """The encoder of a frozen ``text_encoder`` + ``tokenizer`` (see :func:`tokenize_and_encode`)."""
        return cls(lambda captions: tokenize_and_encode(text_encoder, tokenizer, captions, max_length), **kwargs)

    def _one(self, caption: str) -> Conditioning:
        out = self.encode([caption])
        try:
            cond = as_conditioning(out, what="encode([caption])")
        except (TypeError, ValueError):
            found = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"encode([caption]) must return [1, L, D] token embeddings (the network's "
                             f"encoder_hidden_states) or an (embeds, pooled) tuple; found {found}") from None
        if len(cond) != 1:
            raise ValueError(f"encode([caption]) must return one row for one caption; found {len(cond)}")
        self.encoded += 1
        return cond.detach()

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], cache: bool = True) -> Conditioning:
        """The conditioning of ``len(captions)`` rows on :attr:`device` in :attr:`dtype`; ``cache=False`` for one-off
        captions (random caption edits): encoded alone all the same, but not kept."""
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
        return Conditioning.cat([r.to(device=device, dtype=self.dtype) for r in rows])

    @staticmethod
    def _size(cond: Conditioning) -> int:
        parts = [cond.embeds, *([cond.pooled] if cond.pooled is not None else []), *cond.extra.values()]
        return sum(p.numel() * p.element_size() for p in parts)

    def _store(self, caption: str, emb: Conditioning) -> None:
        if not self.max_bytes:
            return
        cpu = emb.to("cpu")
        size = self._size(cpu)
        if size > self.max_bytes:
            return
        self._cache[caption] = cpu
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._cache.popitem(last=False)
            self._bytes -= self._size(old)

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()
        self._bytes = 0
