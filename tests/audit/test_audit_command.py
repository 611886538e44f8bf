"""``mnemoguard audit`` on LoRAs of a tiny model as other trainers save them."""

from __future__ import annotations

import csv
import os

import pytest

from mnemoguard.cli import main

from .conftest import STEPS, audit_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

NUMBERS = ("step", "verdict", "excess", "copy_rate", "heldout_copy_rate", "band_sigma_lo", "band_sigma_hi")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def kohya_audit(audit_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("kohya_audit")
    assert main(audit_args(audit_case, out, audit_case["kohya"])) == 0
    return out


def test_audit_of_kohya_loras_writes_every_output(kohya_audit, audit_case):
    rows = _rows(kohya_audit / "audit.csv")
    assert [int(r["step"]) for r in rows] == list(STEPS)
    assert {r["step_source"] for r in rows} == {"metadata"} and {r["format"] for r in rows} == {"kohya"}
    assert all(r["verdict"] in ("ok", "rising", "copying") for r in rows)
    images = _rows(kohya_audit / "images.csv")
    assert len(images) == 20  # 20 distinct images: the exact copies of 0, 1, 2 are one image each
    repeats = {r["file"].rsplit("/", 1)[-1]: int(r["repeats"]) for r in images}
    assert repeats["d0000_0.png"] == 4 and repeats["d0002_0.png"] == 3 and repeats["d0005_0.png"] == 1
    assert all(f"score@{s}" in images[0] for s in STEPS)
    html = (kohya_audit / "index.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html and "http" not in html.split(
        "</style>")[1].split("Written by")[0]
    assert "Recommended" in (kohya_audit / "report.md").read_text()


def test_simpletuner_layout_and_the_original_files_give_the_same_numbers(kohya_audit, audit_case, tmp_path):
    assert main(audit_args(audit_case, tmp_path / "st", audit_case["simpletuner"])) == 0
    assert main(audit_args(audit_case, tmp_path / "orig", *audit_case["diffusers"])) == 0
    k, s, o = (_rows(p / "audit.csv") for p in (kohya_audit, tmp_path / "st", tmp_path / "orig"))
    assert [[r[c] for c in NUMBERS] for r in s] == [[r[c] for c in NUMBERS] for r in o]
    assert [[r[c] for c in NUMBERS] for r in k] == [[r[c] for c in NUMBERS] for r in o]
    score = [c for c in _rows(kohya_audit / "images.csv")[0] if c.startswith(("score@", "ratio@", "wen@"))]
    for a, b in ((kohya_audit, tmp_path / "orig"), (tmp_path / "st", tmp_path / "orig")):
        ia, ib = _rows(a / "images.csv"), _rows(b / "images.csv")
        assert [[r["file"], *(r[c] for c in score)] for r in ia] == [[r["file"], *(r[c] for c in score)] for r in ib]


def test_a_rerun_with_one_more_checkpoint_measures_only_the_new_one(audit_case, tmp_path):
    files = audit_case["diffusers"]
    assert main(audit_args(audit_case, tmp_path, *[f.parent for f in files[:2]])) == 0
    assert main(audit_args(audit_case, tmp_path, *[f.parent for f in files])) == 0
    rows = _rows(tmp_path / "audit.csv")
    assert [r["cached"] for r in rows] == ["true", "true", "false"]


def test_lycoris_and_truncated_files_are_one_line_and_the_others_still_measured(audit_case, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "mixed"
    folder.mkdir()
    lokr = {"lora_unet_down_blocks_0_attn.lokr_w1": torch.zeros(2, 2),
            "lora_unet_down_blocks_0_attn.lokr_w2": torch.zeros(2, 2)}
    save_file(lokr, str(folder / "style-step00000050.safetensors"))
    data = audit_case["diffusers"][0].read_bytes()
    (folder / "cut-step00000150.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "good-step00000100.safetensors").write_bytes(data)
    assert main(audit_args(audit_case, tmp_path / "out", folder)) == 0
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    err = [line for line in lines if line.startswith("mnemoguard audit: skipped")]
    assert len(err) == 2
    assert "LyCORIS" in err[0] and "style-step00000050" in err[0]
    assert "not a readable safetensors file" in err[1] and "cut-step00000150" in err[1]
    rows = _rows(tmp_path / "out" / "audit.csv")
    assert [r["step"] for r in rows] == ["100"]


def test_a_lora_of_another_model_is_one_line_naming_the_modules(audit_case, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"unet.mid_block.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight": torch.zeros(4, 64),
               "unet.mid_block.attentions.0.transformer_blocks.0.attn9.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(bad))
    assert main(audit_args(audit_case, tmp_path / "out", bad)) == 2
    err = capsys.readouterr().err
    assert "does not fit the base model" in err and "attn9" in err


def test_bad_input_is_one_line(audit_case, tmp_path, capsys):
    assert main(["audit", "--base", str(tmp_path / "nope"), "--checkpoints", str(audit_case["kohya"]),
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base" in err[0]
    assert main(["audit", "--base", str(audit_case["recipe"]), "--checkpoints", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
