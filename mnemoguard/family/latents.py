"""The VAE's latent space as the network sees it: ``z = (E(x) − shift) · scale`` and back.

SD 1.x/2.x and SDXL scale only (``scaling_factor`` 0.18215 / 0.13025); SD3 and Flux also shift
(``shift_factor`` 0.0609 / 0.1159), as their pipelines and training scripts do. Pixel-space models (no VAE) see the
images themselves. Encoding for probes and references is deterministic: the posterior *mean*.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LatentCodec"]


class LatentCodec:
    """Images in [-1, 1] <-> the network's sample space (module docstring). ``vae``: an ``AutoencoderKL`` (or None:
    pixel space)."""

    def __init__(self, vae: nn.Module | None = None) -> None:
        self.vae = vae
        config = getattr(vae, "config", None)
        self.scaling_factor = float(getattr(config, "scaling_factor", 1.0) or 1.0) if vae is not None else 1.0
        shift = getattr(config, "shift_factor", None) if vae is not None else None
        self.shift_factor = float(shift) if shift is not None else 0.0

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def scale_factor(self) -> int:
        """Pixels per latent position (``2 ** (len(block_out_channels) − 1)``; 1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int | None:
        return int(self.vae.config.in_channels) if self.vae is not None else None

    def _vae_args(self) -> tuple[Any, torch.dtype]:
        param = next(self.vae.parameters())
        return param.device, param.dtype

    def encode(self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """``[B, C, H, W]`` images in [-1, 1] -> latents (float32): the posterior mean, or a sample (training)."""
        if self.vae is None:
            return pixels.float()
        device, dtype = self._vae_args()
        dist = self.vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).float()

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] (unclipped)."""
        if self.vae is None:
            return z
        device, dtype = self._vae_args()
        return self.vae.decode(z.to(device=device, dtype=dtype) / self.scaling_factor + self.shift_factor).sample

    def __repr__(self) -> str:
        if self.vae is None:
            return "LatentCodec(pixel space)"
        return f"LatentCodec(scaling_factor={self.scaling_factor}, shift_factor={self.shift_factor})"
