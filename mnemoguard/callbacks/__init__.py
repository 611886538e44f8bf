"""Training-time callbacks: the API, the timestep-sampler extension point, and (later) the memorization guard."""

from .base import Callback, CallbackList, TrainerControl, TrainerState
from .early_stopping import EarlyStopping
from .noise_gap import NoiseGapConfig, NoiseGapScheduler
from .policy import MitigationPolicy, Rule
from .timesteps import TimestepSampler, UniformTimestepSampler

__all__ = ["Callback", "CallbackList", "TimestepSampler", "TrainerControl", "TrainerState", "UniformTimestepSampler"]
__all__ += ["EarlyStopping", "MitigationPolicy", "NoiseGapConfig", "NoiseGapScheduler", "Rule"]
