"""What the audit reads besides the checkpoints: a pipeline folder as the base, the data named in a LoRA's metadata,
kohya's repeat folders; TensorBoard; and an audit killed midway."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mnemoguard.cli import main
from mnemoguard.testbed.lora_formats import as_kohya

from .conftest import audit_args

ROOT = Path(__file__).resolve().parents[2]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pipeline(case: dict, where: Path) -> Path:
    from mnemoguard.config import load_config
    from mnemoguard.trainer.models import load_or_build

    parts = load_or_build(load_config(str(case["recipe"])).model, where / ".build")
    parts.save_pretrained(where / "base")
    return where / "base"


def test_a_pipeline_base_and_the_data_named_in_the_lora_metadata(audit_case, tmp_path):
    base = _pipeline(audit_case, tmp_path)
    lora = as_kohya(audit_case["diffusers"][0], tmp_path / "k", "mylora", 100, alpha=4.0,
                    train_data_dir=str(audit_case["data"]))
    args = audit_args(audit_case, tmp_path / "out", lora)
    args[args.index("--base") + 1] = str(base)
    assert main([*args, "--tensorboard"]) == 0
    assert len(_rows(tmp_path / "out" / "images.csv")) == 20
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    # the same numbers as with the recipe as the base (the same tiny model)
    assert main(audit_args(audit_case, tmp_path / "recipe", lora)) == 0
    drop = ("file", "seconds", "cached")
    one, two = (_rows(tmp_path / d / "audit.csv") for d in ("out", "recipe"))
    assert [{k: v for k, v in r.items() if k not in drop} for r in one] == \
        [{k: v for k, v in r.items() if k not in drop} for r in two]


def test_kohya_repeat_folders_are_duplication(audit_case, tmp_path):
    data = tmp_path / "kohya_data"
    for folder, files in (("6_digits", ["d0005_0", "d0006_0"]), ("1_digits", [f"d00{i:02d}_0" for i in range(7, 15)])):
        (data / folder).mkdir(parents=True)
        for name in files:
            shutil.copy(audit_case["data"] / "images" / f"{name}.png", data / folder / f"{name}.png")
            (data / folder / f"{name}.txt").write_text(f"a digit, sample {name}")
    args = audit_args(audit_case, tmp_path / "out", audit_case["diffusers"][0])
    assert main([*args, "--data", str(data)]) == 0
    repeats = {Path(r["file"]).stem: int(r["repeats"]) for r in _rows(tmp_path / "out" / "images.csv")}
    assert repeats["d0005_0"] == 6 and repeats["d0007_0"] == 1 and len(repeats) == 10


def test_an_audit_killed_midway_keeps_what_it_measured(audit_case, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mnemoguard.cli", *audit_args(audit_case, out, audit_case["kohya"])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "cache").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    measured = len(list((out / "cache").glob("*.json")))
    assert measured >= 1  # a torn write is a .<name>.<pid>.tmp file, never read
    assert main(audit_args(audit_case, out, audit_case["kohya"])) == 0
    cached = [r["cached"] for r in _rows(out / "audit.csv")]
    assert cached.count("true") >= measured and len(cached) == 3


def test_a_recipes_max_samples_bounds_the_rows(audit_case):
    from mnemoguard.audit import load_audit_data

    rows, records = load_audit_data(audit_case["data"], max_rows=5)
    assert len(rows) == 5 and sum(r.repeats for r in records) == 5
