"""``accelerate launch -m mnemoguard.cli audit``: two CPU processes split the per-image table and give one
process's result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnemoguard.cli import main

from .conftest import audit_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(audit_case, tmp_path):
    checkpoints = audit_case["diffusers"][:2]
    assert main(audit_args(audit_case, tmp_path / "one", *checkpoints)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "multi_gpu.yaml"), "--main_process_port", "29631", "-m",
           "mnemoguard.cli", *audit_args(audit_case, tmp_path / "two", *checkpoints)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("audit.csv", "images.csv"):
        one, two = ((tmp_path / d / name).read_text().splitlines() for d in ("one", "two"))
        seconds = one[0].split(",").index("seconds") if name == "audit.csv" else -1  # wall time differs
        assert _without(one, seconds) == _without(two, seconds)


def _without(rows: list[str], column: int) -> list[list[str]]:
    return [[c for i, c in enumerate(r.split(",")) if i != column] for r in rows]
