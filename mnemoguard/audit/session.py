"""The base model, the training data and the guard an audit measures every checkpoint with, opened once.

The measurement is the live guard's (one implementation): a :class:`~mnemoguard.Guard` on the base model with the
danger-zone tracker at every check, its probes chosen from the training data as in training (exact and
near-duplicate groups first), the held-out images beside them. A checkpoint is put into the base model
(:func:`~mnemoguard.audit.checkpoints.applied`) and the tracker measures it (:meth:`AuditSession.measure`).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config.schema import merge_dicts, parse_overrides
from ..errors import DataError
from ..isolation import eval_mode, preserved_rng_state
from .checkpoints import Checkpoint, applied
from .data import ImageRecord, load_audit_data
from .images import build_image_set, image_scores
from .settings import AuditSettings

__all__ = ["AuditSession", "data_from_metadata"]

SESSION_VERSION = 3  # of what a cached result holds and how it was measured


def data_from_metadata(checkpoints: list[Checkpoint]) -> str | None:
    """The training-data folder a trainer wrote into a LoRA's metadata, when it exists here: kohya's / musubi's
    ``ss_train_data_dir``, else the first existing key of ``ss_dataset_dirs``' parent, else OneTrainer's
    ``ot_config`` concept path."""
    from safetensors import safe_open

    for c in checkpoints:
        if not c.weights.is_file():
            continue
        with safe_open(str(c.weights), "pt") as f:
            meta = f.metadata() or {}
        candidates = [meta.get("ss_train_data_dir")]
        try:
            candidates += [c.get("path") for c in json.loads(meta.get("ot_config", "{}")).get("concepts", [])]
        except (ValueError, AttributeError):
            pass
        for cand in candidates:
            if cand and Path(cand).is_dir():
                return str(cand)
    return None


class AuditSession:
    """The base, data and guard of one audit (module docstring)."""

    def __init__(self, settings: AuditSettings, checkpoints: list[Checkpoint]) -> None:
        from accelerate import Accelerator

        self.settings = s = settings
        device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DataError(f"--device {device}: no CUDA device here; use --device cpu")
        if device.startswith("cuda:"):  # one process: the accelerator takes the current device
            torch.cuda.set_device(int(device.split(":", 1)[1]))
        elif device not in ("cpu", "cuda"):
            raise DataError(f"--device: expected cpu, cuda or cuda:N, found {device!r}")
        self.accelerator = Accelerator(cpu=device == "cpu")
        self.parts, recipe_data = self._open_base(Path(s.out))
        data = s.data or recipe_data.get("source") or data_from_metadata(checkpoints)
        if data is None:
            raise DataError("--data: expected the training images (an imagefolder with metadata.jsonl, a "
                            "save_to_disk folder or kohya's <repeats>_<name>/ folders); none given and the "
                            "checkpoints' metadata names no folder that exists here")
        self.data_source = str(data)
        columns = (recipe_data.get("image_column", s.image_column), recipe_data.get("caption_column",
                                                                                   s.caption_column))
        max_rows = recipe_data.get("max_samples") if not s.data else None
        self.rows, self.records = load_audit_data(data, *columns, max_rows=max_rows)
        self.heldout = None
        if s.heldout:
            from ..data import load_dataset_source

            self.heldout = load_dataset_source(s.heldout)
        dtype = getattr(torch, s.dtype)
        self.parts.model.to(self.accelerator.device, dtype)
        if self.parts.vae is not None:
            self.parts.vae.to(self.accelerator.device, dtype)
        self.resolution = s.resolution or recipe_data.get("resolution") or self.parts.image_size
        self.guard = self._guard()
        start = time.perf_counter()
        self.guard.begin()
        self.tracker = self.guard.components.danger_zone
        self.records, self.groups = self._distinct_images()
        self.image_set = None
        if s.per_image and len(self.records) < 2:
            warnings.warn(f"--data {self.data_source}: one distinct training image; the per-image table compares each "
                          "image with the others and is left out", RuntimeWarning, stacklevel=2)
        elif s.per_image:
            self.image_set = build_image_set(self.guard, self.records, self.groups, self.decision_timesteps(),
                                             s.seed + 21)
        self.setup_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------------------------------------ opening
    def _open_base(self, out: Path) -> tuple[Any, dict[str, Any]]:
        from ..trainer.models import load_components, load_or_build

        base = Path(self.settings.base)
        if base.suffix in (".yaml", ".yml"):
            from ..config import load_config

            if not base.is_file():
                raise DataError(f"--base: no recipe file {str(base)!r}")
            cfg = load_config(str(base), ["model.lora.enabled=false"])
            self.identity = json.dumps(cfg.to_dict()["model"], sort_keys=True, default=str)
            self.family = cfg.model.family or "sd"
            parts = load_or_build(cfg.model, out / ".base")
            d = cfg.data
            return parts, {"source": d.source, "image_column": d.image_column, "caption_column": d.caption_column,
                           "resolution": d.resolution, "max_samples": d.max_samples}
        if not base.is_dir():
            raise DataError(f"--base: expected a diffusers pipeline folder or a recipe .yaml, found {str(base)!r}")
        try:
            parts = load_components(base)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"--base: {err}") from None
        parts.text.freeze()
        if parts.vae is not None:
            parts.vae.requires_grad_(False).eval()
        self.family = parts.family
        files = sorted((p.relative_to(base).as_posix(), p.stat().st_size) for p in base.rglob("*") if p.is_file())
        self.identity = json.dumps({"base": str(base.resolve()), "files": files})
        return parts, {}

    def _guard(self) -> Any:
        from ..family.adapters import model_adapter
        from ..guard import Guard

        s, parts, acc = self.settings, self.parts, self.accelerator
        values = parts.image_channels * self.resolution * self.resolution
        config = merge_dicts(s.guard_config(len(self.rows), values), parse_overrides(s.overrides))
        guidance = {"guidance_scale": parts.extra["guidance_scale"]} if "guidance_scale" in parts.extra else {}
        return Guard(config, accelerator=acc, model=model_adapter(parts.model, **guidance),
                     noise_scheduler=parts.noise_scheduler, train_dataset=self.rows,
                     encode_prompt=lambda caps: parts.encode_prompt(caps, device=acc.device),
                     tokenizer=parts.tokenizer, vae=parts.vae, ema=False, heldout=self.heldout,
                     resolution=self.resolution, log_every=0)

    def _distinct_images(self) -> tuple[list[ImageRecord], list[int]]:
        """The records as distinct images, each with its duplicate group (-1: none): records of one exact-duplicate
        group of the monitor (identical pixels after preprocessing, whatever the file names) are one image whose
        repeats are theirs together; near duplicates stay apart, in one group."""
        spec = self.guard.monitor.spec["image_groups"]
        group_of_row = {int(r): g for g, rows in enumerate(spec["groups"]) for r in rows}
        merged: dict[int, ImageRecord] = {}
        records, groups = [], []
        for rec in self.records:
            found = {group_of_row[r] for r in rec.rows if r in group_of_row}
            g = min(found) if found else -1
            if g >= 0 and spec["exact"][g]:
                if g in merged:
                    merged[g].repeats += rec.repeats
                    merged[g].rows.extend(rec.rows)
                    continue
                rec = merged[g] = ImageRecord(rec.file, rec.caption, rec.repeats, list(rec.rows))
            records.append(rec)
            groups.append(g)
        return records, groups

    def decision_timesteps(self) -> list[float | int]:
        """The tracker's grid timesteps where it decides (σ at or above the data prior's coverage floor); all but
        the t ≈ 0 anchor when none is."""
        _, timesteps, _, sigmas = self.tracker.grid()
        floor = self.tracker.coverage_floor()
        covered = [t for t, s in zip(timesteps, sigmas) if s >= floor and s > 0]
        return covered or timesteps[:-1] or timesteps

    # ------------------------------------------------------------------------------------------------ measuring
    def key(self, checkpoint: Checkpoint) -> str:
        """The cache key of ``checkpoint``'s measurement: its weights' hash, the settings, the base and the data."""
        s = self.settings
        from dataclasses import asdict

        settings = {"version": SESSION_VERSION, "guard": asdict(self.guard.config),  # resolved: defaults included
                    "dtype": s.dtype, "per_image": s.per_image, "resolution": self.resolution,
                    "heldout": s.heldout, "family": self.family}
        data = [(r.file, r.caption, r.repeats) for r in self.records]
        h = hashlib.sha256()
        for part in (checkpoint.fingerprint(), json.dumps(settings, sort_keys=True, default=str), self.identity,
                     json.dumps(data)):
            h.update(part.encode())
        return h.hexdigest()[:32]

    def measure(self, checkpoint: Checkpoint) -> tuple[dict[str, Any], torch.Tensor | None]:
        """``(result, generations)`` of one checkpoint: the tracker's profile and copy rate, the per-image scores;
        the generations as ``[R, C, h, w]`` thumbnails (None without the per-image table)."""
        start = time.perf_counter()
        with applied(checkpoint, self.parts.model, self.family) as fmt:
            t0 = time.perf_counter()
            self.tracker.measure(int(checkpoint.step))
            entry = self.tracker.history.pop()
            dz_seconds = time.perf_counter() - t0
            images = None
            if self.image_set is not None:
                with preserved_rng_state(), eval_mode(self.guard.context.unwrapped_model):
                    images = image_scores(self.guard, self.image_set, self.tracker.config, self.settings.batch_size)
        generations = images.pop("generations") if images is not None else None
        return {
            "step": int(checkpoint.step), "step_source": checkpoint.step_source, "file": str(checkpoint.path),
            "format": fmt, "profile": entry["profile"], "copy_rate": entry["copy_rate"],
            "copy_rate_lower": entry["copy_rate_lower"], "rows": entry["rows"],
            "heldout_copy_rate": entry["heldout_copy_rate"], "images": images,
            "seconds": {"danger_zone": dz_seconds, "total": time.perf_counter() - start},
        }, generations

