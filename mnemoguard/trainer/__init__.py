"""The reference trainer: config -> model parts (any family) -> data -> Accelerate loop with the guard, EMA and
checkpoints."""

from .loop import Trainer
from .models import ModelParts, SDComponents, add_lora, build_tiny_components, load_components, load_or_build

__all__ = ["ModelParts", "SDComponents", "Trainer", "add_lora", "build_tiny_components", "load_components",
           "load_or_build"]
