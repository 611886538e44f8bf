"""Pixel operations of the testbed: resize, channels, the constraint border, the template stamp, their masks.

All images are uint8 ``[N, H, W, C]`` arrays (C = 1 or 3). Colours are given as RGB and converted to grayscale with
PIL's ``L`` weights (ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B) when ``C = 1``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import TestbedConfig


class LayoutError(ValueError):
    """The stamp and border do not fit into the image as configured."""


def color_value(rgb: list[int] | tuple[int, ...], channels: int) -> np.ndarray:
    """``[C]`` uint8 pixel value of an RGB colour: itself for C = 3, its PIL luma for C = 1."""
    r, g, b = (int(v) for v in rgb)
    if channels == 3:
        return np.array([r, g, b], dtype=np.uint8)
    return np.array([int(round(0.299 * r + 0.587 * g + 0.114 * b))], dtype=np.uint8)


def resize_gray(images: np.ndarray, resolution: int) -> np.ndarray:
    """``[N, h, w]`` uint8 -> ``[N, resolution, resolution]`` uint8 with PIL bilinear (as ``builtin:digits``)."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, h, w], found {images.dtype} {images.shape}")
    if images.shape[1:] == (resolution, resolution):
        return images.copy()
    size = (resolution, resolution)
    return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR)) for im in images])


def to_channels(gray: np.ndarray, channels: int) -> np.ndarray:
    """``[N, H, W]`` grayscale -> ``[N, H, W, C]`` (C = 3 repeats the gray value)."""
    return np.repeat(gray[..., None], channels, axis=-1)


def stamp_pattern(size: int, ink: np.ndarray, paper: np.ndarray) -> np.ndarray:
    """``[size, size, C]`` concentric square rings, alternating ink (outermost) and paper: a seal-like stamp."""
    i = np.arange(size)
    ring = np.minimum(np.minimum(i[:, None], i[None, :]), np.minimum(size - 1 - i[:, None], size - 1 - i[None, :]))
    return np.where((ring % 2 == 0)[..., None], ink[None, None, :], paper[None, None, :]).astype(np.uint8)


@dataclass(frozen=True)
class Layout:
    """Where the constraint border and the template stamp sit, and what they look like.

    Attributes:
        resolution, channels: image geometry.
        border: constraint border width in pixels (0 = no constraint).
        border_value: ``[C]`` uint8 value of the border.
        stamp_box: ``(top, left, size)`` of the template stamp, or ``None`` when there is no template.
        stamp: ``[size, size, C]`` uint8 stamp pixels, or ``None``.
    """

    resolution: int
    channels: int
    border: int
    border_value: np.ndarray
    stamp_box: tuple[int, int, int] | None
    stamp: np.ndarray | None

    @classmethod
    def from_config(cls, cfg: TestbedConfig) -> Layout:
        """The layout a config asks for; raises :class:`LayoutError` when the stamp does not fit."""
        res, ch = cfg.resolution, cfg.channels
        border = cfg.constraint.width if cfg.constraint.enabled else 0
        if border and 2 * border >= res:
            raise LayoutError(f"constraint.width={border} leaves no interior in a {res}x{res} image")
        stamp_box, stamp = None, None
        if cfg.template.enabled:
            t = cfg.template
            size = t.size if t.size is not None else max(2, res // 4)
            inner = res - 2 * border
            if size + t.margin > inner:
                raise LayoutError(
                    f"template stamp of {size}px with margin {t.margin}px must fit inside the {inner}px interior "
                    f"of a {res}px image with a {border}px border; found {size + t.margin}px > {inner}px"
                )
            near, far = border + t.margin, res - border - t.margin - size
            top = near if t.corner.startswith("top") else far
            left = near if t.corner.endswith("left") else far
            stamp_box = (top, left, size)
            stamp = stamp_pattern(size, color_value(t.ink, ch), color_value(t.paper, ch))
        return cls(res, ch, border, color_value(cfg.constraint.color, ch), stamp_box, stamp)

    # ------------------------------------------------------------------------------------------- masks
    def constraint_mask(self) -> np.ndarray:
        """``[H, W]`` bool: the border that is constant in every image (all False without a constraint)."""
        mask = np.zeros((self.resolution, self.resolution), dtype=bool)
        if self.border:
            b = self.border
            mask[:b, :] = mask[-b:, :] = mask[:, :b] = mask[:, -b:] = True
        return mask

    def template_mask(self) -> np.ndarray:
        """``[H, W]`` bool: the stamp's square (all False without a template)."""
        mask = np.zeros((self.resolution, self.resolution), dtype=bool)
        if self.stamp_box is not None:
            top, left, size = self.stamp_box
            mask[top : top + size, left : left + size] = True
        return mask

    def stamp_reference(self) -> np.ndarray:
        """``[H, W, C]`` uint8: the stamp in place, zeros elsewhere (the template for ``template_verbatim``)."""
        out = np.zeros((self.resolution, self.resolution, self.channels), dtype=np.uint8)
        if self.stamp_box is not None:
            top, left, size = self.stamp_box
            out[top : top + size, left : left + size] = self.stamp
        return out

    # ------------------------------------------------------------------------------------------- painting
    def apply_constraint(self, images: np.ndarray) -> np.ndarray:
        """Paint the border into ``[N, H, W, C]`` images (a copy)."""
        out = images.copy()
        out[:, self.constraint_mask()] = self.border_value
        return out

    def apply_stamp(self, images: np.ndarray) -> np.ndarray:
        """Paste the stamp into ``[N, H, W, C]`` images (a copy)."""
        if self.stamp_box is None:
            raise LayoutError("no template stamp is configured (template.enabled is false)")
        out = images.copy()
        top, left, size = self.stamp_box
        out[:, top : top + size, left : left + size] = self.stamp
        return out

    def content_keys(self, images: np.ndarray) -> list[bytes]:
        """Hash of each image outside the border and stamp squares: equal keys = equal after planting."""
        free = ~(self.constraint_mask() | self.template_mask())
        return [hashlib.blake2b(im[free].tobytes(), digest_size=16).digest() for im in images]


def unique_first(keys: list[bytes]) -> np.ndarray:
    """Indices of the first occurrence of each key, in order."""
    seen: set[bytes] = set()
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)
