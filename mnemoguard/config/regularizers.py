"""Settings of every registered regularizer (``guard.regularizers.<name>``), torch-free so a recipe is checked before
anything loads. The regularizers themselves live in :mod:`mnemoguard.callbacks.regularizers`; a regularizer added
with :func:`~mnemoguard.callbacks.regularizers.register_regularizer` registers its config class here too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .schema import ConfigError, from_dict

__all__ = [
    "REGULARIZER_CONFIGS", "AntiGradientControlConfig", "BaselinePreservationConfig", "CaptionDropoutConfig",
    "CaptionOpConfig", "CaptionWordRepetitionConfig", "DuplicateWeightConfig", "GaussianEmbeddingNoiseConfig",
    "MultipleCaptionsConfig", "RandomCaptionReplacementConfig", "RandomTokenAdditionConfig", "RegularizerConfig",
    "WenFilterConfig", "check_regularizer_settings",
]


@dataclass
class RegularizerConfig:
    """Settings every regularizer has."""

    metrics: ClassVar[tuple[str, ...]] = ()  # reg/<name>/<metric> it writes besides reg/<name>/strength

    enabled: bool = True  # on from the start; False: off until activate() (e.g. by the policy)
    strength: float = 1.0  # run-time multiplier of the main parameter (see each regularizer); 0 = no effect
    seed: int = 0  # seed of the regularizer's own generator (mixed with its name and the rank)

    def __post_init__(self) -> None:
        if not self.strength >= 0:
            raise ConfigError(f"strength must be >= 0, found {self.strength}")


@dataclass
class WenFilterConfig(RegularizerConfig):
    """Wen et al.'s filter. ``strength`` divides the threshold (2 = twice as strict)."""

    metrics: ClassVar[tuple[str, ...]] = ("kept_fraction", "gap_mean")

    threshold: float = 2.0  # τ on ||eps_c - eps_u||_2 per sample (--hard_threshold, SD 1.4 at 512 px); 0 drops all
    reference_dim: int | None = None  # None: τ as given; D0: τ·sqrt(D/D0) for D values per sample (16384 = SD 1.4)
    renormalize: bool = True  # loss = mean over the kept samples (the authors' code); False: kept weights unchanged

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold >= 0:
            raise ConfigError(f"threshold must be >= 0, found {self.threshold}")
        if self.reference_dim is not None and self.reference_dim <= 0:
            raise ConfigError(f"reference_dim must be a positive number of values, found {self.reference_dim}")


@dataclass
class AntiGradientControlConfig(RegularizerConfig):
    """IET-AGC's gate. ``strength`` multiplies the running mean in the keep rule (0 keeps all, > 1 drops more); the
    running-mean table and its ``mem_ratio`` / ``beta`` / ``num_buckets`` are the guard's ``loss_flags`` section, so
    the flag rates on the dashboard are what the gate drops."""

    metrics: ClassVar[tuple[str, ...]] = ("kept_fraction",)

    renormalize: bool = True  # loss = mean(l·keep)·B/max(sum(keep), 1), as in the code


@dataclass
class CaptionOpConfig(RegularizerConfig):
    metrics: ClassVar[tuple[str, ...]] = ("changed_fraction",)

    prob: float = 0.1  # per-sample probability (DCR trainspecial_prob); strength multiplies it (capped at 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"prob must be in [0, 1], found {self.prob}")


@dataclass
class RandomCaptionReplacementConfig(CaptionOpConfig):
    num_tokens: int = 4  # random tokens in the replacement caption (DCR: 4)
    vocab_limit: int | None = None  # ids from [0, vocab_limit) (DCR: 49400 for CLIP); None: vocabulary minus specials


@dataclass
class RandomTokenAdditionConfig(CaptionOpConfig):
    num_words: int = 2  # random tokens inserted (DCR train time: 2)
    vocab_limit: int | None = None  # ids from [0, vocab_limit) (DCR: 49400 for CLIP); None: vocabulary minus specials


@dataclass
class CaptionWordRepetitionConfig(CaptionOpConfig):
    num_words: int = 2  # caption words repeated (DCR: 2)


@dataclass
class MultipleCaptionsConfig(CaptionOpConfig):
    prob: float = 1.0  # DCR's allcaps resamples every time
    column: str | None = None  # dataset column holding each row's list of captions (read at train begin)


@dataclass
class CaptionDropoutConfig(CaptionOpConfig):
    prob: float = 0.1  # extra dropout rate on top of training.caption_dropout; strength multiplies it (capped at 1)


@dataclass
class GaussianEmbeddingNoiseConfig(RegularizerConfig):
    metrics: ClassVar[tuple[str, ...]] = ("lam", "noised_fraction")

    lam: float = 0.1  # λ, std of the noise added to the text embeddings (DCR --rand_noise_lam 0.1); strength scales it

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lam >= 0:
            raise ConfigError(f"lam must be >= 0, found {self.lam}")


@dataclass
class BaselinePreservationConfig(RegularizerConfig):
    """Output preservation. ``strength`` multiplies ``weight``."""

    metrics: ClassVar[tuple[str, ...]] = ("mse", "flagged_fraction")

    weight: float = 1.0  # λ of the preservation MSE (ai-toolkit's diff_output_preservation_multiplier default 1.0)
    baseline: Literal["auto", "ema", "adapters_disabled"] = "auto"  # auto: adapters_disabled for a LoRA, else ema

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.weight >= 0:
            raise ConfigError(f"weight must be >= 0, found {self.weight}")


@dataclass
class DuplicateWeightConfig(RegularizerConfig):
    """Duplicate-aware loss weights: a sample's loss times ``m^-strength``, ``m`` the copies of its image in the data
    set (the monitor's duplicate scan, ``guard.monitor.duplicate_scan_rows``); strength 1 weighs a duplicated image as
    one image (deduplication in expectation)."""

    metrics: ClassVar[tuple[str, ...]] = ("weighted_fraction", "mean_weight")


#: registry name -> config class (the callbacks of the same names are in mnemoguard.callbacks.regularizers)
REGULARIZER_CONFIGS: dict[str, type[RegularizerConfig]] = {
    "wen_filter": WenFilterConfig,
    "iet_agc": AntiGradientControlConfig,
    "random_caption_replacement": RandomCaptionReplacementConfig,
    "random_token_addition": RandomTokenAdditionConfig,
    "caption_word_repetition": CaptionWordRepetitionConfig,
    "multiple_captions": MultipleCaptionsConfig,
    "gaussian_embedding_noise": GaussianEmbeddingNoiseConfig,
    "caption_dropout": CaptionDropoutConfig,
    "baseline_preservation": BaselinePreservationConfig,
    "duplicate_weight": DuplicateWeightConfig,
}


def check_regularizer_settings(name: str, settings: dict[str, Any] | None, where: str | None = None) -> Any:
    """The config object of regularizer ``name`` from ``settings``; ConfigError for an unknown name (listing the
    registered ones), an unknown key or a bad value."""
    where = where or f"guard.regularizers.{name}"
    if name not in REGULARIZER_CONFIGS:
        raise ConfigError(f"{where}: unknown regularizer {name!r}; expected one of {sorted(REGULARIZER_CONFIGS)}")
    if settings is not None and not isinstance(settings, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, found {type(settings).__name__}")
    return from_dict(REGULARIZER_CONFIGS[name], dict(settings or {}), where)
