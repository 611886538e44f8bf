"""The audit through the model-family seam: LoRAs of tiny SDXL, SD3 and Flux models (the recipes' tiny pipelines)."""

from __future__ import annotations

import csv

import pytest

from mnemoguard.cli import main

from .conftest import save_random_lora


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_lora_of_each_family_is_audited(family, audit_case, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  family: {family}\n  tiny: {{text_encoder: clip}}\n  lora: {{rank: 4, alpha: 4}}\n"
                      f"data:\n  source: {audit_case['data']}\n")
    lora = save_random_lora(recipe, tmp_path / "checkpoint-50", scale=0.05, seed=0, family=family)
    out = tmp_path / "out"
    assert main(["audit", "--base", str(recipe), "--checkpoints", str(lora.parent), "--heldout",
                 str(audit_case["heldout"]), "--out", str(out), "--probes", "2", "--draws", "1", "--steps", "4",
                 "--set", "danger_zone.prior_rows=64", "--set", "danger_zone.prior_probes=32"]) == 0
    with open(out / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["format"]) for r in rows] == [("50", "diffusers")]
    with open(out / "images.csv", newline="") as f:
        images = list(csv.DictReader(f))
    assert len(images) == 20 and all(float(r["wen@50"]) > 0 for r in images)
