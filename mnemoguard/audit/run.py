"""``mnemoguard audit``: measure every checkpoint (cached), replay the guard's decisions, write the outputs.

Each checkpoint's measurement is written to ``<out>/cache/<key>.json`` (and its generations' thumbnails to
``<key>.safetensors``) as soon as it exists, atomically, keyed by the checkpoint's hash and the settings
(:meth:`~mnemoguard.audit.session.AuditSession.key`): a re-run measures only new checkpoints, and an audit killed
midway loses nothing already measured. A checkpoint that cannot be read is reported in one line and skipped; the
others are still measured.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..serialization import write_atomic
from .checkpoints import AuditError, Checkpoint, find_checkpoints
from .settings import AuditSettings
from .verdict import recommended, replay

logger = logging.getLogger("mnemoguard")

__all__ = ["AuditResult", "Auditor", "run_audit"]

CACHE_DIR = "cache"


@dataclass
class AuditResult:
    """What an audit found: one row per measured checkpoint (step order, with its verdict), the checkpoint to keep,
    the checkpoints that could not be read (``(path, one-line reason)``), the per-image records and groups."""

    rows: list[dict[str, Any]]
    recommended: dict[str, Any] | None
    failed: list[tuple[str, str]]
    records: list[Any]
    groups: list[int]
    generations: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> [R, C, h, w] thumbnails
    prior: dict[str, Any] | None = None
    setup_seconds: float = 0.0
    pixels: torch.Tensor | None = None  # [R, C, h, w] the training images' thumbnails (the gallery)


class Auditor:
    """One audit's session and cache; :meth:`audit` measures checkpoints (only the new ones) and returns the whole
    result. Used by the command and by ``--watch``."""

    def __init__(self, settings: AuditSettings, checkpoints: list[Checkpoint] | None = None) -> None:
        from .session import AuditSession

        self.settings = settings
        self.out = Path(settings.out)
        self.cache = self.out / CACHE_DIR
        found = checkpoints if checkpoints is not None else find_checkpoints(settings.checkpoints)
        self.session = AuditSession(settings, found)
        self.is_main = bool(self.session.accelerator.is_main_process)
        if self.is_main:
            self.cache.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict[str, Any]] = {}  # checkpoint path -> result
        self.generations: dict[str, torch.Tensor] = {}
        self.failed: dict[str, str] = {}

    def _load_cached(self, key: str) -> tuple[dict[str, Any], torch.Tensor | None] | None:
        file = self.cache / f"{key}.json"
        if not file.is_file():
            return None
        try:
            result = json.loads(file.read_text())
        except ValueError:  # a torn write cannot happen (atomic); a hand-edited file is measured again
            return None
        gens = None
        side = self.cache / f"{key}.safetensors"
        if side.is_file():
            from safetensors.torch import load_file

            gens = load_file(str(side))["generations"].float() / 255
        return result, gens

    def _store(self, key: str, result: dict[str, Any], gens: torch.Tensor | None) -> None:
        if not self.is_main:
            return
        if gens is not None:
            from safetensors.torch import save

            u8 = (gens.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
            write_atomic(self.cache / f"{key}.safetensors", save({"generations": u8}))
        write_atomic(self.cache / f"{key}.json", json.dumps(result).encode())

    def measure(self, checkpoint: Checkpoint) -> dict[str, Any] | None:
        """The checkpoint's result (from the cache when measured before); None, with its reason recorded in
        :attr:`failed`, when it cannot be read."""
        name = str(checkpoint.path)
        try:
            key = self.session.key(checkpoint)
            cached = self._load_cached(key)
            if cached is not None:
                result, gens = cached
                result = {**result, "step": int(checkpoint.step), "file": name, "cached": True}
            else:
                result, gens = self.session.measure(checkpoint)
                result["cached"] = False
                self._store(key, result, gens)
        except AuditError as err:
            self.failed[name] = str(err)
            if self.is_main:
                from tqdm.auto import tqdm

                tqdm.write(f"mnemoguard audit: skipped {name}: {err}", file=sys.stderr)  # beside the bar
            return None
        self.failed.pop(name, None)
        self.results[name] = result
        if gens is not None:
            self.generations[name] = gens
        return result

    def audit(self, checkpoints: list[Checkpoint], progress: bool = True) -> AuditResult:
        """Measure ``checkpoints`` (those not measured in this process yet) and return the whole result so far."""
        from tqdm.auto import tqdm

        todo = [c for c in checkpoints if str(c.path) not in self.results]
        bar = tqdm(todo, desc="audit", unit="checkpoint", disable=not (progress and self.is_main and todo))
        for c in bar:
            bar.set_postfix_str(f"step {c.step}")
            self.measure(c)
        return self.result()

    def result(self) -> AuditResult:
        s = self.session
        rows = replay(s.tracker, list(self.results.values()), s.guard.context.num_train_timesteps)
        gens = {r["step"]: self.generations[r["file"]] for r in rows if r["file"] in self.generations}
        return AuditResult(rows, recommended(rows), sorted(self.failed.items()), s.records, s.groups, gens,
                           s.tracker.prior, s.setup_seconds,
                           s.image_set.pixels if s.image_set is not None else None)


def run_audit(settings: AuditSettings, progress: bool = True) -> AuditResult:
    """The whole command: find the checkpoints, measure them, write the outputs (:mod:`.outputs`)."""
    from .outputs import write_outputs

    checkpoints = find_checkpoints(settings.checkpoints)
    auditor = Auditor(settings, checkpoints)
    result = auditor.audit(checkpoints, progress=progress)
    if auditor.is_main:
        write_outputs(result, settings)
    return result
