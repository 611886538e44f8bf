"""The guard's components: the callback API, the timestep-sampler extension point, and the memorization guard's
monitor, low-loss flags, policy, noise gap, regularizers, early stopping, dashboard and report."""

from .base import NEEDS, Callback, CallbackList, TrainerControl, TrainerState
from .dashboard import TensorBoardDashboard
from .early_stopping import EarlyStopping
from .monitor import MemorizationMonitor
from .noise_gap import NoiseGapScheduler
from .policy import MitigationPolicy
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
from .regularizers.agc_table import LowLossFlags
from .report import MemorizationReport, memorization_metadata
from .timesteps import DensitySampler, TimestepSampler, TimestepSlot

__all__ = ["NEEDS", "Callback", "CallbackList", "TimestepSampler", "TimestepSlot", "TrainerControl", "TrainerState",
           "DensitySampler"]
__all__ += ["EarlyStopping", "LowLossFlags", "MitigationPolicy", "NoiseGapScheduler"]
__all__ += ["REGULARIZERS", "AntiGradientControl", "BaselinePreservation", "CaptionDropout", "CaptionWordRepetition",
            "GaussianEmbeddingNoise", "MultipleCaptions", "RandomCaptionReplacement", "RandomTokenAddition",
            "Regularizer", "WenFilter", "build_regularizer", "build_regularizers", "register_regularizer"]
__all__ += ["MemorizationMonitor", "MemorizationReport", "TensorBoardDashboard", "memorization_metadata"]
