"""The recipe: typed dataclasses with commented defaults (model / data / training / ema / validation / logging /
guard). The defaults *are* the CPU demo (a tiny pixel-space UNet on sklearn digits with the real MiniLM text encoder),
so ``mnemoguard demo`` needs no file. No torch here: reading and checking a recipe is fast."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .checks import check_guard_config
from .guard import GuardConfig
from .schema import load_dataclass

__all__ = ["FAMILIES", "WEIGHTING_SCHEMES", "DataConfig", "EMASettings", "LoggingConfig", "LoraSettings",
           "ModelConfig", "RecipeConfig", "TinyModelConfig", "TrainingConfig", "ValidationConfig", "load_config"]


FAMILIES = ("sd", "sdxl", "sd3", "flux")  # SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1
WEIGHTING_SCHEMES = ("none", "uniform", "sigma_sqrt", "cosmap", "logit_normal", "mode")  # diffusers' flow densities


@dataclass
class TinyModelConfig:
    """The CPU-sized model built from configs when ``model.pretrained`` is empty (any family: ``model.family``)."""

    sample_size: int = 16  # network input size (pixels in pixel space, latents with a VAE)
    channels: int = 1  # image channels: 1 = grayscale, 3 = RGB
    latent: bool = False  # True: train in the latent space of a tiny AutoencoderKL (images are 2x sample_size)
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])  # UNets (sd, sdxl)
    layers_per_block: int = 1  # UNets
    attention_head_dim: int = 8  # UNets and transformers
    num_attention_heads: int = 4  # transformers (sd3, flux)
    num_layers: int = 4  # transformers: SD3's joint blocks, Flux's double-stream blocks
    num_single_layers: int = 2  # Flux's single-stream blocks
    patch_size: int = 2  # SD3's patch size (Flux always packs 2x2 patches)
    flow_shift: float = 1.0  # flow matching: FlowMatchEulerDiscreteScheduler's shift (SD3 ships 3.0)
    text_encoder: Literal["minilm", "clip"] = "minilm"  # minilm: real pretrained all-MiniLM-L6-v2 (384-d); clip: tiny
    text_max_length: int = 16  # tokens per caption
    beta_schedule: str = "squaredcos_cap_v2"  # DDPM families
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # DDPM families (flow models predict velocity)
    seed: int = 0  # weight-initialisation seed
    base: str | None = None  # initial UNet weights: "builtin:digits16" (shipped, see trainer/base_model.py) or a
    # diffusers UNet folder trained with these settings; None = random initialisation


@dataclass
class LoraSettings:
    """peft LoRA on the attention projections of the UNet or transformer (diffusers' LoRA scripts' defaults)."""

    enabled: bool = False
    rank: int = 4
    alpha: float = 4.0  # lora_alpha; scale = alpha / rank
    dropout: float = 0.0
    init: str = "gaussian"  # init_lora_weights
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])


@dataclass
class ModelConfig:
    pretrained: str | None = None  # local diffusers directory (or a hub id when online); None = tiny model
    family: Literal["sd", "sdxl", "sd3", "flux"] | None = None  # None: the pretrained pipeline's (model_index.json),
    # "sd" for the tiny model
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16"
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # override a DDPM scheduler's; None = keep
    guidance_scale: float = 3.5  # Flux: the guidance embedding's value in training (diffusers' --guidance_scale)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataConfig:
    source: str = "builtin:digits"  # builtin:digits | an imagefolder with metadata.jsonl | a save_to_disk dir
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 16  # images are resized (shorter side) then cropped to this size
    center_crop: bool = True  # False = random crop
    random_flip: bool = False
    max_samples: int | None = None  # keep the first N rows (debugging, tests)
    skip_bad_samples: bool = False  # True: count, log and skip unreadable images / missing captions
    num_workers: int = 0


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/train"  # `mnemoguard demo` writes outputs/demo: the two never share a folder
    seed: int = 0
    max_train_steps: int = 600  # optimizer steps (after gradient accumulation)
    train_batch_size: int = 32  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    scale_lr: bool = False  # multiply lr by batch size x accumulation x processes
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    noise_offset: float = 0.0
    snr_gamma: float | None = None  # DDPM families: Min-SNR weighting (5.0 recommended); None = plain MSE
    weighting_scheme: Literal["none", "uniform", "sigma_sqrt", "cosmap", "logit_normal", "mode"] = "none"  # flow
    # matching: diffusers' timestep density (logit_normal, mode) or loss weighting (sigma_sqrt, cosmap)
    logit_mean: float = 0.0  # logit_normal
    logit_std: float = 1.0  # logit_normal
    mode_scale: float = 1.29  # mode
    caption_dropout: float = 0.1  # probability of training on the empty caption (classifier-free guidance)
    checkpointing_steps: int = 200
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # a checkpoint dir or "latest"
    overwrite_output_dir: bool = False  # replace an earlier run in output_dir (otherwise that is an error)
    log_every: int = 10  # optimizer steps between scalar logs
    export: Literal["last", "best", "ema"] = "last"  # final weights: last, best (early stopping's best
    # checkpoint) or ema


@dataclass
class EMASettings:
    enabled: bool = True
    decay: float = 0.9999  # largest decay; the warm-up schedule (1+t)/(10+t) lags about t/10 steps
    lag: float | None = None  # horizon in optimizer steps (sets decay = lag / (lag + 1)); None = use decay
    update_after_step: int = 0
    use_ema_warmup: bool = False
    snapshot_every: int = 0  # copy live weights into a ring every N steps (0 = off)
    num_snapshots: int = 0
    device: str | None = None  # e.g. "cpu" to keep EMA weights off the GPU


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=lambda: ["a handwritten digit zero", "a handwritten digit seven"])
    every_n_steps: int = 200  # 0 = only at the end
    num_images_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 1.0
    seed: int = 0


@dataclass
class LoggingConfig:
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    logging_dir: str = "logs"  # relative to output_dir
    progress_bar: bool = True


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ema: EMASettings = field(default_factory=EMASettings)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)  # memorization monitor and actions (off by default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(
    recipe: str | Path | dict[str, Any] | RecipeConfig | None = None, overrides: list[str] | None = None
) -> RecipeConfig:
    """A :class:`RecipeConfig` from a YAML file (or dict), then ``key.path=value`` overrides; the guard section's names
    (signals, regularizers, actions, bands) are checked too, so a recipe that loads is one that can train."""
    cfg = load_dataclass(RecipeConfig, recipe, overrides)
    check_guard_config(cfg.guard, where="guard")
    return cfg
