"""A LoRA file as other trainers save it: kohya's format and file names, SimpleTuner's folder layout.

Used to check that ``mnemoguard audit`` gives the same numbers whichever trainer wrote a checkpoint
(tests/audit, BENCHMARKS.md "Audit"). The conversions are diffusers' own (``convert_unet_state_dict_to_peft``,
``convert_state_dict_to_kohya``); the metadata keys are kohya's (``ss_*``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

__all__ = ["as_kohya", "as_simpletuner", "lora_alpha"]


def _peft_keys(file: Path, prefix: str) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    state = load_file(str(file))
    sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return {f"{prefix}.{k}": v for k, v in convert_unet_state_dict_to_peft(sub).items()}


def lora_alpha(file: Path) -> float | None:
    """The ``lora_alpha`` of a diffusers LoRA file's adapter metadata, when it holds one."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    for key, value in meta.items():
        if key.endswith("lora_adapter_metadata"):
            try:
                return float(json.loads(value)["lora_alpha"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def as_kohya(file: Path, out: Path, name: str, step: int, alpha: float, prefix: str = "unet",
             train_data_dir: str | None = None) -> Path:
    """Write the LoRA ``file`` (diffusers keys ``<prefix>.*``) as kohya's sd-scripts does: ``lora_unet_*`` keys
    with ``lora_down`` / ``lora_up`` / ``alpha`` (= ``alpha``), ``ss_*`` metadata (``ss_steps`` = ``step``) and the
    name ``<name>-step<step:08d>.safetensors`` in ``out``."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    kohya = convert_state_dict_to_kohya(_peft_keys(file, prefix))
    kohya = {k: (torch.tensor(float(alpha), dtype=v.dtype) if k.endswith(".alpha") else v.contiguous())
             for k, v in kohya.items()}
    meta = {"ss_steps": str(step), "ss_network_module": "networks.lora", "ss_network_alpha": str(alpha),
            "ss_output_name": name}
    if train_data_dir is not None:
        meta["ss_train_data_dir"] = train_data_dir
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}-step{step:08d}.safetensors"
    save_file(kohya, str(target), metadata=meta)
    return target


def as_simpletuner(file: Path, out: Path, step: int) -> Path:
    """Copy the LoRA ``file`` into SimpleTuner's layout: ``out/checkpoint-<step>/pytorch_lora_weights.safetensors``
    (PEFT / diffusers keys, as SimpleTuner saves them)."""
    target = out / f"checkpoint-{step}"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file, target / "pytorch_lora_weights.safetensors")
    return target
