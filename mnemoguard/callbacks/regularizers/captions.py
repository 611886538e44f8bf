"""Caption and text-embedding randomisation: Somepalli et al. (NeurIPS 2023, "Understanding and Mitigating Copying in
Diffusion Models", code ``somepago/DCR``, ``--trainspecial`` / ``--rand_noise_lam``) and extra caption dropout.

The operations, exactly as in DCR (``datasets.py::__getitem__``, applied per sample with probability
``trainspecial_prob`` = 0.1 unless noted; a draw ``u ~ U[0, 1)`` selects the sample when ``u <= p``):

===============================  =================================================================================
``gaussian_embedding_noise``     GNI: ``enc + λ·randn_like(enc)`` on every sample, every step (λ = 0.1)
``random_caption_replacement``   RC: the caption becomes ``decode(4 random token ids)``
``random_token_addition``        RT: two times, ``decode(1 random token id)`` inserted at a random word position
``caption_word_repetition``      CWR: two times, a word drawn from the caption's own words inserted at a random
                                 word position
``multiple_captions``            MC: the caption is drawn uniformly from all captions of the image (p = 1)
``caption_dropout``              the empty caption with an extra probability, on top of ``training.caption_dropout``
===============================  =================================================================================

"Word" and "word position" are DCR's: ``caption.split(" ")``, insertion at ``randint(0, len(words))`` (both ends
included), ``" ".join``; CWR draws both words from the *original* caption's words. Token ids are drawn from
``[0, vocab_limit)`` (DCR: 49,400 for CLIP's 49,408) or, by default, from the tokenizer's vocabulary minus its special
tokens. Captions the loop already dropped (empty) are left alone by the caption operations (they train the
unconditional branch); GNI applies to every row, as in DCR. Randomness comes only from the regularizer's generator.

The callbacks run in ``on_before_forward``: they replace ``inputs["captions"]`` and re-encode the changed rows of
``inputs["conditioning"]`` whole (token and pooled embeddings; the guard writes them back into the loop's
``encoder_hidden_states`` / ``pooled_projections`` / ``added_cond_kwargs``) through the guard's prompt encoder (each
caption encoded alone; one-off random captions are not cached). Register caption operations *before*
``gaussian_embedding_noise`` (a re-encoded row would lose noise added earlier). ``strength`` multiplies the
probability (capped at 1), or λ for GNI.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...config.regularizers import (
    CaptionDropoutConfig,
    CaptionOpConfig,
    CaptionWordRepetitionConfig,
    GaussianEmbeddingNoiseConfig,
    MultipleCaptionsConfig,
    RandomCaptionReplacementConfig,
    RandomTokenAdditionConfig,
    RegularizerConfig,
)
from ..base import TrainerControl, TrainerState
from .base import Regularizer

__all__ = [
    "CaptionDropout", "CaptionDropoutConfig", "CaptionWordRepetition", "CaptionWordRepetitionConfig",
    "GaussianEmbeddingNoise", "GaussianEmbeddingNoiseConfig", "MultipleCaptions", "MultipleCaptionsConfig",
    "RandomCaptionReplacement", "RandomCaptionReplacementConfig", "RandomTokenAddition", "RandomTokenAdditionConfig",
    "TokenVocab", "caption_dropout", "caption_word_repetition", "gaussian_embedding_noise", "insert_word",
    "multiple_captions", "random_caption_replacement", "random_token_addition",
]


# ---------------------------------------------------------------------------------------------------- pure functions
@dataclass
class TokenVocab:
    """Token ids random tokens are drawn from, and how to turn ids into text."""

    ids: Tensor  # [V] int64 candidate ids
    decode: Callable[[list[int]], str]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, limit: int | None = None) -> TokenVocab:
        """``[0, limit)`` (DCR: 49400 for CLIP), or the whole vocabulary minus the special tokens."""
        if limit is not None:
            ids = torch.arange(int(limit))
        else:
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError(f"no token ids to draw from (limit={limit}, vocabulary of {len(tokenizer)})")
        return cls(ids, lambda toks: tokenizer.decode(toks))

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        pick = torch.randint(0, self.ids.numel(), (n,), generator=generator)
        return self.ids[pick].tolist()


def _selected(n: int, prob: float, generator: torch.Generator, eligible: Sequence[bool] | None) -> list[bool]:
    """One ``u ~ U[0,1)`` per sample (always drawn, so the stream does not depend on the data): ``u <= prob``."""
    u = torch.rand(n, generator=generator).tolist()
    ok = [True] * n if eligible is None else [bool(e) for e in eligible]
    if len(ok) != n:
        raise ValueError(f"eligible must have one entry per caption ({n}), found {len(ok)}")
    return [prob > 0 and ui <= prob and e for ui, e in zip(u, ok)]


def insert_word(sentence: str, word: str, position: int) -> str:
    """DCR's ``insert_rand_word`` with the position given: split on ``" "``, insert at ``position``, join."""
    words = sentence.split(" ")
    if not 0 <= position <= len(words):
        raise ValueError(f"position must be in [0, {len(words)}] for {sentence!r}, found {position}")
    words.insert(position, word)
    return " ".join(words)


def _random_position(sentence: str, generator: torch.Generator) -> int:
    return int(torch.randint(0, len(sentence.split(" ")) + 1, (1,), generator=generator))


def random_caption_replacement(captions: Sequence[str], prob: float, vocab: TokenVocab, generator: torch.Generator,
                               eligible: Sequence[bool] | None = None, num_tokens: int = 4) -> list[str]:
    """RC: with probability ``prob`` a caption becomes ``vocab.decode(num_tokens random ids)`` (DCR ``randrepl``)."""
    out = list(captions)
    for i, sel in enumerate(_selected(len(out), prob, generator, eligible)):
        if sel:
            out[i] = vocab.decode(vocab.sample(num_tokens, generator))
    return out


def random_token_addition(captions: Sequence[str], prob: float, vocab: TokenVocab, generator: torch.Generator,
                          eligible: Sequence[bool] | None = None, num_words: int = 2) -> list[str]:
    """RT: with probability ``prob``, ``num_words`` times: insert ``decode(1 random id)`` at a random word position
    of the current caption (DCR ``randwordadd``)."""
    out = list(captions)
    for i, sel in enumerate(_selected(len(out), prob, generator, eligible)):
        if sel:
            for _ in range(num_words):
                word = vocab.decode(vocab.sample(1, generator))
                out[i] = insert_word(out[i], word, _random_position(out[i], generator))
    return out


def caption_word_repetition(captions: Sequence[str], prob: float, generator: torch.Generator,
                            eligible: Sequence[bool] | None = None, num_words: int = 2) -> list[str]:
    """CWR: with probability ``prob``, ``num_words`` times: a word drawn uniformly from the *original* caption's
    words, inserted at a random word position of the current caption (DCR ``wordrepeat``)."""
    out = list(captions)
    for i, sel in enumerate(_selected(len(out), prob, generator, eligible)):
        if sel:
            words = captions[i].split(" ")
            for _ in range(num_words):
                word = words[int(torch.randint(0, len(words), (1,), generator=generator))]
                out[i] = insert_word(out[i], word, _random_position(out[i], generator))
    return out


def multiple_captions(captions: Sequence[str], alternatives: Sequence[Sequence[str] | None],
                      generator: torch.Generator, prob: float = 1.0,
                      eligible: Sequence[bool] | None = None) -> list[str]:
    """MC: with probability ``prob`` (DCR: always) a caption is drawn uniformly from its image's captions
    ``alternatives[i]`` (DCR ``allcaps``: ``np.random.choice(prompts[image])``); rows without any stay as they are."""
    if len(alternatives) != len(captions):
        raise ValueError(f"alternatives must have one entry per caption ({len(captions)}), found {len(alternatives)}")
    out = list(captions)
    for i, sel in enumerate(_selected(len(out), prob, generator, eligible)):
        pool = alternatives[i]
        if sel and pool:
            out[i] = pool[int(torch.randint(0, len(pool), (1,), generator=generator))]
    return out


def caption_dropout(captions: Sequence[str], rate: float, generator: torch.Generator,
                    eligible: Sequence[bool] | None = None) -> list[str]:
    """Extra caption dropout: with probability ``rate`` a caption becomes ``""`` (train the unconditional branch).
    On top of a first dropout at rate p0 the empty-caption fraction is ``p0 + (1 − p0)·rate``."""
    return ["" if sel else c for c, sel in zip(captions, _selected(len(captions), rate, generator, eligible))]


def gaussian_embedding_noise(embeddings: Tensor, lam: float, generator: torch.Generator,
                             eligible: Tensor | None = None) -> Tensor:
    """GNI: ``enc + λ·ε``, ε ~ N(0, I) of the embeddings' shape, drawn on the CPU from ``generator`` (DCR
    ``--rand_noise_lam``, λ = 0.1). Rows outside ``eligible`` are unchanged (the noise is drawn for all rows)."""
    noise = torch.randn(embeddings.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(device=embeddings.device, dtype=embeddings.dtype)
    if eligible is not None:
        rows = eligible.to(device=embeddings.device, dtype=embeddings.dtype)
        noise = noise * rows.reshape(-1, *[1] * (noise.ndim - 1))
    return embeddings + lam * noise


# ---------------------------------------------------------------------------------------------------- callbacks
class _CaptionOp(Regularizer):
    """Shared ``on_before_forward``: transform the non-empty, in-band captions; re-encode the rows that changed."""

    cache_embeddings = False  # True: a finite set of captions (kept in the prompt encoder's cache); False: one-off
    needs = frozenset({"prompts", "captions"})
    config: CaptionOpConfig

    @property
    def prob(self) -> float:
        """The probability in effect: ``min(1, strength·prob)`` (0 while off)."""
        return min(1.0, self.strength * self.config.prob) if self.active else 0.0

    def transform(self, captions: list[str], eligible: list[bool], inputs: dict, context: Any) -> list[str]:
        raise NotImplementedError

    def on_before_forward(self, state: TrainerState, control: TrainerControl, context: Any = None,
                          inputs: dict | None = None, **kwargs: Any) -> None:
        if not self.active:
            return
        captions = list(inputs["captions"])
        band = self.eligible(inputs["levels"]).tolist()
        eligible = [bool(b) and bool(c) for b, c in zip(band, captions)]
        new = self.transform(captions, eligible, inputs, context)
        changed = [i for i, (a, b) in enumerate(zip(captions, new)) if a != b]
        if changed:  # re-encoded whole: token and pooled embeddings (SDXL / SD3 / Flux) change together
            emb = context.prompts([new[i] for i in changed], cache=self.cache_embeddings)
            inputs["conditioning"] = inputs["conditioning"].replace_rows(changed, emb)
            inputs["captions"] = new
        self._count(changed=len(changed), eligible=sum(eligible))

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        return {"changed_fraction": sums["changed"] / sums["eligible"] if sums.get("eligible") else 0.0}


class _TokenOp(_CaptionOp):
    """A caption operation drawing random tokens: the vocabulary comes from the run's tokenizer."""

    needs = frozenset({"prompts", "captions", "tokenizer"})

    def __init__(self, config: RegularizerConfig | None = None, vocab: TokenVocab | None = None,
                 **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.vocab = vocab

    def _vocab(self, context: Any) -> TokenVocab:
        if self.vocab is None:
            if context is None or context.tokenizer is None:
                raise ValueError(f"{self.name} needs a tokenizer: pass vocab=TokenVocab(...) or Guard(tokenizer=...)")
            self.vocab = TokenVocab.from_tokenizer(context.tokenizer, self.config.vocab_limit)
        return self.vocab


class RandomCaptionReplacement(_TokenOp):
    """RC (Somepalli et al. 2023): see :func:`random_caption_replacement`."""

    name = "random_caption_replacement"
    config_class = RandomCaptionReplacementConfig
    config: RandomCaptionReplacementConfig

    def transform(self, captions: list[str], eligible: list[bool], inputs: dict, context: Any) -> list[str]:
        vocab = self._vocab(context)
        return random_caption_replacement(captions, self.prob, vocab, self.generator, eligible, self.config.num_tokens)


class RandomTokenAddition(_TokenOp):
    """RT (Somepalli et al. 2023): see :func:`random_token_addition`."""

    name = "random_token_addition"
    config_class = RandomTokenAdditionConfig
    config: RandomTokenAdditionConfig

    def transform(self, captions: list[str], eligible: list[bool], inputs: dict, context: Any) -> list[str]:
        vocab = self._vocab(context)
        return random_token_addition(captions, self.prob, vocab, self.generator, eligible, self.config.num_words)


class CaptionWordRepetition(_CaptionOp):
    """CWR (Somepalli et al. 2023): see :func:`caption_word_repetition`."""

    name = "caption_word_repetition"
    config_class = CaptionWordRepetitionConfig
    config: CaptionWordRepetitionConfig

    def transform(self, captions: list[str], eligible: list[bool], inputs: dict, context: Any) -> list[str]:
        return caption_word_repetition(captions, self.prob, self.generator, eligible, self.config.num_words)


class MultipleCaptions(_CaptionOp):
    """MC (Somepalli et al. 2023): see :func:`multiple_captions`.

    The captions of each training row come from ``alternatives`` (a mapping or a function: dataset index → list of
    captions) or from the dataset column ``config.column`` (a list of strings per row). The pool is used as given:
    include the row's own caption in it if it should be drawn too.
    """

    name = "multiple_captions"
    config_class = MultipleCaptionsConfig
    config: MultipleCaptionsConfig
    cache_embeddings = True

    def __init__(self, config: MultipleCaptionsConfig | None = None,
                 alternatives: Mapping[int, Sequence[str]] | Callable[[int], Sequence[str] | None] | None = None,
                 **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if alternatives is None and self.config.column is None:
            raise ValueError("multiple_captions needs the captions of each image: pass alternatives= (index -> list "
                             "of captions) or set column= (a dataset column of caption lists)")
        self.alternatives = alternatives
        self.needs = self.needs | {"indices"} | ({"dataset"} if alternatives is None else set())

    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        super().on_train_begin(state, control, context=context, **kwargs)
        if self.alternatives is None:
            if context is None or context.dataset is None:
                raise ValueError(f"multiple_captions reads column {self.config.column!r} of the training data: "
                                 "expected Guard(train_dataset=...), found none")
            self.alternatives = {i: list(v) if v else [] for i, v in enumerate(context.dataset.column(
                self.config.column))}

    def _pool(self, index: int) -> Sequence[str] | None:
        alt = self.alternatives
        pool = alt(index) if callable(alt) else alt.get(index)
        if pool is not None and (isinstance(pool, str) or not all(isinstance(c, str) for c in pool)):
            raise ValueError(f"multiple_captions: the captions of row {index} must be a list of strings, found "
                             f"{pool!r}")
        return pool

    def transform(self, captions: list[str], eligible: list[bool], inputs: dict, context: Any) -> list[str]:
        pools = [self._pool(int(i)) for i in inputs["indices"].tolist()]
        return multiple_captions(captions, pools, self.generator, self.prob, eligible)


class CaptionDropout(_CaptionOp):
    """Extra caption dropout (classifier-free-guidance dropout raised at run time): see :func:`caption_dropout`."""

    name = "caption_dropout"
    config_class = CaptionDropoutConfig
    config: CaptionDropoutConfig
    cache_embeddings = True

    def transform(self, captions: list[str], eligible: list[bool], inputs: dict, context: Any) -> list[str]:
        return caption_dropout(captions, self.prob, self.generator, eligible)


class GaussianEmbeddingNoise(Regularizer):
    """GNI (Somepalli et al. 2023): see :func:`gaussian_embedding_noise`; λ_eff = strength·λ."""

    name = "gaussian_embedding_noise"
    config_class = GaussianEmbeddingNoiseConfig
    config: GaussianEmbeddingNoiseConfig

    def on_before_forward(self, state: TrainerState, control: TrainerControl, context: Any = None,
                          inputs: dict | None = None, **kwargs: Any) -> None:
        if not self.active:
            return
        eligible = self.eligible(inputs["levels"])
        lam = self.strength * self.config.lam
        cond = inputs["conditioning"]
        inputs["conditioning"] = cond.with_embeds(gaussian_embedding_noise(cond.embeds, lam, self.generator,
                                                                           eligible))
        self._count(noised=int(eligible.sum()), samples=eligible.numel())

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        return {"lam": self.strength * self.config.lam if self.active else 0.0,
                "noised_fraction": sums["noised"] / max(sums["samples"], 1.0)}
