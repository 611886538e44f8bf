"""The reference trainer on every family: the tiny SDXL, SD3 and Flux recipes train with the guard on (the mem/
scalars reach TensorBoard, the LoRA is saved under the family's keys), a flow-matching run resumes exactly, and the
recipes for real weights load as recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mnemoguard.config import load_config
from mnemoguard.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
GUARD = ("guard.enabled=true", "guard.monitor.every_n_steps=2", "guard.monitor.curvature_every_k_checks=2",
         "guard.monitor.generation_steps=2", "guard.monitor.curvature_hutchinson_probes=2")


def recipe(family: str, out: Path, *overrides: str):
    return load_config(ROOT / "recipes" / f"tiny_{family}_lora.yaml", [
        f"training.output_dir={out}", "training.max_train_steps=4", "model.tiny.text_encoder=clip",
        "data.max_samples=64", "logging.progress_bar=false", *overrides])


def tags(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: set[str] = set()
    for d in {p.parent for p in logdir.rglob("events.out.tfevents*")}:
        acc = EventAccumulator(str(d))
        acc.Reload()
        out |= set(acc.Tags()["scalars"])
    return out


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_tiny_recipe_of_each_family_trains_with_the_guard(family, tmp_path):
    trainer = Trainer(recipe(family, tmp_path, *GUARD))
    state = trainer.train()
    assert state.global_step == 4 and trainer.components.family == family
    written = tags(tmp_path / "logs")
    for sig in ("wen_gap", "probe_loss", "live_vs_ema"):
        assert {f"mem/{sig}/band={b}/train" for b in ("low", "mid", "high")} <= written
    assert "mem/nn_ratio/train" in written and "train/loss" in written
    with safe_open(str(tmp_path / "final" / "pytorch_lora_weights.safetensors"), "pt") as f:
        prefix = "unet." if family == "sdxl" else "transformer."
        assert all(k.startswith(prefix) for k in f.keys()) and f.metadata()["mnemoguard_global_step"] == "4"


def test_a_flow_matching_run_resumes_exactly(tmp_path):
    common = ("training.checkpointing_steps=2", "training.gradient_accumulation_steps=2", *GUARD)
    straight = Trainer(recipe("sd3", tmp_path / "a", *common))
    straight.train()
    Trainer(recipe("sd3", tmp_path / "b", *common, "training.max_train_steps=2")).train()
    resumed = Trainer(recipe("sd3", tmp_path / "b", *common, "training.resume_from_checkpoint=latest"))
    state = resumed.train()
    assert resumed.resumed_from.name == "checkpoint-2" and state.global_step == 4

    def weights(t):
        return {n: p.detach() for n, p in t.accelerator.unwrap_model(t.model).named_parameters()}

    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.guard.monitor.history[-1]["metrics"] == straight.guard.monitor.history[-1]["metrics"]


@pytest.mark.parametrize("name", ["sdxl_lora", "sd35_lora", "flux_lora"])
def test_the_recipes_for_real_weights_load(name):
    cfg = load_config(ROOT / "recipes" / f"{name}.yaml")
    assert cfg.model.pretrained and cfg.model.family in ("sdxl", "sd3", "flux") and cfg.model.lora.enabled
