"""What an audit is asked to do: :class:`AuditSettings` (the command line's options, typed, with their defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DataError

__all__ = ["AuditSettings", "DTYPES"]

DTYPES = ("float32", "bfloat16", "float16")
AUDIT_STEPS = 25  # sampler steps of the measurement (the live guard: 10)
AUDIT_AT_RISK_PROBES = 8  # at-risk probes (the live guard: 4)
POOL_IMAGES = 4096  # training images in the return test's reference pool (the live guard: 64 besides the probes)
POOL_BYTES = 2 << 30  # ... and at most this much of them, as float32 pixels


@dataclass
class AuditSettings:
    """The settings of ``mnemoguard audit`` (``mnemoguard audit --help`` documents each)."""

    base: str  # a diffusers pipeline folder (any supported family) or a recipe YAML (its model: and data: sections)
    checkpoints: list[str]  # LoRA files, checkpoint-N folders, model folders, or folders of them
    out: str = "audit"  # where audit.csv, images.csv, report.md, index.html and the cache go
    data: str | None = None  # the training images; None: the recipe's data, else the checkpoints' metadata
    heldout: str | None = None  # held-out images (never trained); None: random training rows stand in
    image_column: str = "image"
    caption_column: str = "text"
    device: str | None = None  # cpu | cuda | cuda:N; None: cuda when available
    dtype: str = "float32"  # of the model during the measurement
    batch_size: int = 16  # rows per network call
    seed: int = 1234  # probes, noise draws (the same draws at every checkpoint)
    resolution: int | None = None  # training resolution in pixels; None: the recipe's, else the model's
    probes: int | None = None  # at-risk, random and held-out probes (each); None: 8 at-risk, the guard's 4 others
    draws: int | None = None  # noise draws per probe and level
    num_inference_steps: int | None = None  # sampler steps of the measurement and the generations; None: 25
    guidance_scale: float | None = None  # guidance of the generations (1: the conditional model)
    copy_ratio: float | None = None  # Gu et al.'s d1/d2 below which a generation is a copy
    per_image: bool = True  # the per-image table (one generation and a few denoiser calls per training image)
    overrides: list[str] = field(default_factory=list)  # guard config KEY=VALUE (monitor.*, danger_zone.*)
    tensorboard: bool = False  # also write the curves as TensorBoard scalars under <out>/tensorboard

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise DataError(f"--dtype: expected one of {list(DTYPES)}, found {self.dtype!r}")
        for name in ("batch_size", "probes", "draws", "num_inference_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataError(f"--{name.replace('_', '-')}: expected >= 1, found {value}")
        if self.copy_ratio is not None and not 0 < self.copy_ratio < 1:
            raise DataError(f"--copy-ratio: expected a ratio in (0, 1), found {self.copy_ratio}")
        if not self.checkpoints:
            raise DataError("--checkpoints: expected at least one LoRA file or checkpoint folder, found none")

    def guard_config(self, num_rows: int, values_per_image: int) -> dict:
        """The guard section the audit measures with: the danger-zone tracker at every check, the monitor's probes,
        no EMA (the base model without the checkpoint is the unconditional baseline's model), nothing written. The
        return test's reference pool holds every training image up to :data:`POOL_IMAGES`, and at most
        :data:`POOL_BYTES` of float32 pixels (``values_per_image`` each: 170 RGB images at 1024², 682 at 512²)."""
        pool = min(num_rows, POOL_IMAGES, max(64, POOL_BYTES // (4 * values_per_image)))
        monitor: dict = {"baseline": "uncond", "curvature_every_k_checks": 0, "seed": self.seed,
                         "batch_size": self.batch_size, "nearest_pool_size": pool}
        # Offline, the audit affords more than the live guard's defaults (10 steps, 4 at-risk probes): with them the
        # copy rate lagged the ground truth by 2-3 checkpoints on the 100-planted testbed (BENCHMARKS.md, "Audit").
        monitor["num_duplicate_probes"] = AUDIT_AT_RISK_PROBES
        if self.probes is not None:
            monitor.update(num_duplicate_probes=self.probes, num_random_probes=self.probes,
                           num_heldout_probes=self.probes)
        # The audit's protocol as BENCHMARKS.md measured it (issue 18): the multi-step return at 4 draws, fixed
        # generations; the live guard's defaults became the one-step return at 2 draws with sequential rounds later.
        dz: dict = {"enabled": True, "every_n_checks": 1, "num_inference_steps": AUDIT_STEPS, "draws": 4,
                    "return_steps": 0, "copy_draws_max": 0}
        for key, value in (("draws", self.draws), ("num_inference_steps", self.num_inference_steps),
                           ("guidance_scale", self.guidance_scale), ("copy_ratio", self.copy_ratio)):
            if value is not None:
                dz[key] = value
        return {"enabled": True, "monitor": monitor, "danger_zone": dz, "dashboard": {"enabled": False},
                "report": {"enabled": False}}
