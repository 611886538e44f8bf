"""Typed recipe configuration: dataclasses with commented defaults, loaded from YAML, strict about keys.

The defaults *are* the CPU demo (a tiny pixel-space UNet on sklearn digits with the real MiniLM text encoder), so
``mnemoguard demo`` needs no file. A recipe overrides any subset; an unknown key is an error that lists the valid
keys (nanoGPT's configurator); ``--set section.key=value`` overrides from the command line (values parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .callbacks.guard import GuardConfig


class ConfigError(ValueError):
    """A recipe that does not fit the schema: says which key, what was expected and what was found."""


@dataclass
class TinyModelConfig:
    """The CPU-sized model built from configs when ``model.pretrained`` is empty."""

    sample_size: int = 16  # UNet input size (pixels in pixel space, latents with a VAE)
    channels: int = 1  # image channels: 1 = grayscale, 3 = RGB
    latent: bool = False  # True: train in the latent space of a tiny AutoencoderKL (images are 2x sample_size)
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_encoder: str = "minilm"  # "minilm" (real pretrained all-MiniLM-L6-v2, 384-d) | "clip" (tiny random CLIP)
    text_max_length: int = 16  # tokens per caption
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    seed: int = 0  # weight-initialisation seed
    base: str | None = None  # initial UNet weights: "builtin:digits16" (shipped, see trainer/base_model.py) or a
    # diffusers UNet folder trained with these settings; None = random initialisation


@dataclass
class LoraSettings:
    """peft LoRA on the UNet attention projections (diffusers' train_text_to_image_lora.py defaults)."""

    enabled: bool = False
    rank: int = 4
    alpha: float = 4.0  # lora_alpha; scale = alpha / rank
    dropout: float = 0.0
    init: str = "gaussian"  # init_lora_weights
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])


@dataclass
class ModelConfig:
    pretrained: str | None = None  # local diffusers directory (or a hub id when online); None = tiny model
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16"
    prediction_type: str | None = None  # override the scheduler's (epsilon | v_prediction); None = keep
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
    output_dir: str = "outputs/demo"
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
    mixed_precision: str = "no"  # no | fp16 | bf16
    noise_offset: float = 0.0
    snr_gamma: float | None = None  # Min-SNR weighting (5.0 recommended); None = plain MSE
    caption_dropout: float = 0.1  # probability of training on the empty caption (classifier-free guidance)
    checkpointing_steps: int = 200
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # a checkpoint dir or "latest"
    log_every: int = 10  # optimizer steps between scalar logs
    export: str = "last"  # final weights: last | best (the best checkpoint of early stopping) | ema


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
    report_to: str = "tensorboard"  # tensorboard | none
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


# ----------------------------------------------------------------------------------------------- conversion
_CHOICES = {
    "model.tiny.text_encoder": ("minilm", "clip"),
    "model.tiny.prediction_type": ("epsilon", "v_prediction"),
    "model.prediction_type": (None, "epsilon", "v_prediction"),
    "training.mixed_precision": ("no", "fp16", "bf16"),
    "training.export": ("last", "best", "ema"),
    "logging.report_to": ("tensorboard", "none"),
}


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, found {type(value).__name__} {value!r}")
        return {_convert(k, key_tp, where): _convert(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {choices}, found {value!r}")
        return value
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {type(value).__name__} {value!r}")
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_convert(v, items[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(items):
            raise ConfigError(f"{where}: expected {len(items)} values, found {len(value)}: {value!r}")
        return tuple(_convert(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, found {type(value).__name__}")
        return _from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, found {type(value).__name__} {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, found {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, found {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads "1e-4" as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, found {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, found {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix, scope = (f"{where}.", f" in {where}") if where else ("", "")
        listed = ", ".join(prefix + str(k) for k in unknown)
        raise ConfigError(f"unknown key(s) {listed}; valid keys{scope}: {', '.join(names)}")
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = _convert(value, hints[key], path)
        if path in _CHOICES and kwargs[key] not in _CHOICES[path]:
            raise ConfigError(f"{path}: expected one of {_CHOICES[path]}, found {kwargs[key]!r}")
    return cls(**kwargs)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["training.seed=3", "model.lora.enabled=true"]`` -> nested dict (values parsed as YAML scalars)."""
    data: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, found {item!r}")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: values of ``update`` win; nested mappings are merged key by key."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_mapping(source: Any, what: str = "recipe") -> dict[str, Any]:
    """A YAML file path, a dict or ``None`` -> a dict (``what`` names the file kind in error messages)."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{what} file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
        return data
    raise ConfigError(f"{what}: expected a YAML path or a mapping, found {type(source).__name__}")


def load_dataclass(
    cls: type, source: Any = None, overrides: list[str] | None = None, what: str = "recipe"
) -> Any:
    """Any config dataclass from an instance, a YAML file, a dict or ``None`` (defaults), then ``key.path=value``
    overrides; unknown keys and wrong types are :class:`ConfigError` s that name the key (``what`` names the file
    kind in messages)."""
    data = dataclasses.asdict(source) if isinstance(source, cls) else read_mapping(source, what)
    return _from_dict(cls, merge_dicts(data, parse_overrides(overrides)))


def load_config(
    recipe: str | Path | dict[str, Any] | RecipeConfig | None = None, overrides: list[str] | None = None
) -> RecipeConfig:
    """Build a :class:`RecipeConfig` from a YAML file (or dict), then apply ``key.path=value`` overrides."""
    return load_dataclass(RecipeConfig, recipe, overrides)
