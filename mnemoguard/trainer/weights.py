"""The trained UNet on disk, in diffusers' formats: ``unet/`` for a full fine-tune,
``pytorch_lora_weights.safetensors`` for a LoRA (what ``StableDiffusionPipeline.load_lora_weights`` reads). Used for
checkpoints (accelerate's model save / load hooks), the rollback to the best checkpoint and the final export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["load_unet", "register_model_hooks", "save_unet"]


def save_unet(unet: nn.Module, directory: Path, lora: bool, state_dict: dict | None = None) -> None:
    """Write ``unet`` (unwrapped) into ``directory`` (``state_dict``: its weights when the module does not hold them
    whole, e.g. gathered ZeRO-3 partitions)."""
    if lora:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=state_dict))
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
    else:
        unet.save_pretrained(directory / "unet", state_dict=state_dict)


def load_unet(unet: nn.Module, directory: Path, lora: bool) -> None:
    """Read what :func:`save_unet` wrote into ``unet`` (unwrapped), in place; unexpected LoRA keys are an error."""
    if lora:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        state, _ = StableDiffusionPipeline.lora_state_dict(directory)
        state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"LoRA checkpoint {directory} has unexpected keys: {result.unexpected_keys[:5]}")
    else:
        from diffusers import UNet2DConditionModel

        loaded = UNet2DConditionModel.from_pretrained(directory, subfolder="unet")
        unet.register_to_config(**loaded.config)
        unet.load_state_dict(loaded.state_dict())
        del loaded


def register_model_hooks(accelerator: Any, lora: bool) -> None:
    """accelerate's model save / load hooks: checkpoints hold the UNet in diffusers' format (as diffusers' scripts
    do); under DeepSpeed the engine's own checkpoint is used instead."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if not weights:  # DeepSpeed saves its own engine checkpoint
            return
        if accelerator.is_main_process:
            for model in models:
                save_unet(accelerator.unwrap_model(model), Path(output_dir), lora)
        weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            load_unet(accelerator.unwrap_model(models.pop()), Path(input_dir), lora)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
