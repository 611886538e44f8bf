"""The ``mnemoguard bench`` configuration: testbed sizes, training length, probes, signals, maps, danger zone.

Same rules as the recipe (:mod:`mnemoguard.config`): YAML or dict in, unknown keys are errors, ``key.path=value``
overrides. The defaults aim at one run in about 15 minutes on 2 CPU cores. They are extrapolated from short runs,
not measured end to end:

* **What drives the onset.** An image duplicated R times among N rows is drawn 32 R / N times per optimizer step
  at batch 32 (at most 32 / K for K duplicated images). testbed-notes: 10 images x 50 copies in 1,500 rows at
  lr 5e-4 gave 2.5 % copies after ~2,100 draws of each image (2,000 steps) and 35 % after ~4,300 (4,000 steps),
  unseen captions at 0 %. A reduced bench run (2 images x 150 copies in 400 rows, lr 1e-3) gave 0 % after ~1,500
  draws (125 steps) and 12.5 % after ~3,000 (250 steps), unseen and held-out at 0 %.
* **Speed.** The reference trainer took about 0.45-0.5 s per step on ONE thread of this 2-core machine (batch 32;
  backward is 60 % of it), so testbed-notes' 4,000-step set-up (8.5 steps/s with its own loop on 2 idle cores)
  would take over 15 minutes here.
* **Hence:** 12 images x 72 copies among 480 plain + 60 template rows (1,404 rows, 1.64 draws per step), lr 1e-3,
  2,000 steps: checkpoints at ~820, 1,640, 2,460 and 3,280 draws per image, across the onset window above.
  12 planted captions x 4 seeds per side is far from the issue's >= 100 memorized captions: at this rate 100
  planted images need ~8x the steps (a GPU, or ``testbed.duplicated.num_images=100`` with a longer
  ``train.max_train_steps``). testbed-notes' exact set-up: ``--set testbed.plain.num_images=1000
  testbed.duplicated.num_images=10 testbed.duplicated.copies=50 testbed.template.enabled=false
  train.learning_rate=5e-4 train.max_train_steps=4000``.
* **Clean negatives.** Planted images come from digits 0-5 only, and the unseen and held-out captions name digits
  6-9. In the first full run (seed 0) all ten digits had planted images and unseen captions in the planted style
  came out as copies 4-14 % of the time: with 1.64 draws per step, one or two duplicated images are ~60 % of
  their digit's training rows, so *any* caption naming that digit in the planted style regurgitates them. That is
  memorization leaking to neighbouring prompts, real but not a clean negative; the default keeps it out of the
  negatives (``testbed.unseen.avoid_planted_classes=false`` brings it back).
* **Evaluation.** Every 500 steps: 12 planted captions x 4 seeds and 100 unseen + 16 held-out captions x 1 seed at
  w = 1 and w = 3 (25 DDIM steps), plus the signals: about 15,000 UNet passes at batch 1, 90 s on one loaded
  thread. Maps and the danger zone once at the end (about 30 s).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_dataclass, merge_dicts, read_mapping
from ..testbed.config import DuplicatedConfig, HeldOutConfig, PlainConfig, TemplateConfig, TestbedConfig, UnseenConfig

__all__ = [
    "BenchConfig",
    "BenchDangerZoneConfig",
    "BenchLocalizationConfig",
    "BenchProbeConfig",
    "BenchSignalConfig",
    "BenchTrainConfig",
    "load_bench_config",
]


PLANTED_CLASSES = (0, 1, 2, 3, 4, 5)  # digits that get planted images; negatives name only digits 6-9


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def bench_testbed() -> TestbedConfig:
    """The benchmark's testbed: few duplicated images, each drawn 1.64 times per step (see the module docstring)."""
    return TestbedConfig(
        plain=PlainConfig(num_images=480),
        duplicated=DuplicatedConfig(num_images=12, copies=72, classes=list(PLANTED_CLASSES)),
        template=TemplateConfig(num_images=60),
        held_out=HeldOutConfig(num_images=32, avoid_planted_classes=True),
        unseen=UnseenConfig(num_global_style=100, num_template_style=16, avoid_planted_classes=True),
    )


@dataclass
class BenchTrainConfig:
    """The reference trainer's run (any other recipe key goes through ``recipe_overrides``)."""

    max_train_steps: int = 2000  # ~3,300 draws of each planted image (module docstring)
    eval_every: int = 500  # checkpoint + full evaluation every K optimizer steps (about a minute each)
    learning_rate: float = 1e-3  # testbed-notes used 5e-4 over 4,000 steps; 1e-3 memorizes sooner
    train_batch_size: int = 32
    family: str = "sd"  # sd: the tiny UNet (DDPM); sd3: a tiny SD3Transformer2DModel (4 joint blocks, 4 heads of 16,
    # patch 2, 0.63 M parameters) trained with the rectified-flow objective; flux: a tiny FluxTransformer2DModel
    weighting_scheme: str = "logit_normal"  # flow families: the timestep density (SD3's default), as diffusers' names
    flow_shift: float = 1.0  # flow families: the scheduler's shift (SD3 ships 3.0 for 1024 px; 16 px needs none)
    text_encoder: str = "minilm"  # minilm (real, 384-d) | clip (tiny random; tests)
    base: str | None = None  # fine-tuning variant: initial UNet ("builtin:digits16" needs
    # testbed.source.exclude_base=true so that planted and held-out images are new to the base); None = from scratch
    lora: bool = False  # fine-tune a peft LoRA (model.lora.*, e.g. rank, via recipe_overrides) instead of the UNet
    monitor_every: int = 100  # run the guard's MemorizationMonitor every K steps alongside (0 = off); its curves
    # (planted vs unseen probes, per band) go into bench.json beside the ground truth, for detection lead
    monitor_random_probes: int = 0  # random (not duplicated) training probes besides them (the danger-zone tracker
    # compares the planted probes' return rate with theirs)
    monitor_probes: int = 8  # planted (duplicated) pairs and held-out probes the monitor takes, each
    monitor_heldout: str = "images"  # images: held-out image + caption pairs (a generalization gap); captions:
    # unseen captions on the planted images' inputs (confounded by class here: BENCHMARKS.md, 3-seed run)
    mitigation: str = "none"  # an arm of bench/mitigation.py: none | noise_gap_low | noise_gap_mid |
    # noise_gap_low_half | adaptive_gap | wen_filter | iet_agc | caption_replacement | embedding_noise |
    # caption_dropout | preservation | policy | duplicate_weight | danger_zone_duplicate | danger_zone_policy
    danger_zone: bool = False  # run the guard's danger-zone tracker alongside the monitor (its curves go into
    # bench.json with the monitor's; the default stop rule is replayed on them)
    danger_zone_every: int = 2  # a tracker measurement at every k-th monitor check
    stop: bool = False  # the guard's default stop rule live (guard.default_stop; needs danger_zone), exporting its
    # rollback checkpoint (training.export=best): bench.json's "exported" is then the model a user would ship
    recipe_overrides: list[str] = field(default_factory=list)  # e.g. ["ema.lag=500"], applied last

    def __post_init__(self) -> None:
        from .mitigation import MITIGATIONS, READS_MONITOR

        _check(self.mitigation in MITIGATIONS,
               f"train.mitigation: expected one of {sorted(MITIGATIONS)}, found {self.mitigation!r}")
        _check(self.mitigation not in READS_MONITOR or self.monitor_every > 0,
               f"train.mitigation={self.mitigation}: it reads the monitor's signals; set train.monitor_every > 0, "
               "found 0")
        _check(not self.danger_zone or self.monitor_every > 0,
               "train.danger_zone: the tracker measures the monitor's probes; set train.monitor_every > 0, found 0")
        _check(not self.stop or self.danger_zone,
               "train.stop: the default stop rule reads the danger-zone tracker; set train.danger_zone=true, found "
               "false")
        _check(self.max_train_steps >= 1, f"train.max_train_steps: expected >= 1, found {self.max_train_steps}")
        _check(self.eval_every >= 1, f"train.eval_every: expected >= 1, found {self.eval_every}")
        _check(self.monitor_every >= 0, f"train.monitor_every: expected >= 0, found {self.monitor_every}")
        _check(self.monitor_probes >= 1, f"train.monitor_probes: expected >= 1, found {self.monitor_probes}")
        _check(self.monitor_heldout in ("images", "captions"),
               f"train.monitor_heldout: expected images or captions, found {self.monitor_heldout!r}")
        _check(self.text_encoder in ("minilm", "clip"),
               f"train.text_encoder: expected minilm or clip, found {self.text_encoder!r}")
        _check(self.family in ("sd", "sd3", "flux"), f"train.family: expected sd, sd3 or flux, found {self.family!r}")
        _check(self.family == "sd" or self.base is None,
               f"train.base is a UNet's weights; train.family={self.family} has none to start from (set it to null)")


@dataclass
class BenchProbeConfig:
    """Which captions are generated at every checkpoint, how often, at which guidance."""

    num_positive: int | None = None  # planted (global) captions probed; None = all of them
    num_unseen: int = 100  # unseen global-style captions (negatives)
    num_held_out: int = 16  # held-out captions (negatives, specific style, image never trained)
    seeds_positive: int = 4  # generations per planted caption (ground truth)
    seeds_negative: int = 1  # generations per negative caption
    guidance: list[float] = field(default_factory=lambda: [1.0, 3.0])  # must hold 1 and one w > 1 (users' CFG)
    num_inference_steps: int = 25  # DDIM
    ratio_threshold: float = 1 / 3  # Gu et al.'s d1/d2 threshold
    bootstrap_resamples: int = 1000
    batch_size: int = 32  # rows per sampling call (speed and memory only; 32 was fastest on CPU)

    def __post_init__(self) -> None:
        _check(1.0 in self.guidance and any(w > 1 for w in self.guidance),
               f"probes.guidance: expected 1.0 and at least one w > 1, found {self.guidance}")
        _check(self.seeds_positive >= 1 and self.seeds_negative >= 1, "probes.seeds_*: expected >= 1")
        _check(self.num_inference_steps >= 3, f"probes.num_inference_steps: expected >= 3, found "
                                               f"{self.num_inference_steps}")


@dataclass
class BenchSignalConfig:
    """Settings of the prompt-level signals (read on the first generation of every probed caption)."""

    enabled: bool = True  # False: ground truth, fidelity and losses only (cheaper checkpoints, e.g. mitigation arms)
    bands: list[list[int]] = field(default_factory=lambda: [[0, 333], [333, 666], [666, 1000]])  # [t_lo, t_hi)
    asthana_gamma: list[float] = field(default_factory=lambda: [1.0, 2.0])  # their SD 1.4 preset
    asthana_lo_index: int = -3  # DDIM timesteps[-3] (their choice)
    curvature_step: int = 12  # DDIM step of the w=1 trajectory where the Hutchinson trace is taken
    curvature_probes: int = 4  # Rademacher probes (fd: 4 passes each, CFG pair at x +- h v)
    curvature_method: str = "fd"  # fd | vjp | jvp

    def __post_init__(self) -> None:
        _check(all(len(b) == 2 and 0 <= b[0] < b[1] <= 1000 for b in self.bands),
               f"signals.bands: expected [t_lo, t_hi) pairs within [0, 1000], found {self.bands}")
        _check(len(self.asthana_gamma) == 2, f"signals.asthana_gamma: expected 2 numbers, found {self.asthana_gamma}")
        _check(self.curvature_method in ("fd", "vjp", "jvp"),
               f"signals.curvature_method: expected fd, vjp or jvp, found {self.curvature_method!r}")


@dataclass
class BenchLocalizationConfig:
    """Kim & Lee's maps on template captions, at the last checkpoint (or every one)."""

    enabled: bool = True
    num_captions: int = 16  # template captions mapped (their generations also give the template-verbatim rate)
    step_index: int = -1  # DDIM step of the guided trajectory where maps are taken (-1 = last, Kim & Lee)
    num_probes: int = 16  # Hutchinson probes (Kim & Lee: 16)
    method: str = "vjp"
    cross_attention: bool = True  # the cross-attention baseline (attention to the template phrase's tokens)
    every_checkpoint: bool = False

    def __post_init__(self) -> None:
        _check(self.method in ("fd", "vjp", "jvp"), f"localization.method: expected fd, vjp or jvp, "
                                                      f"found {self.method!r}")


@dataclass
class BenchDangerZoneConfig:
    """Dodson et al.'s curves of the training data and the per-noise-level memorization rate."""

    enabled: bool = True
    num_sigmas: int = 32
    sigma_range: list[float] = field(default_factory=lambda: [0.01, 100.0])
    num_probes: int = 256
    start_timesteps: list[int] = field(default_factory=lambda: [40, 120, 240, 400, 560, 720, 880])  # snapped to DDIM
    num_images: int = 16  # training images per kind (global, plain) denoised from each noise level
    loss_draws: int = 4  # noise draws per image and band for the training-loss gap (every checkpoint)

    def __post_init__(self) -> None:
        _check(len(self.sigma_range) == 2 and 0 < self.sigma_range[0] < self.sigma_range[1],
               f"danger_zone.sigma_range: expected [low, high] with 0 < low < high, found {self.sigma_range}")


@dataclass
class BenchConfig:
    """Everything ``mnemoguard bench`` does (see ``docs/testbed.md``, "The benchmark")."""

    seed: int = 0  # the run's one seed: testbed selection (overrides testbed.seed), weights, data order, probe noise
    progress: bool = True  # tqdm progress bars
    testbed: TestbedConfig = field(default_factory=bench_testbed)
    train: BenchTrainConfig = field(default_factory=BenchTrainConfig)
    probes: BenchProbeConfig = field(default_factory=BenchProbeConfig)
    signals: BenchSignalConfig = field(default_factory=BenchSignalConfig)
    localization: BenchLocalizationConfig = field(default_factory=BenchLocalizationConfig)
    danger_zone: BenchDangerZoneConfig = field(default_factory=BenchDangerZoneConfig)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, f"seed: expected >= 0, found {self.seed}")
        _check(self.train.family == "sd" or not self.localization.cross_attention,
               f"localization.cross_attention reads a UNet's cross-attention layers; train.family="
               f"{self.train.family} attends jointly: set localization.cross_attention=false")
        _check(self.train.base != "builtin:digits16" or self.testbed.source.exclude_base,
               "train.base=builtin:digits16 was trained on the even-indexed digits: set "
               "testbed.source.exclude_base=true so that the testbed's planted and held-out images are new to it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_bench_config(
    config: BenchConfig | str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> BenchConfig:
    """A :class:`BenchConfig` from a dataclass, a YAML file or a dict (merged over the bench defaults, so a partial
    ``testbed:`` section keeps the bench's testbed sizes), then ``key.path=value`` overrides.

    Raises:
        ConfigError: unknown keys, wrong types or out-of-range values.
    """
    if isinstance(config, BenchConfig):
        return load_dataclass(BenchConfig, config, overrides, what="bench config")
    data = merge_dicts(dataclasses.asdict(BenchConfig()), read_mapping(config, what="bench config"))
    return load_dataclass(BenchConfig, data, overrides, what="bench config")
