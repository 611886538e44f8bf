"""The shipped tiny base UNet, and loading any base UNet's weights into the tiny model built from configs.

``builtin:digits16`` is the tiny pixel-space UNet of the demo recipe (16 x 16 x 1, MiniLM captions, 1.16 M
parameters, ~4.6 MB of safetensors) trained by ``scripts/train_base.py`` on the **even-indexed** images of
scikit-learn's digits with their class captions. Fine-tuning from it is the users' situation (a pretrained base,
then their own images): the testbed's fine-tuning variant draws its images from the odd-indexed digits only
(``testbed.source.exclude_base=true``), so its planted and held-out images are new to the base.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["BUILTIN_BASES", "base_training_indices", "load_base_weights", "resolve_base"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_BASES = {"builtin:digits16": ASSETS / "tiny_base_digits16"}


def base_training_indices(num_images: int) -> np.ndarray:
    """Indices (in scikit-learn's digits order) of the images ``builtin:digits16`` was trained on: the even ones."""
    return np.arange(0, num_images, 2)


def resolve_base(base: str | os.PathLike) -> Path:
    """A builtin name or a diffusers UNet folder (``config.json`` + weights) -> the folder; clear error otherwise."""
    key = str(base)
    if key.startswith("builtin:"):
        if key not in BUILTIN_BASES:
            raise ValueError(f"model.tiny.base: unknown builtin {key!r}; available: {sorted(BUILTIN_BASES)}")
        path = BUILTIN_BASES[key]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.tiny.base: {key} is not installed at {path} (run scripts/train_base.py)")
        return path
    path = Path(key)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.tiny.base: expected a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors) "
            f"or one of {sorted(BUILTIN_BASES)}, found {key!r}"
        )
    return path


def load_base_weights(unet: torch.nn.Module, base: str | os.PathLike) -> None:
    """Copy a base UNet's weights into ``unet`` (built from the recipe's tiny config); every tensor must match.

    Raises:
        ValueError: the base was built with another config (the message lists the first mismatches).
    """
    from diffusers import UNet2DConditionModel

    source = UNet2DConditionModel.from_pretrained(resolve_base(base)).state_dict()
    target = unet.state_dict()
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    shapes = [f"{k}: base {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
              for k in target if k in source and source[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        details = shapes[:3] + [f"missing {k}" for k in missing[:3]] + [f"extra {k}" for k in unexpected[:3]]
        details = "; ".join(details)
        raise ValueError(f"model.tiny.base {str(base)!r} does not fit model.tiny's UNet config ({details}); "
                         "use the model.tiny settings the base was trained with")
    unet.load_state_dict(source)
