"""Training-time callbacks: the API, the timestep-sampler extension point, and (later) the memorization guard."""

from .base import Callback, CallbackList, TrainerControl, TrainerState
from .timesteps import TimestepSampler, UniformTimestepSampler

__all__ = ["Callback", "CallbackList", "TimestepSampler", "TrainerControl", "TrainerState", "UniformTimestepSampler"]
