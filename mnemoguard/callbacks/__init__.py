"""Training-time callbacks: the API, the timestep-sampler extension point, and (later) the memorization guard."""

from .base import Callback, CallbackList, TrainerControl, TrainerState
from .dashboard import DashboardConfig, TensorBoardDashboard
from .early_stopping import EarlyStopping
from .monitor import MemorizationMonitor, MonitorConfig
from .noise_gap import NoiseGapConfig, NoiseGapScheduler
from .policy import MitigationPolicy, Rule
from .regularizers import (
    REGULARIZERS,
    AntiGradientControl,
    BaselinePreservation,
    CaptionDropout,
    CaptionWordRepetition,
    GaussianEmbeddingNoise,
    MultipleCaptions,
    RandomCaptionReplacement,
    RandomTokenAddition,
    Regularizer,
    WenFilter,
    build_regularizer,
    build_regularizers,
    register_regularizer,
)
from .report import MemorizationReport, ReportConfig, memorization_metadata
from .timesteps import TimestepSampler, UniformTimestepSampler

__all__ = ["Callback", "CallbackList", "TimestepSampler", "TrainerControl", "TrainerState", "UniformTimestepSampler"]
__all__ += ["EarlyStopping", "MitigationPolicy", "NoiseGapConfig", "NoiseGapScheduler", "Rule"]

__all__ += ["REGULARIZERS", "AntiGradientControl", "BaselinePreservation", "CaptionDropout", "CaptionWordRepetition",
            "GaussianEmbeddingNoise", "MultipleCaptions", "RandomCaptionReplacement", "RandomTokenAddition",
            "Regularizer", "WenFilter", "build_regularizer", "build_regularizers", "register_regularizer"]
__all__ += ["DashboardConfig", "MemorizationMonitor", "MemorizationReport", "MonitorConfig", "ReportConfig",
            "TensorBoardDashboard", "memorization_metadata"]
