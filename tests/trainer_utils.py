"""Small recipes and readers shared by the trainer tests and the multi-process worker."""

from __future__ import annotations

from pathlib import Path

import torch

from mnemoguard.config import load_config


def tiny_recipe(output_dir, *overrides: str):
    """A few-second CPU run: tiny CLIP text encoder, 64 real digits, batch 8."""
    return load_config(
        None,
        [
            f"training.output_dir={output_dir}",
            "model.tiny.text_encoder=clip",
            "data.max_samples=64",
            "training.train_batch_size=8",
            "training.max_train_steps=6",
            "training.checkpointing_steps=2",
            "training.log_every=1",
            "validation.every_n_steps=0",
            "validation.num_images_per_prompt=1",
            "validation.num_inference_steps=2",
            "logging.progress_bar=false",
            *overrides,
        ],
    )


def unet_weights(trainer) -> dict[str, torch.Tensor]:
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p.parent for p in Path(logdir).rglob("events.out.tfevents.*")]
    out = []
    for run in sorted(set(runs)):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(out)


def image_tags(logdir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for run in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run), size_guidance={"images": 0})
        acc.Reload()
        tags += acc.Tags()["images"]
    return tags
