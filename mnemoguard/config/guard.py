"""The recipe's ``guard:`` section: which memorization components run, with which settings (no torch here).

Components are built from it by :func:`mnemoguard.guard.build.build_components`, in producer -> consumer order:
the low-loss flags and the monitor first, then the policy and the actions it drives (noise gap, regularizers), early
stopping, and the dashboard and report, which read what all the others produced.
:func:`mnemoguard.config.checks.check_guard_config` checks every name (regularizers, actions, signals, bands) before
anything loads; :func:`default_policy` is the default mitigation chosen on the testbeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .danger_zone import DangerZoneConfig
from .schema import ConfigError

__all__ = ["BASELINES", "SIGNALS", "STRATEGIES", "DashboardConfig", "DefaultPolicy", "EarlyStoppingSettings",
           "GuardConfig", "LossFlagsConfig", "MonitorConfig", "NoiseGapConfig", "NonFiniteConfig", "ReportConfig",
           "Rule", "band_names", "default_policy"]

SIGNALS = ("live_vs_baseline", "wen_gap", "anisotropy", "probe_loss")
BASELINES = ("ema", "snapshot", "lora_off", "uncond", "checkpoint")
STRATEGIES = ("none", "earlier", "later", "range", "gap")


def _at_least(owner: str, values: dict[str, Any], low: int) -> None:
    for name, value in values.items():
        if int(value) < low:
            raise ConfigError(f"{owner}.{name} must be >= {low}, found {value}")


@dataclass
class MonitorConfig:
    """The memorization monitor (``guard.monitor``): fixed probes, per-band signals every N optimizer steps."""

    enabled: bool = True  # the memorization monitor (probe set, per-band signals every N steps)
    every_n_steps: int = 100  # optimizer steps between checks (a last check also runs at the end of training)
    num_duplicate_probes: int = 4  # at-risk rows: duplicated images (exact or near, most copies first), then captions
    near_duplicate_ratio: float = 1.0 / 3.0  # near-duplicate images: thumbnail distance < ratio x median NN distance
    duplicate_scan_rows: int | None = 20000  # rows scanned for duplicate images (a uniform subsample; None: all)
    num_random_probes: int = 4  # further training rows drawn uniformly (never the content of another probe)
    num_heldout_probes: int = 4  # from heldout_captions, else from the held-out samples
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
    signals: list[Literal["live_vs_baseline", "wen_gap", "anisotropy", "probe_loss"]] = field(
        default_factory=lambda: list(SIGNALS))  # which signals to compute
    batch_size: int = 16  # probe rows per UNet call
    seed: int = 1234  # the monitor's own generator (probes, noise, timesteps, Hutchinson probes)
    curvature_every_k_checks: int = 5  # generations + curvature maps every k-th check (0 = never)
    curvature_num_probes: int = 2  # training probes (duplicates first) that get a generation and a map
    curvature_hutchinson_probes: int = 8  # Rademacher probes per map (Kim & Lee use 16)
    curvature_timestep: int = 1  # where the map is taken (Kim & Lee: the last DDIM step, t = 1)
    generation_steps: int = 10  # DDIM steps of the probe generations
    generation_guidance_scale: float = 1.0  # classifier-free guidance of the probe generations (1: copies show best)
    nearest_pool_size: int = 64  # random training images besides the probes in the nearest-neighbour pool

    def __post_init__(self) -> None:
        w = "guard.monitor"
        _at_least(w, {"every_n_steps": self.every_n_steps, "draws_per_band": self.draws_per_band,
                      "batch_size": self.batch_size}, 1)
        _at_least(w, {k: getattr(self, k) for k in ("num_duplicate_probes", "num_random_probes", "num_heldout_probes",
                                                    "curvature_every_k_checks", "curvature_num_probes",
                                                    "curvature_hutchinson_probes", "nearest_pool_size",
                                                    "generation_steps")}, 0)
        if self.num_duplicate_probes + self.num_random_probes < 1:
            raise ConfigError(f"{w}: num_duplicate_probes + num_random_probes must be >= 1 (no training probe to "
                              "watch); found 0")
        if not 0.0 <= self.near_duplicate_ratio < 1.0:
            raise ConfigError(f"{w}.near_duplicate_ratio must be in [0, 1) (0: exact duplicates only); found "
                              f"{self.near_duplicate_ratio}")
        if self.duplicate_scan_rows is not None and self.duplicate_scan_rows < 2:
            raise ConfigError(f"{w}.duplicate_scan_rows must be >= 2 or null (all rows); found "
                              f"{self.duplicate_scan_rows}")
        if not self.signals:
            raise ConfigError(f"{w}.signals: expected a non-empty subset of {list(SIGNALS)}, found []")
        if self.baseline == "checkpoint" and not self.baseline_checkpoint:
            raise ConfigError(f"{w}.baseline='checkpoint' needs baseline_checkpoint (a path); found None")
        if self.heldout_data and self.heldout_captions:
            raise ConfigError(f"{w}: give one source of held-out probes, heldout_captions or heldout_data; found both")
        if self.bands is not None:
            if not self.bands:
                raise ConfigError(f"{w}.bands: expected at least one [t_lo, t_hi) band or null, found []")
            for band in self.bands:
                if len(band) != 2 or not 0 <= band[0] < band[1]:
                    raise ConfigError(f"{w}.bands: a band is [t_lo, t_hi) with 0 <= t_lo < t_hi, found {list(band)}")
        n = len(self.bands) if self.bands is not None else 3
        if self.band_names is not None and (len(self.band_names) != n or len(set(self.band_names)) != n):
            raise ConfigError(f"{w}.band_names: expected {n} distinct names (one per band), found {self.band_names}")
        if self.generation_guidance_scale < 0:
            raise ConfigError(f"{w}.generation_guidance_scale must be >= 0, found {self.generation_guidance_scale}")


def band_names(monitor: MonitorConfig) -> list[str]:
    """The band names the monitor's tags use: ``band_names``, else low/mid/high for three bands, else t<lo>-<hi>."""
    if monitor.band_names is not None:
        return list(monitor.band_names)
    if monitor.bands is None or len(monitor.bands) == 3:
        return ["low", "mid", "high"]
    return [f"t{lo}-{hi}" for lo, hi in monitor.bands]


@dataclass
class LossFlagsConfig:
    """The per-step low-loss flags (``guard.loss_flags``): one running-mean table per timestep bucket, read by the
    dashboard's flag rates and by the ``iet_agc`` gate alike (Liu et al., ECCV 2024)."""

    mem_ratio: float = 1.25  # a sample is flagged when loss * mem_ratio < its bucket's running mean (SD: 1.25)
    beta: float = 0.8  # decay of a bucket's running mean (IET-AGC arr_ema_decay)
    num_buckets: int | None = None  # None: one bucket per training timestep (the authors' 1000-entry table)

    def __post_init__(self) -> None:
        if not self.mem_ratio > 0:
            raise ConfigError(f"guard.loss_flags.mem_ratio must be > 0, found {self.mem_ratio}")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"guard.loss_flags.beta must be in [0, 1), found {self.beta}")
        if self.num_buckets is not None and self.num_buckets < 1:
            raise ConfigError(f"guard.loss_flags.num_buckets must be >= 1, found {self.num_buckets}")


@dataclass
class NoiseGapConfig:
    """The noise-gap timestep sampler (``guard.noise_gap``): diffusers' ``timestep_bias_*`` names plus ``gap``."""

    enabled: bool = False  # install the sampler (static bias and / or the policy's gap)
    timestep_bias_strategy: Literal["none", "earlier", "later", "range", "gap"] = "none"
    timestep_bias_begin: int = 0  # band start (inclusive) for "range" and "gap"
    timestep_bias_end: int = 1000  # band end (exclusive) for "range" and "gap"; clipped to num_train_timesteps
    timestep_bias_multiplier: float = 1.0  # weight factor on the band; > 0 for earlier/later/range, [0, 1) for gap
    timestep_bias_portion: float = 0.25  # fraction of timesteps biased by "earlier" / "later"
    importance: float = 0.0  # exponent of the importance correction (u/q)^importance; 0 keeps the under-training
    adaptive_band: tuple[int, int] | None = None  # band activate() gaps when given none; None: [begin, end)
    follow_danger_zone: bool = False  # gap the danger-zone tracker's live band while it is on, at its strength

    def __post_init__(self) -> None:
        if not 0.0 <= self.importance <= 1.0:
            raise ConfigError(f"guard.noise_gap.importance must be in [0, 1] (0: no correction, 1: full), found "
                              f"{self.importance}")


@dataclass
class Rule:
    """One policy rule (``guard.policy`` items): one signal -> one action, with hysteresis. Semantics in
    :mod:`mnemoguard.callbacks.policy`."""

    signal: str  # metric key, band tag included, e.g. "mem/probe_loss/band=low/contrast"
    action: str = "noise_gap"  # a registered action: "noise_gap" or a regularizer's name
    threshold: float | None = None  # absolute on-level
    rise_factor: float | None = None  # on-level = rise_factor × first measured value (> 1 above, < 1 below)
    patience: int = 1  # consecutive fresh checks beyond the on-level before turning on
    release: float | None = None  # absolute off-level; None: from release_fraction
    release_fraction: float = 0.8  # default off-level as a fraction of the on-level
    release_patience: int = 1  # consecutive fresh checks beyond the release level before turning off
    direction: Literal["above", "below"] = "above"  # which side of the on-level means "memorizing"
    strength: float | Literal["danger_zone"] = 1.0  # passed to the action; "danger_zone": the tracker's strength
    # (min(max_strength, excess)), followed while the rule is on (needs the tracker); in code also a callable
    band: tuple[int, int] | Literal["danger_zone"] | None = None  # [begin, end) timesteps passed as band=;
    # "danger_zone": the danger-zone tracker's live band, followed while the rule is on (needs the tracker); in code
    # also a DangerZone or a callable returning one
    name: str | None = None  # key in the state and alarms; default "<action><-<signal>"

    def __post_init__(self) -> None:
        if self.threshold is None and self.rise_factor is None:
            raise ValueError(f"rule on {self.signal!r}: give a threshold and/or a rise_factor, found neither")
        if self.direction not in ("above", "below"):
            raise ValueError(
                f"rule on {self.signal!r}: direction must be 'above' or 'below', found {self.direction!r}"
            )
        if self.rise_factor is not None:
            ok = self.rise_factor > 1 if self.direction == "above" else 0 < self.rise_factor < 1
            if not ok:
                want = "> 1" if self.direction == "above" else "in (0, 1)"
                raise ValueError(f"rule on {self.signal!r}: rise_factor must be {want} for direction "
                                 f"{self.direction!r}, found {self.rise_factor}")
        if self.patience < 1 or self.release_patience < 1:
            raise ValueError(f"rule on {self.signal!r}: patience and release_patience count checks and must be >= 1; "
                             f"found {self.patience}, {self.release_patience}")
        if not 0 < self.release_fraction <= 1:
            raise ValueError(f"rule on {self.signal!r}: release_fraction must be in (0, 1], found "
                             f"{self.release_fraction}")
        if isinstance(self.strength, str) and self.strength != "danger_zone":
            raise ValueError(f"rule on {self.signal!r}: strength must be a number or 'danger_zone', found "
                             f"{self.strength!r}")
        if isinstance(self.strength, (int, float)) and self.strength < 0:
            raise ValueError(f"rule on {self.signal!r}: strength must be >= 0, found {self.strength}")
        if self.name is None:
            self.name = f"{self.action}<-{self.signal}"
        if self.threshold is not None and self.rise_factor is None and self.release is not None:
            self.levels(None)  # validates the explicit release against the threshold now

    def beyond(self, value: float, level: float) -> bool:
        """Whether ``value`` is on the memorizing side of ``level``."""
        return value > level if self.direction == "above" else value < level

    def levels(self, first: float | None) -> tuple[float, float]:
        """``(on_level, release_level)`` given the first measured value (unused without a rise factor)."""
        candidates = [] if self.threshold is None else [float(self.threshold)]
        if self.rise_factor is not None:
            if first is None:
                raise ValueError(f"rule {self.name!r} needs its first value to compute the rise-factor level")
            candidates.append(self.rise_factor * first)
        on = max(candidates) if self.direction == "above" else min(candidates)
        if self.release is not None:
            release = float(self.release)
        else:
            gap = (1 - self.release_fraction) * abs(on)
            release = on - gap if self.direction == "above" else on + gap
        if self.beyond(release, on):
            side = "above" if self.direction == "above" else "below"
            raise ValueError(f"rule {self.name!r}: the release level {release} must not be {side} the on-level {on}")
        return on, release


@dataclass
class EarlyStoppingSettings:
    """Lightning's ``EarlyStopping`` vocabulary; patience counts checks (fresh values of ``monitor``)."""

    enabled: bool = False
    monitor: str = ""  # a metric key, e.g. "mem/probe_loss/band=low/contrast"
    mode: Literal["min", "max"] = "min"
    patience: int | None = 3  # checks without improvement before stopping (None: never for that reason)
    min_delta: float = 0.0
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None  # stop at once when the metric is this bad
    check_finite: bool = True  # stop when the metric is NaN or infinite
    start_from_step: int = 0  # no stopping before this optimizer step
    strict: bool = True  # a metric that does not appear is an error (else one warning, and early stopping is off)
    expect_by_step: int | None = None  # the step by which the metric must have appeared; None: no deadline
    divergence_patience: int = 1  # checks in a row beyond divergence_threshold before stopping (Lightning: 1)
    rollback: Literal["best", "last_good"] = "best"  # rollback target: best-scoring check, or the last check before
    # the stop (each check that does not stop saves a checkpoint)


@dataclass
class NonFiniteConfig:
    """What happens when the loss or a gradient is NaN or infinite (``guard.non_finite``). It protects the run, not a
    memorization signal, so it applies even with ``enabled: false``. The step is never applied (with
    ``Guard(optimizer=...)``: the optimizer skips it, so weights and Adam's moments stay as they were)."""

    max_skipped_steps: int = 0  # consecutive non-finite steps skipped before the run stops (0: stop at the first)

    def __post_init__(self) -> None:
        _at_least("guard.non_finite", {"max_skipped_steps": self.max_skipped_steps}, 0)


@dataclass
class DashboardConfig:
    """The TensorBoard dashboard (``guard.dashboard``)."""

    enabled: bool = True  # guard/ verdict group, per-band runs, custom scalars, histograms, images, alarms, hparams
    layout: bool = True  # write the custom-scalars layout
    margin_charts: bool = False  # mean ± std margin charts over probes (and their _lo/_hi tags)
    histograms: bool = True  # per-probe histograms at every check
    images: bool = True  # generation | nearest | curvature map panels at curvature checks
    alarms: bool = True  # alarm text from the policy
    hparams: bool = True  # the run's settings in TensorBoard's HParams (in the training run; no hparam/* scalars)
    image_size: int = 96  # minimum displayed tile size in pixels (small images are enlarged, nearest neighbour)
    colormap: str = "inferno"  # matplotlib colormap of the curvature maps

    def __post_init__(self) -> None:
        _at_least("guard.dashboard", {"image_size": self.image_size}, 1)


@dataclass
class ReportConfig:
    """The end-of-run report (``guard.report``)."""

    enabled: bool = True  # report.md + summary.json at the end; mnemoguard_* metadata in the export
    directory: str = "report"  # relative to the output directory
    plots: bool = True  # PNG plots next to report.md
    stamp_export: bool = True  # add the memorization metadata to the exported *.safetensors files
    nn_ratio_threshold: float = 1.0 / 3.0  # Gu et al.: d1/d2 below this = a copy of the nearest training image
    heldout_factor: float = 1.5  # a probe value this far beyond every held-out value makes it "suspect"
    min_flags: int = 3  # per-step low-loss flags that make a probe "suspect"

    def __post_init__(self) -> None:
        if self.min_flags < 1 or self.heldout_factor < 1 or self.nn_ratio_threshold <= 0:
            raise ConfigError("guard.report: expected min_flags >= 1, heldout_factor >= 1, nn_ratio_threshold > 0; "
                              f"found {self.min_flags}, {self.heldout_factor}, {self.nn_ratio_threshold}")


@dataclass
class GuardConfig:
    """The ``guard:`` section of a recipe (or the config handed to :class:`mnemoguard.Guard`)."""

    enabled: bool = False  # master switch: nothing below runs unless true
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    loss_flags: LossFlagsConfig = field(default_factory=LossFlagsConfig)
    noise_gap: NoiseGapConfig = field(default_factory=NoiseGapConfig)
    policy: list[Rule] = field(default_factory=list)
    default_policy: bool = False  # add default_policy()'s mitigation (duplicate_weight from step 0; needs the monitor)
    # name -> settings, e.g. {wen_filter: {threshold: 4.0}, iet_agc: {enabled: false}}; names are those of
    # mnemoguard.config.regularizers.REGULARIZER_CONFIGS, settings the fields of each one's config class.
    regularizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    early_stopping: EarlyStoppingSettings = field(default_factory=EarlyStoppingSettings)
    danger_zone: DangerZoneConfig = field(default_factory=DangerZoneConfig)
    default_stop: bool = False  # early stopping on mem/danger_zone/copy_rate_lower (danger_zone.default_stop();
    # turns the tracker on), rolling back to the last check before the stop
    non_finite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass
class DefaultPolicy:
    """The guard's default mitigation: rules, plus the settings of the actions (on from the start, or
    ``enabled: false`` for those a rule switches on)."""

    rules: list[Rule]
    regularizers: dict[str, dict[str, Any]]  # name -> settings


def default_policy() -> DefaultPolicy:
    """The guard's default mitigation, chosen on the testbeds (docs/guard.md, "Defaults and the evidence behind
    them"; BENCHMARKS.md, issue 19): ``duplicate_weight`` from the first step, each sample's loss times ``1/m``, ``m``
    the copies of its image in the data set (the monitor's duplicate scan). It needs no signal to act on: it changes
    nothing for an image seen once, and duplicated images are what diffusion models reproduce (Carlini et al. 2023,
    Somepalli et al. 2023). On digits, animals and the flow-matching testbed it left no copies in any seed measured,
    where the previous default (IET-AGC's low-loss gating switched on when ``mem/danger_zone/excess`` reaches 0.5)
    left up to 0.42 of the unmitigated copies; that rule can still be written as a ``guard.policy`` item
    (``{signal: mem/danger_zone/excess, action: iet_agc, threshold: 0.5, release: 0.25, release_patience: 2}`` with
    ``regularizers: {iet_agc: {enabled: false}}``). A caption repeated over different images is not a duplicate
    here: the danger-zone tracker and the default stop watch for that."""
    return DefaultPolicy(rules=[], regularizers={"duplicate_weight": {}})
