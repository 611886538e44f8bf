"""A tiny base (a recipe: the tiny UNet with the tiny CLIP), a small digits imagefolder with duplicated images,
held-out images, and LoRA checkpoints of it in diffusers', kohya's and SimpleTuner's formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEPS = (100, 200, 300)


def write_digits(folder: Path, indices: list[int], copies: dict[int, int] | None = None) -> Path:
    """An imagefolder of sklearn digits (16 px PNGs) with metadata.jsonl; ``copies[i]`` extra files of image i."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in indices:
        img = Image.fromarray((digits.images[i] / 16 * 255).astype(np.uint8)).resize((16, 16), Image.BILINEAR)
        for c in range(1 + (copies or {}).get(i, 0)):
            name = f"images/d{i:04d}_{c}.png"
            img.save(folder / name)
            rows.append({"file_name": name, "text": f"a digit {NAMES[digits.target[i]]}, sample {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def save_random_lora(recipe: Path, out: Path, scale: float, seed: int, family: str = "sd") -> Path:
    """A LoRA of the recipe's tiny UNet with random weights (``scale``), saved as the reference trainer saves it."""
    from mnemoguard.config import load_config
    from mnemoguard.trainer.models import load_or_build
    from mnemoguard.trainer.weights import save_model

    cfg = load_config(str(recipe), ["model.lora.enabled=true"])
    parts = load_or_build(cfg.model, out.parent / ".build")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in parts.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    out.mkdir(parents=True, exist_ok=True)
    save_model(parts.model, out, lora=True, family=family)
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def audit_case(tmp_path_factory):
    """``{"recipe", "data", "heldout", "diffusers": [files], "kohya": dir, "simpletuner": dir}``."""
    from mnemoguard.testbed.lora_formats import as_kohya, as_simpletuner

    root = tmp_path_factory.mktemp("audit_case")
    data = write_digits(root / "train", list(range(20)), copies={0: 3, 1: 3, 2: 2})
    heldout = write_digits(root / "heldout", list(range(100, 106)))
    recipe = root / "tiny.yaml"
    recipe.write_text(f"model:\n  tiny: {{text_encoder: clip}}\n  lora: {{rank: 4, alpha: 4}}\n"
                      f"data:\n  source: {data}\n")
    files, kohya, simpletuner = [], root / "kohya", root / "simpletuner"
    for k, step in enumerate(STEPS):
        f = save_random_lora(recipe, root / "diffusers" / f"checkpoint-{step}", scale=0.05 * (k + 1), seed=k)
        files.append(f)
        as_kohya(f, kohya, "mylora", step, alpha=4.0)
        as_simpletuner(f, simpletuner, step)
    return {"root": root, "recipe": recipe, "data": data, "heldout": heldout, "diffusers": files, "kohya": kohya,
            "simpletuner": simpletuner}


def audit_args(case: dict, out: Path, *checkpoints: Path | str) -> list[str]:
    """The command line of a quick audit of ``checkpoints`` (few probes, draws and steps)."""
    return ["audit", "--base", str(case["recipe"]), "--checkpoints", *map(str, checkpoints), "--heldout",
            str(case["heldout"]), "--out", str(out), "--probes", "2", "--draws", "1", "--steps", "4", "--device",
            "cpu", "--set", "danger_zone.prior_rows=64", "--set", "danger_zone.prior_probes=32"]
