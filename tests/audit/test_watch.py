"""``mnemoguard audit --watch``: a checkpoint written after the watch started is measured, and a copying verdict
runs ``--on-copy``."""

from __future__ import annotations

import csv
import os
import shutil
import sys
import threading
import time

import pytest

from mnemoguard.audit import AuditSettings
from mnemoguard.audit.watch import settled, watch

from .conftest import write_digits

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """A tiny UNet trained 400 steps on two images (4 copies each): most of its generations land on them (d1/d2
    below 0.9: the test is about the watch, not the criterion's strictness)."""
    from mnemoguard.cli import main

    root = tmp_path_factory.mktemp("memorized")
    data = write_digits(root / "train", [0, 1], copies={0: 3, 1: 3})
    heldout = write_digits(root / "heldout", list(range(100, 106)))
    recipe = root / "r.yaml"
    recipe.write_text(f"model:\n  tiny: {{text_encoder: clip}}\ndata:\n  source: {data}\ntraining:\n"
                      f"  output_dir: {root / 'run'}\n  train_batch_size: 8\n  max_train_steps: 400\n"
                      "  learning_rate: 3.0e-3\n  checkpointing_steps: 400\nvalidation: {every_n_steps: 0}\n"
                      "logging: {progress_bar: false, report_to: none}\n")
    assert main(["train", str(recipe)]) == 0
    return {"recipe": recipe, "heldout": heldout, "checkpoint": root / "run" / "checkpoint-400"}


def test_a_checkpoint_still_being_written_is_not_ready(tmp_path):
    from mnemoguard.audit import find_checkpoints

    f = tmp_path / "a-step00000010.safetensors"
    f.write_bytes(b"12")
    ready, sig = settled({}, find_checkpoints([tmp_path]))
    assert ready == []  # first sight
    f.write_bytes(b"1234")  # still growing
    ready, sig = settled(sig, find_checkpoints([tmp_path]))
    assert ready == []
    ready, sig = settled(sig, find_checkpoints([tmp_path]))
    assert [c.step for c in ready] == [10]


def test_watch_measures_a_new_checkpoint_and_runs_on_copy(memorized, tmp_path):
    watched, out, marker = tmp_path / "watched", tmp_path / "out", tmp_path / "marker.txt"
    settings = AuditSettings(base=str(memorized["recipe"]), checkpoints=[str(watched)],
                             heldout=str(memorized["heldout"]), out=str(out), device="cpu", probes=2, draws=4,
                             copy_ratio=0.9)
    on_copy = f"{sys.executable} -c \"import sys; open('{marker}', 'w').write(' '.join(sys.argv[1:]))\""
    thread = threading.Thread(target=watch, args=(settings, str(watched)),
                              kwargs={"on_copy": on_copy, "poll_seconds": 0.2, "max_checkpoints": 1})
    thread.start()
    time.sleep(1.0)  # the watch is polling an empty folder
    shutil.copytree(memorized["checkpoint"], watched / "checkpoint-400")
    thread.join(timeout=600)
    assert not thread.is_alive()
    with open(out / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["verdict"]) for r in rows] == [("400", "copying")]
    assert marker.read_text() == f"{watched / 'checkpoint-400'} 400"
