"""A text-to-image model's parts, loaded from a local diffusers directory or built tiny from configs, offline, for
every family: SD 1.x/2.x and SDXL (``unet/``), SD3/3.5 and FLUX.1 (``transformer/``).

A diffusers pipeline directory holds ``model_index.json`` (its ``_class_name`` names the family), the denoiser's
folder, ``scheduler/``, ``text_encoder[_2[_3]]/``, ``tokenizer[_2[_3]]/`` and ``vae/``. The tiny models may also be
pixel-space (no ``vae/``) and use one text encoder for any family; :meth:`ModelParts.save_pretrained` writes both
kinds, with a ``mnemoguard.json`` describing what is not a diffusers pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FAMILIES, LoraSettings, ModelConfig
from ..family.conditioning import Conditioning
from ..family.latents import LatentCodec
from .text_encoders import TextEncoders

__all__ = ["MODEL_FOLDERS", "PIPELINES", "ModelParts", "SDComponents", "add_lora", "build_tiny_components",
           "detect_family", "load_components", "load_or_build"]

PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}
MODEL_FOLDERS = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
_PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                    "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
_MODEL_CLASSES = {"sd": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel",
                  "flux": "FluxTransformer2DModel"}
_TEXT_CLASSES = {"sd": ("AutoModel",), "sdxl": ("CLIPTextModel", "CLIPTextModelWithProjection"),
                 "sd3": ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
                 "flux": ("CLIPTextModel", "T5EncoderModel")}


def _suffix(i: int) -> str:
    return "" if i == 0 else f"_{i + 1}"


@dataclass
class ModelParts:
    """The parts a text-to-image fine-tune needs. ``vae`` is ``None`` for pixel-space models."""

    model: nn.Module  # the UNet or transformer
    noise_scheduler: object
    text: TextEncoders
    vae: nn.Module | None = None
    family: str = "sd"
    extra: dict[str, Any] = field(default_factory=dict)  # mnemoguard.json (tiny models)

    @property
    def unet(self) -> nn.Module:
        """:attr:`model` (its name when only UNets were supported)."""
        return self.model

    @property
    def text_encoder(self) -> nn.Module:
        return self.text.encoders[0]

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizers[0]

    @property
    def text_max_length(self) -> int | None:
        return self.text.max_length

    @property
    def codec(self) -> LatentCodec:
        return LatentCodec(self.vae)

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def vae_scale_factor(self) -> int:
        return self.codec.scale_factor

    @property
    def sample_size(self) -> int:
        size = getattr(self.model.config, "sample_size", None) or self.extra.get("sample_size")
        if size is None:
            raise ValueError(f"the {self.family} model's config has no sample_size: set data.resolution")
        return int(size if isinstance(size, int) else size[0])

    @property
    def image_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @property
    def image_channels(self) -> int:
        if self.vae is not None:
            return int(self.vae.config.in_channels)
        channels = int(self.model.config.in_channels)
        return channels // 4 if self.family == "flux" else channels

    def encode_prompt(self, captions: list[str], device: torch.device | None = None) -> Conditioning:
        """The captions' conditioning (token + pooled embeddings), batched as given; training and monitoring go
        through a :class:`~mnemoguard.prompts.PromptEncoder` (one caption at a time)."""
        return self.text(captions, device)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the network's input space (a latent *sample*, as training draws it; or the pixels)."""
        return self.codec.encode(pixel_values, sample=True)

    @torch.no_grad()
    def decode(self, model_output: torch.Tensor) -> torch.Tensor:
        """The network's sample space -> images in [-1, 1]."""
        return self.codec.decode(model_output)

    def with_model(self, model: nn.Module) -> ModelParts:
        return ModelParts(model, self.noise_scheduler, self.text, self.vae, self.family, dict(self.extra))

    def save_pretrained(self, directory: str | os.PathLike, model_state_dict: dict | None = None) -> None:
        """Write a directory that :func:`load_components` reads back: a real diffusers pipeline for a latent model
        with the family's own text encoders, the parts in their folders (and ``mnemoguard.json``) otherwise.

        ``model_state_dict``: the network's weights when the module does not hold them whole (ZeRO-3 partitions)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.vae is not None and not self.text.single:
            import diffusers

            parts = {MODEL_FOLDERS[self.family]: self.model, "scheduler": self.noise_scheduler, "vae": self.vae}
            for i, (enc, tok) in enumerate(zip(self.text.encoders, self.text.tokenizers)):
                parts[f"text_encoder{_suffix(i)}"], parts[f"tokenizer{_suffix(i)}"] = enc, tok
            if self.family == "sd":
                parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            getattr(diffusers, PIPELINES[self.family])(**parts).save_pretrained(directory)
        else:
            self.noise_scheduler.save_pretrained(directory / "scheduler")
            for i, (enc, tok) in enumerate(zip(self.text.encoders, self.text.tokenizers)):
                enc.save_pretrained(directory / f"text_encoder{_suffix(i)}")
                tok.save_pretrained(directory / f"tokenizer{_suffix(i)}")
            if self.vae is not None:
                self.vae.save_pretrained(directory / "vae")
        if model_state_dict is not None or self.vae is None or self.text.single:
            self.model.save_pretrained(directory / MODEL_FOLDERS[self.family], state_dict=model_state_dict)
        meta = {"family": self.family, "single_text_encoder": self.text.single,
                "text_max_length": self.text.max_length, **self.extra}
        (directory / "mnemoguard.json").write_text(json.dumps(meta))


SDComponents = ModelParts  # the name of the SD-only releases


# --------------------------------------------------------------------------------------------- loading
def _no_zero3_init():
    """Frozen parts must not be partitioned by ZeRO-3 (diffusers' recipe): disable zero.Init while loading them."""
    try:
        from accelerate.state import AcceleratorState

        plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    except Exception:  # no accelerator state yet
        plugin = None
    return plugin.zero3_init_context_manager(enable=False) if plugin is not None else contextlib.nullcontext()


def detect_family(path: str | os.PathLike) -> str:
    """The family of a local directory: ``mnemoguard.json``, else ``model_index.json``'s pipeline class, else the
    denoiser's folder (``unet/`` = sd, ``transformer/`` needs the index)."""
    path = Path(path)
    meta = path / "mnemoguard.json"
    if meta.is_file() and json.loads(meta.read_text()).get("family"):
        return str(json.loads(meta.read_text())["family"])
    index = path / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        if name in _PIPELINE_FAMILY:
            return _PIPELINE_FAMILY[name]
        raise ValueError(f"{path}: model_index.json names {name!r}; supported pipelines: "
                         f"{sorted(_PIPELINE_FAMILY)} (set model.family for another layout)")
    if (path / "unet").is_dir():
        return "sdxl" if (path / "text_encoder_2").is_dir() else "sd"
    raise FileNotFoundError(f"{path} is not a diffusers model directory: expected model_index.json or unet/")


def load_components(path: str | os.PathLike, revision: str | None = None, variant: str | None = None,
                    family: str | None = None) -> ModelParts:
    """Load a model's parts from a local diffusers directory (or a hub id when online) of any supported family."""
    import diffusers
    import transformers
    from transformers import AutoTokenizer

    path = str(path)
    local = Path(path)
    if not local.exists() and (local.is_absolute() or path.startswith(".") or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise FileNotFoundError(
            f"model.pretrained: no diffusers directory at {path!r} (expected model_index.json, unet/ or transformer/, "
            "scheduler/, text_encoder/, tokenizer/ and optionally vae/ inside; hub ids need network access)"
        )
    if family is None:
        family = detect_family(local) if local.is_dir() else "sd"
    if family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES}, found {family!r}")
    meta_file = local / "mnemoguard.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    single = bool(meta.get("single_text_encoder", False))
    n_text = 1 if single else TextEncoders.NATIVE[family]
    folder = MODEL_FOLDERS[family]
    if local.is_dir():
        needed = [folder, "scheduler"] + [f"{k}{_suffix(i)}" for i in range(n_text) for k in ("text_encoder",
                                                                                             "tokenizer")]
        missing = [d for d in needed if not (local / d).is_dir()]
        if missing:
            listed = ", ".join(d + "/" for d in missing)
            raise FileNotFoundError(f"{path} is not a diffusers {family} model directory: missing {listed}")
    has_vae = (local / "vae").is_dir() if local.is_dir() else True
    kw = {"revision": revision}
    classes = ("AutoModel",) if single else _TEXT_CLASSES[family]
    with _no_zero3_init():
        encoders, tokenizers = [], []
        for i, cls_name in enumerate(classes):
            cls = getattr(transformers, cls_name)
            encoders.append(cls.from_pretrained(path, subfolder=f"text_encoder{_suffix(i)}", variant=variant, **kw))
            tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{_suffix(i)}",
                                                            revision=revision))
        vae = None
        if has_vae:
            vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw)
    model = getattr(diffusers, _MODEL_CLASSES[family]).from_pretrained(path, subfolder=folder, variant=variant, **kw)
    if family in ("sd3", "flux"):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler",
                                                                              revision=revision)
    else:  # diffusers' SD / SDXL scripts train with DDPMScheduler built from the pipeline's scheduler config
        scheduler = diffusers.DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    extra = {k: v for k, v in meta.items() if k not in ("family", "single_text_encoder", "text_max_length")}
    text = TextEncoders(family, encoders, tokenizers, single=single, max_length=meta.get("text_max_length"))
    return ModelParts(model, scheduler, text, vae, family, extra)


def build_tiny_components(cfg: Any, workdir: str | os.PathLike, family: str = "sd") -> ModelParts:
    """A tiny model of ``family`` from configs (:mod:`mnemoguard.trainer.tiny`)."""
    from .tiny import build_tiny

    return build_tiny(cfg, workdir, family)


def add_lora(model: nn.Module, lora: LoraSettings) -> None:
    """Freeze the model and add a peft LoRA adapter; only the adapter's parameters stay trainable."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, init_lora_weights=lora.init,
            target_modules=list(lora.target_modules),
        )
    )


def load_or_build(cfg: ModelConfig, workdir: str | os.PathLike) -> ModelParts:
    """The recipe's model: ``cfg.pretrained`` if set, else the tiny one of ``cfg.family``; prediction type override;
    LoRA if enabled."""
    if cfg.pretrained:
        parts = load_components(cfg.pretrained, cfg.revision, cfg.variant, cfg.family)
    else:
        parts = build_tiny_components(cfg.tiny, workdir, cfg.family or "sd")
    if cfg.prediction_type is not None:
        if parts.family in ("sd3", "flux"):
            raise ValueError(f"model.prediction_type={cfg.prediction_type!r}: a {parts.family} model predicts the "
                             "flow velocity; the override is for DDPM families (sd, sdxl)")
        parts.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    parts.text.freeze()
    if parts.vae is not None:
        parts.vae.requires_grad_(False).eval()
    if cfg.lora.enabled:
        add_lora(parts.model, cfg.lora)
    return parts
