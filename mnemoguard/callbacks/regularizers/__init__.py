"""Training-time memorization regularizers: a registry of small pure functions, each behind a switchable callback.

============================== ======================================================= ============================
registry name                  operation                                               source
============================== ======================================================= ============================
``wen_filter``                 drop samples with ‖ε_c − ε_∅‖ ≥ τ (+1 no-grad forward)  Wen et al., ICLR 2024
``iet_agc``                    drop samples with an abnormally low loss for their t    Liu et al. (IET-AGC), ECCV'24
``random_caption_replacement`` caption → 4 random tokens (p = 0.1)                     Somepalli et al., NeurIPS'23
``random_token_addition``      insert 2 random tokens (p = 0.1)                        Somepalli et al., NeurIPS'23
``caption_word_repetition``    insert 2 of the caption's words (p = 0.1)               Somepalli et al., NeurIPS'23
``multiple_captions``          caption drawn from the image's captions                 Somepalli et al., NeurIPS'23
``gaussian_embedding_noise``   text embedding + 0.1·N(0, I)                            Somepalli et al., NeurIPS'23
``caption_dropout``            extra empty-caption dropout                             classifier-free guidance
``baseline_preservation``      + λ·MSE(live, EMA or LoRA base) on flagged samples      ai-toolkit DOP
``duplicate_weight``           loss × 1/copies of the sample's image                   Carlini et al.; Somepalli et al.
============================== ======================================================= ============================

Every class has ``enabled`` / ``strength`` / ``band`` switched at run time by ``activate(strength, band)`` /
``deactivate()`` (the Guard's builder registers each as the policy's action of its registry name), a typed config
dataclass (:mod:`mnemoguard.config.regularizers`, torch-free), ``needs`` (checked when the Guard is built),
``state_dict`` / ``load_state_dict``, and ``reg/<name>/...`` metrics.
Order in the callback list: caption operations, then ``gaussian_embedding_noise``; the loss-side ones in any order
(dropping filters compose; see :func:`~mnemoguard.callbacks.regularizers.base.drop_samples`).
"""

from __future__ import annotations

from typing import Any

from ...config.regularizers import REGULARIZER_CONFIGS, RegularizerConfig, check_regularizer_settings
from .agc import AntiGradientControl
from .agc_table import agc_keep, agc_update, timestep_buckets
from .base import Regularizer, drop_samples, timestep_mask
from .captions import (
    CaptionDropout,
    CaptionWordRepetition,
    GaussianEmbeddingNoise,
    MultipleCaptions,
    RandomCaptionReplacement,
    RandomTokenAddition,
    TokenVocab,
    caption_dropout,
    caption_word_repetition,
    gaussian_embedding_noise,
    insert_word,
    multiple_captions,
    random_caption_replacement,
    random_token_addition,
)
from .duplicates import DuplicateWeight, duplicate_weights
from .preservation import BaselinePreservation, preservation_loss
from .wen import WenFilter, wen_filter_weights, wen_threshold

REGULARIZERS: dict[str, type[Regularizer]] = {}


def register_regularizer(cls: type[Regularizer]) -> type[Regularizer]:
    """Add a :class:`Regularizer` subclass to :data:`REGULARIZERS` (and its config class to
    :data:`~mnemoguard.config.regularizers.REGULARIZER_CONFIGS`, so recipes can name it) under its ``name``;
    usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)) or not cls.name:
        raise TypeError(f"expected a Regularizer subclass with a name, found {cls!r}")
    if REGULARIZERS.get(cls.name, cls) is not cls:
        raise ValueError(f"a regularizer named {cls.name!r} is already registered ({REGULARIZERS[cls.name].__name__})")
    REGULARIZERS[cls.name] = cls
    REGULARIZER_CONFIGS[cls.name] = cls.config_class
    return cls


for _cls in (WenFilter, AntiGradientControl, RandomCaptionReplacement, RandomTokenAddition, CaptionWordRepetition,
             MultipleCaptions, GaussianEmbeddingNoise, CaptionDropout, BaselinePreservation, DuplicateWeight):
    register_regularizer(_cls)

#: the order :func:`build_regularizers` puts them in (caption edits before embedding noise)
ORDER = ("caption_dropout", "multiple_captions", "random_caption_replacement", "random_token_addition",
         "caption_word_repetition", "gaussian_embedding_noise", "wen_filter", "iet_agc", "baseline_preservation",
         "duplicate_weight")


def build_regularizer(name: str, config: dict[str, Any] | RegularizerConfig | None = None,
                      **kwargs: Any) -> Regularizer:
    """``REGULARIZERS[name](its config from config, **kwargs)``; ``kwargs`` are the class's other arguments
    (``alternatives=`` for ``multiple_captions``, ``baseline=`` / ``flagged=`` for ``baseline_preservation`` ...).
    An unknown name or setting is a :class:`~mnemoguard.config.ConfigError` naming the valid ones."""
    if not isinstance(config, RegularizerConfig):
        config = check_regularizer_settings(name, config)
    if name not in REGULARIZERS:
        raise KeyError(f"regularizer {name!r} has settings but no class; registered: {sorted(REGULARIZERS)}")
    return REGULARIZERS[name](config, **kwargs)


def build_regularizers(configs: dict[str, dict[str, Any] | None],
                       **kwargs_by_name: dict[str, Any]) -> list[Regularizer]:
    """Several regularizers from ``{name: config}``, in :data:`ORDER` (then any others in the given order)."""
    names = sorted(configs, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    return [build_regularizer(n, configs[n], **kwargs_by_name.get(n, {})) for n in names]


__all__ = [
    "ORDER", "REGULARIZERS", "AntiGradientControl", "BaselinePreservation", "CaptionDropout", "CaptionWordRepetition",
    "DuplicateWeight", "GaussianEmbeddingNoise", "MultipleCaptions", "RandomCaptionReplacement",
    "RandomTokenAddition", "Regularizer", "RegularizerConfig", "TokenVocab", "WenFilter", "agc_keep", "agc_update",
    "build_regularizer", "build_regularizers", "caption_dropout", "caption_word_repetition", "drop_samples",
    "duplicate_weights", "gaussian_embedding_noise", "insert_word", "multiple_captions", "preservation_loss",
    "random_caption_replacement", "random_token_addition", "register_regularizer", "timestep_buckets",
    "timestep_mask", "wen_filter_weights", "wen_threshold",
]
