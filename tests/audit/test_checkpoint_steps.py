"""Each trainer's checkpoint names and metadata give the step."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from mnemoguard.audit import find_checkpoints, lora_format


def _lora(path, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path), metadata=metadata)
    return path


def test_steps_from_each_trainers_names_metadata_and_order(tmp_path):
    _lora(tmp_path / "a" / "mylora-step00000300.safetensors")  # kohya sd-scripts / musubi-tuner
    _lora(tmp_path / "a" / "job_000000200.safetensors")  # ai-toolkit
    _lora(tmp_path / "a" / "2026-12-07_10-00-00-save-500-2-40.safetensors")  # OneTrainer
    _lora(tmp_path / "a" / "checkpoint-100" / "pytorch_lora_weights.safetensors")  # diffusers, SimpleTuner
    _lora(tmp_path / "a" / "named.safetensors", {"ss_steps": "400"})  # kohya's final file: ss_steps
    _lora(tmp_path / "a" / "zzz.safetensors")  # nothing: after the others, in order
    found = find_checkpoints([tmp_path / "a"])
    assert [(c.step, c.step_source) for c in found] == [(100, "name"), (200, "name"), (300, "name"),
                                                         (400, "metadata"), (500, "name"), (501, "order")]


def test_lora_formats_are_told_apart():
    assert lora_format(["lora_unet_down_0.lora_down.weight"]) == "kohya"
    assert lora_format(["unet.down.0.to_q.lora_A.weight"]) == "peft"
    assert lora_format(["unet.down.0.to_q.lora.down.weight"]) == "diffusers"
    assert lora_format(["lora_unet_down_0.lokr_w1"]) == "lycoris"
    assert lora_format(["model.weight"]) == "unknown"
