"""What the SDXL, SD3 and Flux script shapes share (our own code, the flow of diffusers' example scripts): arguments,
the accelerator, a captioned digits dataset with ``original_sizes`` / ``crop_top_lefts``, LoRA save / load hooks
through the family's pipeline class, ``checkpoint-N`` rotation and ``--resume_from_checkpoint latest``, and the
record the tests compare. The guard's lines are in each family's script, as the README shows them."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None, family: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--guard_config", default=None, help="a guard: section (YAML); none: a disabled guard (a "
                   "pass-through: the loop's own timestep draw, the plain mean loss)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=4)
    p.add_argument("--checkpointing_steps", type=int, default=2)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", default="no")
    p.add_argument("--max_train_samples", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true")
    if family == "sd":
        p.add_argument("--lora", action="store_true", help="train_text_to_image_lora.py's flow (else the full UNet)")
        p.add_argument("--use_ema", action="store_true")
        p.add_argument("--guard_after_load_state", action="store_true", help="the mistake the guard must name")
        p.add_argument("--end_on_main_process_only", action="store_true", help="the mistake the guard must name: "
                       "guard.end inside `if accelerator.is_main_process:`")
    if family in ("sd3", "flux"):  # diffusers' flow-matching script arguments and defaults
        p.add_argument("--weighting_scheme", default="logit_normal" if family == "sd3" else "none",
                       choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"])
        p.add_argument("--logit_mean", type=float, default=0.0)
        p.add_argument("--logit_std", type=float, default=1.0)
        p.add_argument("--mode_scale", type=float, default=1.29)
        p.add_argument("--max_sequence_length", type=int, default=16)
    if family == "sd3":
        p.add_argument("--precondition_outputs", type=int, default=1)
    if family == "flux":
        p.add_argument("--guidance_scale", type=float, default=3.5)
    args = p.parse_args(argv)
    args.guard_config = args.guard_config or {"enabled": False}
    return args


def make_accelerator(args: argparse.Namespace) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                                    logging_dir=os.path.join(args.output_dir, "logs")),
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if multi and not torch.cuda.is_available() else [],
    )
    set_seed(args.seed)
    return accelerator


def digits_dataset(n: int, resolution: int):
    """sklearn's digits as a ``datasets`` DatasetDict (RGB ``image``, ``text``), upscaled to ``resolution``."""
    import datasets

    from mnemoguard.data import digits_dataset as digits

    rows = digits().select(range(n)).cast_column("image", datasets.Image())
    rows = rows.map(lambda r: {"image": r["image"].convert("RGB").resize((resolution, resolution))})
    return datasets.DatasetDict({"train": rows.remove_columns("label")})


def pixel_transform(resolution: int):
    """``examples -> examples`` with ``pixel_values`` ([-1, 1]), ``original_sizes`` and ``crop_top_lefts`` (SDXL's
    micro-conditioning; a centre crop of a square image crops nothing)."""
    from mnemoguard.data import preprocess_image

    def transform(examples: dict) -> dict:
        images = examples["image"]
        examples["pixel_values"] = [preprocess_image(image, resolution, 3) for image in images]
        examples["original_sizes"] = [(image.height, image.width) for image in images]
        examples["crop_top_lefts"] = [(0, 0) for _ in images]
        return examples

    return transform


def lora_hooks(accelerator: Any, pipeline_cls: Any, prefix: str) -> None:
    """accelerate save / load hooks writing the model's LoRA as ``pytorch_lora_weights.safetensors`` (keys
    ``<prefix>.*``), as diffusers' LoRA scripts do."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for m in models:
                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(m)))
                pipeline_cls.save_lora_weights(output_dir, **{f"{prefix}_lora_layers": layers})
                weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            m = accelerator.unwrap_model(models.pop())
            state = load_file(os.path.join(input_dir, "pytorch_lora_weights.safetensors"))
            state = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
            set_peft_model_state_dict(m, convert_unet_state_dict_to_peft(state), adapter_name="default")

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def resume(args: argparse.Namespace, accelerator: Any, num_update_steps_per_epoch: int) -> tuple[int, int, int]:
    """``(global_step, first_epoch, resume_step)`` after ``--resume_from_checkpoint`` (diffusers' logic)."""
    global_step, first_epoch = 0, 0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint != "latest":
            path = os.path.basename(args.resume_from_checkpoint)
        else:
            dirs = [d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")]
            dirs = sorted(dirs, key=lambda x: int(x.split("-")[1]))
            path = dirs[-1] if len(dirs) > 0 else None
        if path is not None:
            accelerator.load_state(os.path.join(args.output_dir, path))
            global_step = int(path.split("-")[1])
            first_epoch = global_step // num_update_steps_per_epoch
    resume_step = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
    return global_step, first_epoch, resume_step


def epochs(args: argparse.Namespace, loader: Any) -> tuple[int, int]:
    per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    return per_epoch, math.ceil(args.max_train_steps / per_epoch)


def sigmas_of(noise_scheduler_copy: Any, device: Any):
    """diffusers' flow scripts' ``get_sigmas``: each timestep's σ looked up in the scheduler copy's tables."""

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(device=device, dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps.to(device)
        timesteps = timesteps.to(device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    return get_sigmas


def save_checkpoint(args: argparse.Namespace, accelerator: Any, global_step: int) -> None:
    if accelerator.is_main_process:
        if args.checkpoints_total_limit is not None:
            found = sorted((d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")),
                           key=lambda x: int(x.split("-")[1]))
            for old in found[: max(0, len(found) - args.checkpoints_total_limit + 1)]:
                shutil.rmtree(os.path.join(args.output_dir, old))
        accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))


def record(args: argparse.Namespace, accelerator: Any, model: Any, global_step: int, guard: Any) -> dict:
    """The weights (and their checksum) and the guard's state, per rank; written with ``--record``."""
    weights = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    result = {"global_step": global_step, "rank": accelerator.process_index, "world": accelerator.num_processes,
              "checksum": float(sum(w.double().sum() for w in weights.values())),
              "guard": None if not guard.enabled else {
                  "state_global_step": guard.global_step, "stop_reason": guard.stop_reason, "metrics": guard.metrics,
                  "history": guard.monitor.history if guard.monitor else []}}
    if args.record:
        Path(args.output_dir, f"record{accelerator.process_index}.json").write_text(json.dumps(result))
    accelerator.end_training()
    return {**result, "weights": weights, "guard_object": guard}
