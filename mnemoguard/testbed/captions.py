"""Caption styles of the testbed.

* plain: the class caption, shared by every image of the class ("a handwritten digit seven");
* global (specific): the class caption plus a sample id and a maker, unique per image
  ("a handwritten digit seven, sample 0412 by writer Q"): duplication + specific captions, the main driver of
  copying (Somepalli et al. 2023);
* template: the class caption plus the shared template phrase, optionally with a form id that makes it unique
  ("a handwritten digit seven with the red stamp, form 0412").

Ids are 4-digit numbers drawn without replacement for the whole testbed, so no two specific captions share one.
"""

from __future__ import annotations

import string

import numpy as np

from .config import MAX_CAPTION_IDS

WRITERS = string.ascii_uppercase


def specific_caption(class_caption: str, number: int, maker: str, writer: str) -> str:
    """``"<class caption>, sample <number:04d> by <maker> <writer>"``."""
    return f"{class_caption}, sample {number:04d} by {maker} {writer}"


def template_caption(class_caption: str, phrase: str, number: int | None = None) -> str:
    """``"<class caption> <phrase>"``, plus ``", form <number:04d>"`` when a number is given."""
    caption = f"{class_caption} {phrase.strip()}"
    return caption if number is None else f"{caption}, form {number:04d}"


class CaptionIds:
    """Draws distinct 4-digit ids (and writer letters) from a seeded generator; never hands out an id twice."""

    def __init__(self, rng: np.random.Generator, total: int) -> None:
        if total > MAX_CAPTION_IDS:
            raise ValueError(
                f"the testbed needs {total} specific captions but only {MAX_CAPTION_IDS} distinct 4-digit ids exist; "
                "lower duplicated.num_images, template.num_images, held_out.num_images or the unseen counts"
            )
        self._ids = rng.permutation(MAX_CAPTION_IDS)[:total].tolist()
        self._writers = rng.integers(0, len(WRITERS), size=total).tolist()
        self._next = 0

    def take(self) -> tuple[int, str]:
        """The next ``(id, writer letter)``."""
        if self._next >= len(self._ids):
            raise RuntimeError(f"CaptionIds: all {len(self._ids)} reserved ids are used")
        i = self._next
        self._next += 1
        return int(self._ids[i]), WRITERS[self._writers[i]]
