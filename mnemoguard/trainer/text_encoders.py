"""A family's text side: its encoders and tokenizers, and how they turn one caption into a Conditioning.

===========  ==============================================================================================
family       conditioning (as diffusers' pipelines and training scripts build it)
===========  ==============================================================================================
sd           the text encoder's last hidden states
sdxl         both CLIPs' penultimate hidden states, concatenated; pooled = text_encoder_2's ``text_embeds``
sd3          CLIP-L and CLIP-G penultimate states (concatenated, zero-padded to T5's width) followed by T5's
             states along the sequence; pooled = both CLIPs' ``text_embeds``, concatenated
flux         T5's last hidden states; pooled = CLIP's ``pooler_output``
single       one encoder (the tiny models' MiniLM or tiny CLIP) for any family: its states, pooled = their mean
             over the caption's tokens
===========  ==============================================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..family.conditioning import Conditioning

__all__ = ["TextEncoders"]


def _tokens(tokenizer: Any, captions: Sequence[str], max_length: int | None, device: Any) -> dict[str, Tensor]:
    length = max_length or tokenizer.model_max_length
    tok = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}


def _is_clip(encoder: nn.Module) -> bool:
    return getattr(encoder.config, "model_type", "") in ("clip_text_model", "clip_text_with_projection")


def _run(encoder: nn.Module, tok: dict[str, Tensor], hidden_states: bool = False) -> Any:
    kwargs = {} if _is_clip(encoder) or "attention_mask" not in tok else {"attention_mask": tok["attention_mask"]}
    return encoder(tok["input_ids"], output_hidden_states=hidden_states, **kwargs)


class TextEncoders:
    """The encoders and tokenizers of a family (module docstring) as one ``captions -> Conditioning`` callable.

    Args:
        family: ``sd`` | ``sdxl`` | ``sd3`` | ``flux``.
        encoders, tokenizers: in the pipeline's order (``text_encoder``, ``text_encoder_2``, ...).
        single: one encoder for any family (the tiny models): pooled = the mean of its states.
        max_length: tokens per caption (default: each tokenizer's ``model_max_length``).
    """

    NATIVE = {"sd": 1, "sdxl": 2, "sd3": 3, "flux": 2}
    POOLED = ("sdxl", "sd3", "flux")

    def __init__(self, family: str, encoders: Sequence[nn.Module], tokenizers: Sequence[Any], *,
                 single: bool = False, max_length: int | None = None) -> None:
        want = 1 if single else self.NATIVE[family]
        if len(encoders) != want or len(tokenizers) != want:
            raise ValueError(f"a {family} model {'with one text encoder ' if single else ''}needs {want} text "
                             f"encoder(s) and tokenizer(s); found {len(encoders)} and {len(tokenizers)}")
        self.family, self.single, self.max_length = family, single, max_length
        self.encoders, self.tokenizers = list(encoders), list(tokenizers)

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    def to(self, device: Any, dtype: torch.dtype | None = None) -> TextEncoders:
        for enc in self.encoders:
            enc.to(device, dtype=dtype)
        return self

    def freeze(self) -> TextEncoders:
        for enc in self.encoders:
            enc.requires_grad_(False).eval()
        return self

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], device: Any = None) -> Conditioning:
        """The conditioning of ``captions`` (batched as given; the guard's prompt encoder calls it per caption)."""
        device = device or self.device
        toks = [_tokens(t, captions, self.max_length, self.device) for t in self.tokenizers]
        if self.single:
            out = _run(self.encoders[0], toks[0])[0]
            mask = toks[0].get("attention_mask")
            mask = torch.ones(out.shape[:2], device=out.device) if mask is None else mask.to(out.dtype)
            pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            cond = Conditioning(out, pooled if self.family in self.POOLED else None)
        else:
            cond = getattr(self, f"_{self.family}")(toks)
        return cond.to(device)

    def _sd(self, toks: list[dict[str, Tensor]]) -> Conditioning:
        return Conditioning(_run(self.encoders[0], toks[0])[0])

    def _clip_penultimate(self, k: int, tok: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = _run(self.encoders[k], tok, hidden_states=True)
        return out.hidden_states[-2], out[0]  # states, text_embeds (with projection) / last states

    def _sdxl(self, toks: list[dict[str, Tensor]]) -> Conditioning:
        states_1, _ = self._clip_penultimate(0, toks[0])
        states_2, pooled = self._clip_penultimate(1, toks[1])
        return Conditioning(torch.cat([states_1, states_2], dim=-1), pooled)

    def _sd3(self, toks: list[dict[str, Tensor]]) -> Conditioning:
        states_l, pooled_l = self._clip_penultimate(0, toks[0])
        states_g, pooled_g = self._clip_penultimate(1, toks[1])
        t5 = _run(self.encoders[2], toks[2])[0]
        clip = torch.cat([states_l, states_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1))

    def _flux(self, toks: list[dict[str, Tensor]]) -> Conditioning:
        pooled = _run(self.encoders[0], toks[0]).pooler_output
        return Conditioning(_run(self.encoders[1], toks[1])[0], pooled)
