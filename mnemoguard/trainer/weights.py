"""The trained network on disk, in diffusers' formats: ``unet/`` or ``transformer/`` for a full fine-tune,
``pytorch_lora_weights.safetensors`` for a LoRA (what the family's pipeline ``load_lora_weights`` reads: keys
``unet.*`` for SD / SDXL, ``transformer.*`` for SD3 / Flux). Used for checkpoints (accelerate's model save / load
hooks), the rollback to the best checkpoint and the final export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .models import MODEL_FOLDERS, PIPELINES

__all__ = ["load_model", "register_model_hooks", "save_model"]


def save_model(model: nn.Module, directory: Path, lora: bool, family: str, state_dict: dict | None = None) -> None:
    """Write ``model`` (unwrapped) into ``directory`` (``state_dict``: its weights when the module does not hold them
    whole, e.g. gathered ZeRO-3 partitions)."""
    if lora:
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, state_dict=state_dict))
        key = f"{MODEL_FOLDERS[family]}_lora_layers"
        getattr(diffusers, PIPELINES[family]).save_lora_weights(directory, **{key: layers}, safe_serialization=True)
    else:
        model.save_pretrained(directory / MODEL_FOLDERS[family], state_dict=state_dict)


def load_model(model: nn.Module, directory: Path, lora: bool, family: str) -> None:
    """Read what :func:`save_model` wrote into ``model`` (unwrapped), in place; unexpected LoRA keys are an error."""
    if lora:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        prefix = f"{MODEL_FOLDERS[family]}."
        state = load_file(str(directory / "pytorch_lora_weights.safetensors"))
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(state), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"LoRA checkpoint {directory} has unexpected keys: {result.unexpected_keys[:5]}")
    else:
        loaded = type(model).from_pretrained(directory, subfolder=MODEL_FOLDERS[family])
        model.register_to_config(**loaded.config)
        model.load_state_dict(loaded.state_dict())
        del loaded


def register_model_hooks(accelerator: Any, lora: bool, family: str) -> None:
    """accelerate's model save / load hooks: checkpoints hold the network in diffusers' format (as diffusers' scripts
    do); under DeepSpeed the engine's own checkpoint is used instead."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if not weights:  # DeepSpeed saves its own engine checkpoint
            return
        if accelerator.is_main_process:
            for model in models:
                save_model(accelerator.unwrap_model(model), Path(output_dir), lora, family)
        weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            load_model(accelerator.unwrap_model(models.pop()), Path(input_dir), lora, family)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
