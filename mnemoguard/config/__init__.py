"""Typed configuration (no torch): the recipe (:mod:`.recipe`), its ``guard:`` section (:mod:`.guard`), the
regularizers' settings (:mod:`.regularizers`) and the strict YAML / dict loader (:mod:`.schema`)."""

from .checks import check_guard_config
from .guard import (
    DashboardConfig,
    DefaultPolicy,
    EarlyStoppingSettings,
    GuardConfig,
    LossFlagsConfig,
    MonitorConfig,
    NoiseGapConfig,
    ReportConfig,
    Rule,
    default_policy,
)
from .recipe import (
    FAMILIES,
    WEIGHTING_SCHEMES,
    DataConfig,
    EMASettings,
    LoggingConfig,
    LoraSettings,
    ModelConfig,
    RecipeConfig,
    TinyModelConfig,
    TrainingConfig,
    ValidationConfig,
    load_config,
)
from .schema import ConfigError, from_dict, load_dataclass, merge_dicts, parse_overrides, read_mapping

__all__ = [
    "FAMILIES", "WEIGHTING_SCHEMES",
    "ConfigError", "DashboardConfig", "DataConfig", "DefaultPolicy", "EMASettings", "EarlyStoppingSettings",
    "GuardConfig", "LoggingConfig", "LoraSettings", "LossFlagsConfig", "ModelConfig", "MonitorConfig",
    "NoiseGapConfig", "RecipeConfig", "ReportConfig", "Rule", "TinyModelConfig", "TrainingConfig",
    "ValidationConfig", "check_guard_config", "default_policy", "from_dict", "load_config", "load_dataclass",
    "merge_dicts", "parse_overrides", "read_mapping",
]
