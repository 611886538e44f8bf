"""MemorizationMonitor: memorization signals on a fixed probe set, every N optimizer steps, band by band.

**Probe set** (chosen once in ``on_train_begin`` from the monitor's own seeded generator, kept in ``state_dict``):

- *duplicate* probes: training rows whose caption is repeated verbatim elsewhere in ``trainer.dataset`` (the pairs
  most at risk of being memorized, Somepalli et al. 2023, Carlini et al. 2023), one row per duplicated caption, the
  most repeated captions first;
- *random* probes: further training rows drawn uniformly;
- *held-out* probes: ``heldout_captions`` from the config (unseen captions in the training style), else rows of the
  held-out samples (image + caption, never trained: ``heldout_data`` in the config, or ``heldout=`` passed to the
  constructor), else none. Unseen captions have no image: probe ``h`` is evaluated at exactly the noisy inputs
  (image, noise, timestep) of training probe ``h mod P``, so the train / held-out contrast differs only in the
  caption — which confounds it when the unseen captions name other content than the probe images (measured on the
  testbed, BENCHMARKS.md). Held-out samples make the contrast a generalization gap on images never trained on.

Each probe gets, per timestep band (default: the low / mid / high thirds of the schedule, overridable as
``[t_lo, t_hi)`` ranges), ``draws_per_band`` fixed timesteps and fixed Gaussian noise. Images are taken in their
canonical view (centre crop, no flip) and encoded with the VAE posterior mean, so no probe input depends on any RNG
but the monitor's own.

**Every ``every_n_steps`` optimizer steps** (a *check*), with the global RNG state saved and restored (torch CPU and
CUDA, numpy, ``random``) and the UNet in eval mode (every submodule's flag restored afterwards), under ``no_grad``:

==================  =====================================================================  ========================
signal (tag name)   per probe row, at ``x_t = α_t x_0 + σ_t ε`` (fixed ε, t)               cost
==================  =====================================================================  ========================
``live_vs_<base>``  ``‖ε_live(x_t, t, c) − ε_base(x_t, t, c)‖₂`` (``live_baseline_gap``)    1 baseline pass
``wen_gap``         ``‖ε(x_t, t, c) − ε(x_t, t, ∅)‖₂`` (``wen_norm``)                      1 CFG call (2 passes)
``anisotropy``      channel cosine of ε_∅ and ε_c − ε_∅ (``anisotropy_cosine``)            free (same CFG call)
``probe_loss``      the denoising loss ``mean (pred − target)²`` at the fixed noise        free (same CFG call)
==================  =====================================================================  ========================

``<base>`` is the baseline (``mnemoguard.baselines``): ``ema`` (default; the trainer's EMA), ``snapshot`` (a ring
entry of the EMA), ``lora_off`` (adapters disabled), ``uncond`` (then it equals ``wen_gap`` and costs nothing) or
``checkpoint`` (an earlier LoRA file or diffusers ``unet/`` folder). Per-row values are averaged over the draws of a
probe, then per band and split:

- ``mem/<signal>/band=<name>/train`` and ``.../heldout``: the mean over probes, ``..._std`` their spread;
- ``mem/<signal>/band=<name>/contrast``: train mean − held-out mean, oriented so that *positive = the training
  probes look more memorized* (for ``probe_loss`` it is held-out − train: memorized rows have a lower loss).

Bands are never averaged together. The probe rows are split across ranks (each computes its share, padded to equal
size so every rank makes the same calls), and the per-row values are gathered, so every rank holds all values and
takes the same decisions. Values follow the metrics contract (``state.update_metrics``, ``logs``,
``control.should_log``); per-probe values are kept in :attr:`MemorizationMonitor.history` for histograms and the
report.

**Every ``curvature_every_k_checks``-th check**, for the first ``curvature_num_probes`` training probes: a
generation from the probe caption (DDIM from fixed initial noise, so successive checks are comparable), its nearest
image in a pool of training images (the probes plus ``nearest_pool_size`` random rows) with Gu et al.'s distance
ratio ``d1/d2``, and Kim & Lee's curvature-difference map ``Δh`` (``curvature_diff_map``, live vs baseline, fixed
Rademacher probes) at the generated sample re-noised to ``curvature_timestep``. Scalars: ``mem/nn_ratio/train`` and
``mem/curvature_diff/t=<t>/train`` (means over those probes); the images and maps are kept in
:attr:`MemorizationMonitor.latest_visuals` for the dashboard and the report (not in the checkpoint).

**At every micro-step, no extra forward pass** (``on_loss``, after IET-AGC, Liu et al. ECCV 2024): a running mean of
the training loss per timestep bucket (``loss_buckets`` buckets, EMA decay ``loss_ema_decay``) and a flag for every
sample whose loss is abnormally low, ``loss · loss_flag_ratio < running mean of its bucket``. Two deviations from
their code: a bucket starts at its first observation instead of 0 and flags only after ``loss_min_count``
observations; samples trained on the empty caption (caption dropout) are left out. Per-sample flag counts are kept by
dataset index (an index of -1, a row whose dataset position the loop does not know, counts towards the rates only);
logged at every log step: ``mem/agc/flag_rate/band=<name>`` (flagged fraction since the last log) and
``mem/agc/flagged_samples`` (distinct samples flagged so far). Values are gathered across ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .base import Callback, TrainerControl, TrainerState

logger = logging.getLogger("mnemoguard")

SIGNALS = ("live_vs_baseline", "wen_gap", "anisotropy", "probe_loss")
BASELINES = ("ema", "snapshot", "lora_off", "uncond", "checkpoint")
# +1: larger on training probes = more memorized; -1: smaller (the loss).
_ORIENTATION = {"live_vs_baseline": 1.0, "wen_gap": 1.0, "anisotropy": 1.0, "probe_loss": -1.0}


@dataclass
class MonitorConfig:
    """Settings of :class:`MemorizationMonitor` (the ``guard.monitor`` section of a recipe)."""

    every_n_steps: int = 100  # optimizer steps between checks
    num_duplicate_probes: int = 4  # training rows with verbatim-repeated captions, most repeated first
    num_random_probes: int = 4  # further training rows drawn uniformly
    num_heldout_probes: int = 4  # from heldout_captions, else from the held-out samples given to the monitor
    heldout_captions: list[str] = field(default_factory=list)  # unseen captions in the training style
    heldout_data: str | None = None  # held-out samples (image + caption, never trained): an imagefolder with
    # metadata.jsonl or a save_to_disk dir; the train/held-out contrast is then a generalization gap on other images
    bands: list[tuple[int, int]] | None = None  # [t_lo, t_hi) timestep bands; None: thirds of the schedule
    band_names: list[str] | None = None  # one per band; None: low/mid/high for three bands, else "t<lo>-<hi>"
    draws_per_band: int = 1  # fixed (timestep, noise) draws per probe and band
    baseline: Literal["ema", "snapshot", "lora_off", "uncond", "checkpoint"] = "ema"  # the less-trained model
    baseline_snapshot: int = 0  # EMA snapshot ring index for baseline="snapshot" (0 = oldest, -1 = newest)
    baseline_checkpoint: str | None = None  # LoRA file / folder or diffusers unet folder for baseline="checkpoint"
    score_space: bool = False  # divide live-vs-baseline gaps by sigma_t (score-space gaps)
    signals: list[str] = field(default_factory=lambda: list(SIGNALS))  # which of SIGNALS to compute
    batch_size: int = 16  # probe rows per UNet call
    seed: int = 1234  # the monitor's own generator (probes, noise, timesteps, Hutchinson probes)
    curvature_every_k_checks: int = 5  # generations + curvature maps every k-th check (0 = never)
    curvature_num_probes: int = 2  # training probes (duplicates first) that get a generation and a map
    curvature_hutchinson_probes: int = 8  # Rademacher probes per map (Kim & Lee use 16)
    curvature_timestep: int = 1  # where the map is taken (Kim & Lee: the last DDIM step, t = 1)
    generation_steps: int = 10  # DDIM steps of the probe generations
    generation_guidance_scale: float | None = None  # None: the recipe's validation.guidance_scale
    nearest_pool_size: int = 64  # random training images besides the probes in the nearest-neighbour pool
    loss_buckets: int = 20  # per-step loss: timestep buckets of the running mean
    loss_ema_decay: float = 0.8  # per-step loss: EMA decay of a bucket's mean (IET-AGC arr_ema_decay)
    loss_flag_ratio: float = 1.25  # flag a sample when loss * ratio < its bucket's mean (IET-AGC SD mem_ratio)
    loss_min_count: int = 5  # observations a bucket needs before it can flag


# ------------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Save the global RNG states (torch CPU, every initialised CUDA device, numpy, ``random``) and put them back on
    exit, also on exceptions: whatever runs inside cannot change the training trajectory through the RNG."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module.eval()`` for the block; every submodule gets its own ``training`` flag back on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def default_bands(num_train_timesteps: int) -> list[tuple[int, int]]:
    """Low / medium / high noise: the thirds of ``[0, T)``."""
    T = int(num_train_timesteps)
    return [(0, T // 3), (T // 3, 2 * T // 3), (2 * T // 3, T)]


def duplicated_caption_rows(captions: Sequence[str]) -> list[tuple[int, int]]:
    """``(first row, count)`` for every caption that occurs more than once, most repeated first (ties: earliest)."""
    counts = Counter(captions)
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    dups = [(first[c], n) for c, n in counts.items() if n > 1 and isinstance(c, str) and c.strip()]
    return sorted(dups, key=lambda fc: (-fc[1], fc[0]))


def _encode(components: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the UNet's input space; the VAE posterior *mean* (no sampling, no RNG)."""
    vae = getattr(components, "vae", None)
    if vae is None:
        return pixels.float()
    dist = vae.encode(pixels.to(device=next(vae.parameters()).device, dtype=vae.dtype)).latent_dist
    return (dist.mode() * vae.config.scaling_factor).float()


def _to_pixels(image: Any, resolution: int, channels: int) -> torch.Tensor:
    """A held-out image (PIL, a ``datasets`` image cell, or a ``[C, H, W]`` tensor in [-1, 1]) -> ``[C, H, W]``."""
    from ..trainer.data import decode_image, preprocess_image

    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != channels or tuple(image.shape[1:]) != (resolution, resolution):
            raise ValueError(f"held-out image tensors must be [{channels}, {resolution}, {resolution}] in [-1, 1], "
                             f"found shape {tuple(image.shape)}")
        return image.float()
    return preprocess_image(decode_image(image), resolution, channels, center_crop=True, flip=False)


class MemorizationMonitor(Callback):
    """Memorization signals on a fixed probe set during fine-tuning (see the module docstring).

    Args:
        config: the settings; keyword arguments override its fields
            (``MemorizationMonitor(every_n_steps=50, baseline="lora_off")``).
        heldout: held-out samples with images, used when ``config.heldout_captions`` is empty: a ``datasets.Dataset``
            with the recipe's image / caption columns, or a sequence of ``(image, caption)`` pairs or
            ``{"image": ..., "text": ...}`` dicts (PIL images, ``datasets`` image cells, or ``[C, H, W]`` tensors in
            [-1, 1] at the training resolution).

    Attributes:
        history: one dict per check, ``{"step", "metrics": {tag: float}, "per_probe": {signal: {band: {split:
            [float per probe]}}}}`` (plus ``"visual"`` at curvature checks: per generated probe, its id, ``nn_ratio``,
            ``nearest_is_own``, ``curvature``).
        latest_visuals: the last generations / nearest images / curvature maps (CPU tensors) or None.
        flag_counts: dataset index -> number of times the per-step loss flagged that sample.
        seconds: wall time spent in this callback's hooks, ``{"setup", "per_step", "checks"}`` (kept in the state:
            a resumed run keeps counting), for the monitoring overhead.
    """

    def __init__(self, config: MonitorConfig | None = None, heldout: Any = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or MonitorConfig(), **overrides)
        self._validate_config()
        if self.config.heldout_data and (heldout is not None or self.config.heldout_captions):
            raise ValueError("MemorizationMonitor: give one source of held-out probes — heldout_captions, "
                             f"heldout_data or heldout= — found heldout_data={self.config.heldout_data!r} and another")
        if self.config.heldout_data:
            from ..trainer.data import load_dataset_source

            heldout = load_dataset_source(self.config.heldout_data)
        self.heldout = heldout
        self.spec: dict[str, Any] | None = None
        self.num_checks = 0
        self.history: list[dict[str, Any]] = []
        self.latest_visuals: dict[str, Any] | None = None
        self.flag_counts: dict[int, int] = {}
        self.agc_mean: list[float] | None = None
        self.agc_count: list[int] | None = None
        self._window: list[list[int]] | None = None  # per band [flagged, seen] since the last log
        self._trainer: Any = None
        self._tensors: dict[str, Any] | None = None
        self._baseline: Any = None
        self._denoiser: Any = None
        self._warned: set[str] = set()
        self.seconds = {"setup": 0.0, "per_step": 0.0, "checks": 0.0}  # wall time in this callback's hooks

    # ------------------------------------------------------------------------------------------------ config
    def _validate_config(self) -> None:
        c = self.config
        unknown = [s for s in c.signals if s not in SIGNALS]
        if unknown or not c.signals:
            raise ValueError(f"MonitorConfig.signals: expected a non-empty subset of {SIGNALS}, found {c.signals}")
        if c.baseline not in BASELINES:
            raise ValueError(f"MonitorConfig.baseline: expected one of {BASELINES}, found {c.baseline!r}")
        if c.baseline == "checkpoint" and not c.baseline_checkpoint:
            raise ValueError("MonitorConfig.baseline='checkpoint' needs baseline_checkpoint (a path); found None")
        for name in ("every_n_steps", "draws_per_band", "batch_size", "loss_buckets"):
            if int(getattr(c, name)) < 1:
                raise ValueError(f"MonitorConfig.{name} must be >= 1, found {getattr(c, name)}")
        for name in ("num_duplicate_probes", "num_random_probes", "num_heldout_probes", "curvature_every_k_checks",
                     "curvature_num_probes", "nearest_pool_size", "loss_min_count"):
            if int(getattr(c, name)) < 0:
                raise ValueError(f"MonitorConfig.{name} must be >= 0, found {getattr(c, name)}")
        if c.num_duplicate_probes + c.num_random_probes < 1:
            raise ValueError("MonitorConfig: num_duplicate_probes + num_random_probes must be >= 1 (no training "
                             "probe to watch); found 0")
        if not 0.0 <= c.loss_ema_decay < 1.0:
            raise ValueError(f"MonitorConfig.loss_ema_decay must be in [0, 1), found {c.loss_ema_decay}")
        if c.loss_flag_ratio <= 0:
            raise ValueError(f"MonitorConfig.loss_flag_ratio must be > 0, found {c.loss_flag_ratio}")
        if c.bands is not None:
            if not c.bands:
                raise ValueError("MonitorConfig.bands: expected at least one [t_lo, t_hi) band or None, found []")
            for band in c.bands:
                if len(band) != 2 or not 0 <= band[0] < band[1]:
                    raise ValueError(f"MonitorConfig.bands: a band is [t_lo, t_hi) with 0 <= t_lo < t_hi, found "
                                     f"{list(band)}")
        if c.band_names is not None:
            n = len(c.bands) if c.bands is not None else 3
            if len(c.band_names) != n or len(set(c.band_names)) != n:
                raise ValueError(f"MonitorConfig.band_names: expected {n} distinct names (one per band), found "
                                 f"{c.band_names}")

    @property
    def baseline_name(self) -> str:
        """The tag name of the live-vs-baseline signal, e.g. ``live_vs_ema``."""
        return f"live_vs_{self.config.baseline}"

    def signal_tag(self, signal: str) -> str:
        """Tag name of a signal (``live_vs_baseline`` becomes ``live_vs_<baseline>``)."""
        return self.baseline_name if signal == "live_vs_baseline" else signal

    @property
    def signal_names(self) -> list[str]:
        """Tag names of the configured signals, in order."""
        return [self.signal_tag(s) for s in self.config.signals]

    def _resolve_bands(self, num_train_timesteps: int, check: bool = True) -> dict[str, tuple[int, int]]:
        c = self.config
        bands = [tuple(b) for b in c.bands] if c.bands is not None else default_bands(num_train_timesteps)
        for lo, hi in bands:
            if check and hi > num_train_timesteps:
                raise ValueError(f"MonitorConfig.bands: [{lo}, {hi}) goes past the schedule's {num_train_timesteps} "
                                 "timesteps")
        if c.band_names is not None:
            names = list(c.band_names)
        elif len(bands) == 3:
            names = ["low", "mid", "high"]
        else:
            names = [f"t{lo}-{hi}" for lo, hi in bands]
        return {n: (int(lo), int(hi)) for n, (lo, hi) in zip(names, bands)}

    @property
    def bands(self) -> dict[str, tuple[int, int]]:
        """Band name -> ``(t_lo, t_hi)`` (resolved at train start; from the config or the defaults before)."""
        if self.spec is not None:
            return {k: tuple(v) for k, v in self.spec["bands"].items()}
        return self._resolve_bands(1000, check=False)

    @property
    def has_heldout(self) -> bool:
        if self.spec is not None:
            return bool(self.spec["heldout_source"])
        return self.config.num_heldout_probes > 0 and bool(self.config.heldout_captions or self.heldout is not None)

    @property
    def splits(self) -> list[str]:
        return ["train", "heldout"] if self.has_heldout else ["train"]

    def metric_tags(self, include_std: bool = False) -> dict[str, dict[str, list[str]]]:
        """``{signal tag name: {"train" | "heldout" | "contrast": [tag per band]}}`` of the check metrics."""
        out: dict[str, dict[str, list[str]]] = {}
        for sig in self.signal_names:
            parts = {split: [f"mem/{sig}/band={b}/{split}" for b in self.bands] for split in self.splits}
            if include_std:
                for split in self.splits:
                    parts[f"{split}_std"] = [f"mem/{sig}/band={b}/{split}_std" for b in self.bands]
            if self.has_heldout:
                parts["contrast"] = [f"mem/{sig}/band={b}/contrast" for b in self.bands]
            out[sig] = parts
        return out

    def probes(self) -> list[dict[str, Any]]:
        """One dict per probe: ``{"id", "split", "kind", "index", "caption"}`` (``index``: dataset row, held-out list
        row, or for unseen captions the id of the training probe whose inputs it shares)."""
        if self.spec is None:
            return []
        s = self.spec
        out = [{"id": i, "split": "train", "kind": k, "index": r, "caption": c}
               for i, (r, k, c) in enumerate(zip(s["train_rows"], s["train_kinds"], s["train_captions"]))]
        P = len(out)
        for j, (r, c) in enumerate(zip(s["heldout_rows"], s["heldout_captions"])):
            out.append({"id": P + j, "split": "heldout", "kind": s["heldout_source"], "index": r, "caption": c})
        return out

    @property
    def last_check_step(self) -> int | None:
        return self.history[-1]["step"] if self.history else None

    # ------------------------------------------------------------------------------------------------ probe choice
    def _choose(self, trainer: Any) -> dict[str, Any]:
        c = self.config
        ds = trainer.dataset
        if not hasattr(ds, "ds") or not hasattr(ds, "cfg"):
            raise TypeError(f"MemorizationMonitor expects trainer.dataset to be an ImageCaptionDataset (with .ds and "
                            f".cfg); found {type(ds).__name__}")
        captions = list(ds.ds[ds.cfg.caption_column])
        n = len(captions)
        g = torch.Generator().manual_seed(c.seed)
        T = int(trainer.components.noise_scheduler.config.num_train_timesteps)
        bands = self._resolve_bands(T)

        rows, kinds = [], []
        for row, _count in duplicated_caption_rows(captions):
            if len(rows) == c.num_duplicate_probes:
                break
            if self._row_pixels(trainer, row) is not None:
                rows.append(row)
                kinds.append("duplicate")
        chosen = set(rows)
        rest = [i for i in range(n) if i not in chosen]
        perm = torch.randperm(len(rest), generator=g).tolist()
        extra = 0
        for k in perm:
            if extra == c.num_random_probes:
                break
            if self._row_pixels(trainer, rest[k]) is not None:
                rows.append(rest[k])
                kinds.append("random")
                extra += 1
        if not rows:
            raise ValueError("MemorizationMonitor: no readable training row to use as a probe")
        chosen = set(rows)

        source, h_rows, h_captions = None, [], []
        if c.num_heldout_probes and c.heldout_captions:
            train_set = set(captions)
            unseen = [cap for cap in c.heldout_captions if cap not in train_set]
            if len(unseen) < len(c.heldout_captions):
                warnings.warn(f"MemorizationMonitor: {len(c.heldout_captions) - len(unseen)} of heldout_captions are "
                              "training captions and were dropped", RuntimeWarning, stacklevel=3)
            h_captions = unseen[: c.num_heldout_probes]
            h_rows = [j % len(rows) for j in range(len(h_captions))]
            source = "captions" if h_captions else None
        elif c.num_heldout_probes and self.heldout is not None:
            total = len(self.heldout)
            order = torch.randperm(total, generator=g).tolist()[: c.num_heldout_probes]
            h_rows = sorted(order)
            h_captions = [self._heldout_item(trainer, j)[1] for j in h_rows]
            source = "samples" if h_rows else None

        # Fixed timesteps: per training probe, band, draw; then per held-out sample (unseen captions share).
        timesteps = []
        n_own = len(rows) + (len(h_rows) if source == "samples" else 0)
        for _ in range(n_own):
            for lo, hi in bands.values():
                for _ in range(c.draws_per_band):
                    timesteps.append(int(torch.randint(lo, hi, (1,), generator=g)))
        pool_rest = [i for i in range(n) if i not in chosen]
        pool_perm = torch.randperm(len(pool_rest), generator=g).tolist()[: c.nearest_pool_size]
        return {
            "version": 1,
            "seed": int(c.seed),
            "num_train_timesteps": T,
            "bands": {k: list(v) for k, v in bands.items()},
            "draws_per_band": int(c.draws_per_band),
            "train_rows": rows,
            "train_kinds": kinds,
            "train_captions": [captions[r] for r in rows],
            "heldout_source": source,
            "heldout_rows": h_rows,
            "heldout_captions": h_captions,
            "timesteps": timesteps,
            "pool_rows": sorted(pool_rest[k] for k in pool_perm),
        }

    def _row_pixels(self, trainer: Any, row: int) -> torch.Tensor | None:
        """A training row's image in its canonical view (centre crop, no flip), or None if it cannot be read."""
        from ..trainer.data import decode_image, preprocess_image

        ds = trainer.dataset
        try:
            cell = ds.ds[int(row)][ds.cfg.image_column]
            return preprocess_image(decode_image(cell), ds.cfg.resolution, ds.channels, center_crop=True, flip=False)
        except Exception as err:  # a bad file: pick another probe
            logger.warning("MemorizationMonitor: training row %d cannot be used as a probe: %s", row, err)
            return None

    def _heldout_item(self, trainer: Any, j: int) -> tuple[Any, str]:
        item = self.heldout[int(j)]
        if isinstance(item, dict):
            cfg = trainer.dataset.cfg
            image_key = cfg.image_column if cfg.image_column in item else "image"
            caption_key = cfg.caption_column if cfg.caption_column in item else "text"
            if image_key not in item or caption_key not in item:
                raise KeyError(f"held-out item {j}: expected keys {cfg.image_column!r} / {cfg.caption_column!r} "
                               f"(or 'image' / 'text'), found {sorted(item)}")
            return item[image_key], item[caption_key]
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return item[0], item[1]
        raise TypeError(f"held-out item {j}: expected an (image, caption) pair or a dict, found {type(item).__name__}")

    # ------------------------------------------------------------------------------------------------ tensors
    def _materialize(self) -> None:
        """Build the probe tensors (inputs, noise, timesteps, conditioning) from :attr:`spec`."""
        trainer, s, c = self._trainer, self.spec, self.config
        parts = trainer.components
        device = trainer.accelerator.device
        ds = trainer.dataset
        res, channels = ds.cfg.resolution, ds.channels
        train_px = []
        for r in s["train_rows"]:
            px = self._row_pixels(trainer, r)
            if px is None:
                raise ValueError(f"MemorizationMonitor: probe row {r} of the checkpointed probe set cannot be read")
            train_px.append(px)
        own_px = list(train_px)
        if s["heldout_source"] == "samples":
            own_px += [_to_pixels(self._heldout_item(trainer, j)[0], res, channels) for j in s["heldout_rows"]]
        with torch.no_grad():
            x0_own = torch.cat([_encode(parts, torch.stack(own_px[i:i + 16]).to(device))
                                for i in range(0, len(own_px), 16)])
        nb, nd = len(s["bands"]), s["draws_per_band"]
        per = nb * nd
        gn = torch.Generator().manual_seed(s["seed"] + 1)
        noise_own = torch.randn((len(own_px) * per, *x0_own.shape[1:]), generator=gn)
        t_own = torch.tensor(s["timesteps"], dtype=torch.long)
        if t_own.numel() != len(own_px) * per:
            raise ValueError(f"MemorizationMonitor: the probe spec has {t_own.numel()} timesteps, expected "
                             f"{len(own_px) * per} ({len(own_px)} probes x {nb} bands x {nd} draws)")
        x0_rows = x0_own.repeat_interleave(per, dim=0)
        band_of = torch.arange(nb).repeat_interleave(nd).repeat(len(own_px))
        probe_of = torch.arange(len(own_px)).repeat_interleave(per)
        captions = [cap for cap in s["train_captions"] for _ in range(per)]
        P = len(s["train_rows"])
        split_of = torch.zeros(len(own_px) * per, dtype=torch.long)
        if s["heldout_source"] == "samples":
            split_of[P * per:] = 1
            captions += [cap for cap in s["heldout_captions"] for _ in range(per)]
        elif s["heldout_source"] == "captions":
            src = torch.tensor(s["heldout_rows"], dtype=torch.long)
            idx = (src[:, None] * per + torch.arange(per)[None]).reshape(-1)
            x0_rows = torch.cat([x0_rows, x0_rows[idx]])
            noise_own = torch.cat([noise_own, noise_own[idx]])
            t_own = torch.cat([t_own, t_own[idx]])
            band_of = torch.cat([band_of, band_of[idx]])
            probe_of = torch.cat([probe_of, P + torch.arange(len(src)).repeat_interleave(per)])
            split_of = torch.cat([split_of, torch.ones(len(idx), dtype=torch.long)])
            captions += [cap for cap in s["heldout_captions"] for _ in range(per)]

        # Nearest-neighbour pool (pixels in [0, 1], exact duplicates removed) and the generation inputs.
        pool_px, pool_rows, seen = [], [], set()
        for r, px in [*zip(s["train_rows"], train_px), *((r, self._row_pixels(trainer, r)) for r in s["pool_rows"])]:
            if px is None:
                continue
            key = px.numpy().tobytes()
            if key in seen:
                continue
            seen.add(key)
            pool_px.append((px + 1) / 2)
            pool_rows.append(r)
        G = min(c.curvature_num_probes, P)
        cfg_unet = trainer.accelerator.unwrap_model(trainer.unet).config
        gg = torch.Generator().manual_seed(s["seed"] + 2)
        gen_latents = torch.randn((G, cfg_unet.in_channels, cfg_unet.sample_size, cfg_unet.sample_size), generator=gg)
        curv_noise = torch.randn(gen_latents.shape, generator=gg)
        # The monitor's own caption embeddings, each caption encoded alone (never through the training loop's cache):
        # the same bits whoever trains, whatever the batch, on every rank.
        from ..prompts import PromptEncoder

        prompts = PromptEncoder(lambda caps: parts.encode_prompt(caps, device=device), device=device, max_bytes=0)
        unique = list(dict.fromkeys([*captions, *s["train_captions"][:G], ""]))
        table = dict(zip(unique, prompts(unique)))
        self._tensors = {
            "cond": torch.stack([table[cap] for cap in captions]), "uncond": table[""][None],
            "gen_cond": torch.stack([table[cap] for cap in s["train_captions"][:G]]) if G else None,
            "x0": x0_rows.to(device), "noise": noise_own.to(device), "t": t_own.to(device),
            "band": band_of, "probe": probe_of, "split": split_of, "captions": captions,
            "pool": torch.stack(pool_px) if pool_px else None, "pool_rows": pool_rows,
            "train_px": [(p + 1) / 2 for p in train_px], "gen_latents": gen_latents, "curv_noise": curv_noise,
        }

    def _build_baseline(self) -> None:
        from ..baselines import AdapterDisabledBaseline, UnconditionalBaseline, ema_baseline
        from ..denoiser import Denoiser

        trainer, c = self._trainer, self.config
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        den = Denoiser(unet, trainer.components.noise_scheduler)
        self._denoiser = den
        if c.baseline in ("ema", "snapshot"):
            ema = getattr(trainer, "ema", None)
            if ema is None:
                raise ValueError(f"MonitorConfig.baseline={c.baseline!r} needs the trainer's EMA (ema.enabled=true); "
                                 "found none. Use baseline='lora_off', 'uncond' or 'checkpoint' instead")
            if c.baseline == "snapshot" and not ema.num_snapshots:
                raise ValueError("MonitorConfig.baseline='snapshot' needs EMA snapshots (ema.snapshot_every > 0 and "
                                 "ema.num_snapshots > 0); found num_snapshots=0")
            self._baseline = ema_baseline(den, ema, "ema" if c.baseline == "ema" else c.baseline_snapshot)
        elif c.baseline == "lora_off":
            self._baseline = AdapterDisabledBaseline(den)
        elif c.baseline == "uncond":
            self._baseline = UnconditionalBaseline(den, self._tensors["uncond"])
        else:
            from ..baselines import load_lora_baseline, load_unet_baseline

            config = getattr(trainer, "config", None)  # None outside the reference Trainer (mnemoguard.Guard)
            lora = config.model.lora.enabled if config is not None else bool(getattr(unet, "peft_config", None))
            if lora:
                self._baseline = load_lora_baseline(den, c.baseline_checkpoint)
            else:
                self._baseline = load_unet_baseline(c.baseline_checkpoint, like=den)

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_begin(self, state: TrainerState, control: TrainerControl, trainer: Any = None,
                       **kwargs: Any) -> None:
        if trainer is None:
            raise ValueError("MemorizationMonitor.on_train_begin needs the trainer (the reference Trainer passes it)")
        self._trainer = trainer
        start = time.perf_counter()
        T = int(trainer.components.noise_scheduler.config.num_train_timesteps)
        with preserved_rng_state():
            if self.spec is None:
                self.spec = self._choose(trainer)
            elif self.spec["num_train_timesteps"] != T:
                raise ValueError(f"the saved probe set is for {self.spec['num_train_timesteps']} timesteps, the model "
                                 f"has {T}")
            self._materialize()
            self._build_baseline()
        nb = len(self.spec["bands"])
        if self.agc_mean is None:
            self.agc_mean = [0.0] * self.config.loss_buckets
            self.agc_count = [0] * self.config.loss_buckets
        if self._window is None or len(self._window) != nb:
            self._window = [[0, 0] for _ in range(nb)]
        self.seconds["setup"] += time.perf_counter() - start

    def on_loss(self, state: TrainerState, control: TrainerControl, inputs: dict, accelerator: Any = None,
                **kwargs: Any) -> None:
        if self.agc_mean is None or self.spec is None:
            return
        start = time.perf_counter()
        loss = inputs["loss_per_sample"].detach().float().reshape(-1)
        t = inputs["timesteps"].detach().reshape(-1).to(loss.device, torch.float32)
        idx = torch.as_tensor(inputs["indices"]).reshape(-1).to(loss.device, torch.float32)
        captions = inputs.get("captions")
        cond = torch.ones_like(loss) if captions is None else torch.tensor(
            [1.0 if c else 0.0 for c in captions], device=loss.device)
        # The last column marks real rows (padding is -1): an index of -1 is a row of unknown dataset position.
        rows = torch.stack([loss, t, idx, cond, torch.ones_like(loss)], dim=1).double()
        if accelerator is not None and accelerator.num_processes > 1:
            rows = accelerator.pad_across_processes(rows, dim=0, pad_index=-1)
            rows = accelerator.gather(rows)
            rows = rows[rows[:, 4] > 0]
        self.observe_losses(rows[:, 0].cpu(), rows[:, 1].cpu().long(), rows[:, 2].cpu().long(),
                            rows[:, 3].cpu() > 0)
        self.seconds["per_step"] += time.perf_counter() - start

    def observe_losses(self, loss: torch.Tensor, timesteps: torch.Tensor, indices: torch.Tensor,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
        """The per-step cheap signal: flag low-loss samples against their bucket's running mean, then update the
        means (sequentially, as IET-AGC does). Returns the ``[B]`` bool flags."""
        c = self.config
        T = int(self.spec["num_train_timesteps"]) if self.spec else 1000
        if self.agc_mean is None:
            self.agc_mean, self.agc_count = [0.0] * c.loss_buckets, [0] * c.loss_buckets
        if self._window is None:
            self._window = [[0, 0] for _ in self.bands]
        keep = torch.ones_like(loss, dtype=torch.bool) if keep is None else keep
        bucket = (timesteps.clamp(0, T - 1) * c.loss_buckets // T).tolist()
        losses, ts, idx, keeps = loss.tolist(), timesteps.tolist(), indices.tolist(), keep.tolist()
        flags = [keeps[i] and self.agc_count[b] >= c.loss_min_count and losses[i] * c.loss_flag_ratio
                 < self.agc_mean[b] for i, b in enumerate(bucket)]
        band_ranges = list(self.bands.values())
        for i, b in enumerate(bucket):
            if not keeps[i] or not math.isfinite(losses[i]):
                continue
            for k, (lo, hi) in enumerate(band_ranges):
                if lo <= ts[i] < hi:
                    self._window[k][1] += 1
                    self._window[k][0] += int(flags[i])
            if flags[i] and idx[i] >= 0:  # negative: the row's dataset index is unknown (not counted per sample)
                self.flag_counts[int(idx[i])] = self.flag_counts.get(int(idx[i]), 0) + 1
            if self.agc_count[b] == 0:
                self.agc_mean[b] = losses[i]
            else:
                self.agc_mean[b] = c.loss_ema_decay * self.agc_mean[b] + (1 - c.loss_ema_decay) * losses[i]
            self.agc_count[b] += 1
        return torch.tensor(flags, dtype=torch.bool)

    def _agc_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._window is None:
            return out
        for (name, _), (flagged, seen) in zip(self.bands.items(), self._window):
            if seen:
                out[f"mem/agc/flag_rate/band={name}"] = flagged / seen
        self._window = [[0, 0] for _ in self._window]
        out["mem/agc/flagged_samples"] = float(len(self.flag_counts))
        return out

    def on_step_end(self, state: TrainerState, control: TrainerControl, logs: dict | None = None,
                    **kwargs: Any) -> None:
        if self.spec is None:
            return
        values: dict[str, float] = {}
        if state.global_step % self.config.every_n_steps == 0:
            start = time.perf_counter()
            values.update(self._check(state))
            self.seconds["checks"] += time.perf_counter() - start
            control.should_log = True
        if control.should_log:
            values.update(self._agc_metrics())
        if values:
            state.update_metrics(values)
            if logs is not None:
                logs.update(values)

    def _check(self, state: TrainerState) -> dict[str, float]:
        self.num_checks += 1
        k = self.config.curvature_every_k_checks
        visual = bool(k) and self.num_checks % k == 0 and self.config.curvature_num_probes > 0
        metrics, per_probe, vis = self.measure(visual=visual)
        entry: dict[str, Any] = {"step": state.global_step, "metrics": dict(metrics), "per_probe": per_probe}
        if vis is not None:
            entry["visual"] = {key: vis[key] for key in ("probe_ids", "nn_ratio", "nearest_is_own", "curvature")}
            self.latest_visuals = {**vis, "step": state.global_step}
        self.history.append(entry)
        return metrics

    # ------------------------------------------------------------------------------------------------ measuring
    def measure(self, visual: bool = False) -> tuple[dict[str, float], dict[str, Any], dict[str, Any] | None]:
        """One check on the current weights, without recording it: ``(metrics, per_probe, visuals)``.

        Runs with the global RNG state preserved, the UNet in eval mode and no gradients (the curvature maps take
        input gradients only). Deterministic for given weights: everything random comes from the monitor's seed.
        """
        if self._tensors is None:
            raise RuntimeError("MemorizationMonitor.measure: no probe set yet (on_train_begin has not run)")
        acc = self._trainer.accelerator
        unet = acc.unwrap_model(self._trainer.unet)
        with preserved_rng_state(), eval_mode(unet):
            with torch.no_grad():
                values = self._probe_values(acc)
            metrics, per_probe = self._aggregate(values)
            vis = None
            if visual:
                vis = self._visual_check()
                metrics[f"mem/curvature_diff/t={self.config.curvature_timestep}/train"] = float(
                    np.mean(vis["curvature"]))
                if vis["nn_ratio"]:
                    metrics["mem/nn_ratio/train"] = float(np.mean(vis["nn_ratio"]))
        return metrics, per_probe, vis

    def _probe_values(self, acc: Any) -> torch.Tensor:
        """``[N, 4]`` per probe row: live-vs-baseline gap, Wen gap, anisotropy cosine, probe loss (gathered)."""
        tz = self._tensors
        N = tz["t"].shape[0]
        W, r = int(getattr(acc, "num_processes", 1)), int(getattr(acc, "process_index", 0))
        per_rank = math.ceil(N / W)
        mine = [min(i, N - 1) for i in range(r * per_rank, (r + 1) * per_rank)]  # padded to the same size
        out = []
        for i in range(0, len(mine), self.config.batch_size):
            out.append(self._rows(mine[i:i + self.config.batch_size]))
        local = torch.cat(out).to(acc.device) if out else torch.zeros((0, 4), device=acc.device)
        if W > 1:
            local = acc.gather(local.contiguous())
        return local[:N].double().cpu()

    def _rows(self, rows: list[int]) -> torch.Tensor:
        from ..denoiser import eps_from_prediction
        from ..signals import anisotropy_cosine, live_baseline_gap, wen_norm

        trainer, tz, den = self._trainer, self._tensors, self._denoiser
        sched = trainer.components.noise_scheduler
        sel = torch.tensor(rows, dtype=torch.long, device=tz["t"].device)
        x0, eps, t = tz["x0"][sel], tz["noise"][sel], tz["t"][sel]
        x_t = sched.add_noise(x0, eps, t)
        cond, uncond = tz["cond"][sel], tz["uncond"]
        raw_c, raw_u = den.raw_cond_uncond(x_t, t, cond, uncond)
        alpha = den.alpha(t, dtype=x_t.dtype, device=x_t.device)
        sigma = den.sigma(t, dtype=x_t.dtype, device=x_t.device)
        eps_c = eps_from_prediction(raw_c.float(), x_t, alpha, sigma, den.prediction_type)
        eps_u = eps_from_prediction(raw_u.float(), x_t, alpha, sigma, den.prediction_type)
        n = len(rows)
        nan = torch.full((n,), float("nan"), device=x_t.device)
        wanted = set(self.config.signals)
        if "probe_loss" in wanted:
            if den.prediction_type == "epsilon":
                target = eps
            elif den.prediction_type == "v_prediction":
                target = sched.get_velocity(x0, eps, t)
            else:
                target = x0
            loss = F.mse_loss(raw_c.float(), target.float(), reduction="none").flatten(1).mean(1)
        else:
            loss = nan
        wen = wen_norm(eps_c, eps_u) if "wen_gap" in wanted else nan
        aniso = anisotropy_cosine(eps_c, eps_u) if "anisotropy" in wanted and eps_c.ndim >= 3 else nan
        gap = nan
        if "live_vs_baseline" in wanted:
            if self.config.baseline == "uncond":
                base = eps_u
            elif self.config.baseline == "snapshot" and not getattr(self._trainer.ema, "snapshots", None):
                base = None  # no snapshot taken yet
                self._warn_once("snapshot", "MemorizationMonitor: no EMA snapshot yet; live_vs_snapshot skipped "
                                "until the first one is taken")
            else:
                base = self._baseline.eps(x_t, t, cond).float()
            if base is not None:
                gap = live_baseline_gap(eps_c, base, sigma=sigma if self.config.score_space else None)
        return torch.stack([gap.float(), wen.float(), aniso.float(), loss.float()], dim=1)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _aggregate(self, values: torch.Tensor) -> tuple[dict[str, float], dict[str, Any]]:
        tz = self._tensors
        band_names = list(self.spec["bands"])
        column = {s: i for i, s in enumerate(SIGNALS)}
        probe, band = tz["probe"], tz["band"]
        n_probes = int(probe.max()) + 1
        P = len(self.spec["train_rows"])
        metrics: dict[str, float] = {}
        per_probe: dict[str, Any] = {}
        for sig in self.config.signals:
            col = values[:, column[sig]]
            if torch.isnan(col).all():
                continue
            name = self.signal_tag(sig)
            per_probe[name] = {}
            for b, bname in enumerate(band_names):
                in_band = band == b
                vals = []
                for p in range(n_probes):
                    m = in_band & (probe == p)
                    vals.append(float(col[m].mean()) if m.any() else float("nan"))
                groups = {"train": vals[:P]}
                if self.has_heldout:
                    groups["heldout"] = vals[P:]
                per_probe[name][bname] = groups
                means = {}
                for g, v in groups.items():
                    arr = np.asarray([x for x in v if math.isfinite(x)], dtype=np.float64)
                    if arr.size == 0:
                        continue
                    means[g] = float(arr.mean())
                    metrics[f"mem/{name}/band={bname}/{g}"] = means[g]
                    metrics[f"mem/{name}/band={bname}/{g}_std"] = float(arr.std())
                if "train" in means and "heldout" in means:
                    metrics[f"mem/{name}/band={bname}/contrast"] = _ORIENTATION[sig] * (means["train"]
                                                                                       - means["heldout"])
        return metrics, per_probe

    def _visual_check(self) -> dict[str, Any]:
        """Generations, nearest training images and curvature-difference maps for the first training probes."""
        from ..evaluation.nearest_neighbour import nearest_neighbour_ratio
        from ..sampling import generate
        from ..signals import curvature_diff_map

        trainer, tz, c, den = self._trainer, self._tensors, self.config, self._denoiser
        parts = trainer.components
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        G = tz["gen_latents"].shape[0]
        captions = self.spec["train_captions"][:G]
        cond, uncond = tz["gen_cond"], tz["uncond"]
        guidance = c.generation_guidance_scale
        if guidance is None:
            guidance = float(getattr(getattr(trainer.config, "validation", None), "guidance_scale", 1.0))
        finals: list[torch.Tensor] = []

        def decode(z: torch.Tensor) -> torch.Tensor:
            finals.append(z.detach().float())
            return parts.decode(z) if parts.latent else z

        with torch.no_grad():
            images = generate(unet, parts.noise_scheduler, cond, uncond, guidance, c.generation_steps,
                              latents=tz["gen_latents"], decode=decode)
        z = finals[-1]
        t = torch.full((G,), int(c.curvature_timestep), dtype=torch.long, device=z.device)
        x = parts.noise_scheduler.add_noise(z, tz["curv_noise"].to(z.device, z.dtype), t)
        if c.baseline == "uncond":
            base_fn = self._baseline.eps_fn(t)
        elif c.baseline == "snapshot" and not getattr(trainer.ema, "snapshots", None):
            from ..baselines import UnconditionalBaseline

            base_fn = UnconditionalBaseline(den, uncond).eps_fn(t)
        else:
            base_fn = self._baseline.eps_fn(t, cond)
        maps = curvature_diff_map(den.eps_fn(t, cond), base_fn, x, num_probes=c.curvature_hutchinson_probes,
                                  generator=torch.Generator().manual_seed(self.spec["seed"] + 4), method="vjp")
        maps = maps.detach().float().cpu()
        out: dict[str, Any] = {
            "probe_ids": list(range(G)), "captions": captions, "generations": images.float().cpu(),
            "maps": maps, "curvature": [float(m.mean()) for m in maps], "nn_ratio": [], "nearest_is_own": [],
            "nearest": None, "nearest_rows": [],
        }
        pool = tz["pool"]
        if pool is not None and pool.shape[0] >= 2 and pool.shape[1:] == images.shape[1:]:
            nn = nearest_neighbour_ratio(images.float().cpu(), pool, check_unique=False)
            idx = nn.indices[:, 0].tolist()
            out["nn_ratio"] = [float(v) for v in nn.ratio]
            out["nearest"] = pool[idx]
            out["nearest_rows"] = [tz["pool_rows"][i] for i in idx]
            out["nearest_is_own"] = [bool(torch.equal(pool[i], tz["train_px"][g])) for g, i in enumerate(idx)]
        acc = trainer.accelerator
        if acc.num_processes > 1:  # every rank computed the same set (ZeRO-3 needs equal calls); rank 0 decides
            from accelerate.utils import broadcast

            n = len(out["nn_ratio"])
            packed = torch.tensor([*out["curvature"], *out["nn_ratio"], *map(float, out["nearest_is_own"])],
                                  dtype=torch.float64, device=acc.device)
            packed = broadcast(packed, from_process=0).cpu().tolist()
            out["curvature"] = packed[:G]
            out["nn_ratio"] = packed[G:G + n]
            out["nearest_is_own"] = [bool(v) for v in packed[G + n:]]
        return out

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": None if self.spec is None else _plain(self.spec),
            "num_checks": self.num_checks,
            "history": _plain(self.history),
            "flag_counts": {int(k): int(v) for k, v in self.flag_counts.items()},
            "agc_mean": None if self.agc_mean is None else [float(v) for v in self.agc_mean],
            "agc_count": None if self.agc_count is None else [int(v) for v in self.agc_count],
            "window": None if self._window is None else [list(w) for w in self._window],
            "seconds": dict(self.seconds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        spec = state.get("spec")
        if spec is not None and self.spec is not None and spec != self.spec:
            logger.info("MemorizationMonitor: restoring the checkpoint's probe set")
        self.spec = None if spec is None else _plain(spec)
        self.num_checks = int(state.get("num_checks", 0))
        self.history = _plain(state.get("history", []))
        self.flag_counts = {int(k): int(v) for k, v in state.get("flag_counts", {}).items()}
        self.agc_mean = None if state.get("agc_mean") is None else [float(v) for v in state["agc_mean"]]
        self.agc_count = None if state.get("agc_count") is None else [int(v) for v in state["agc_count"]]
        if self.agc_mean is not None and len(self.agc_mean) != self.config.loss_buckets:
            raise ValueError(f"MemorizationMonitor: the checkpoint has {len(self.agc_mean)} loss buckets, the config "
                             f"{self.config.loss_buckets}")
        self._window = None if state.get("window") is None else [list(w) for w in state["window"]]
        self.seconds = {**self.seconds, **{k: float(v) for k, v in state.get("seconds", {}).items()}}
        self.latest_visuals = None
        if self._trainer is not None and self.spec is not None:  # resumed after on_train_begin: rebuild the probes
            with preserved_rng_state():
                self._materialize()


def _plain(obj: Any) -> Any:
    """A deep copy made of dicts, lists and Python scalars (what a checkpoint should hold)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
