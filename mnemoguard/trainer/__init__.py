"""The reference trainer: config -> model parts -> data -> Accelerate loop with EMA, callbacks and checkpoints."""

from .loop import Trainer
from .models import SDComponents, add_lora, build_tiny_components, load_components, load_or_build

__all__ = ["SDComponents", "Trainer", "add_lora", "build_tiny_components", "load_components", "load_or_build"]
