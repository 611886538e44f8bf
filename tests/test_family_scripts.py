"""mnemoguard.Guard inside scripts shaped like diffusers' SDXL, SD3 and Flux LoRA scripts
(tests/diffusers_script_{sdxl,sd3,flux}.py, tiny latent models with the families' own text stacks, random weights,
offline), added as the README shows: monitoring leaves the weights bit-identical (accumulation 2), the checks write
their mem/ scalars, a stop leaves both loops with a checkpoint at the stop step, a resume replays the uninterrupted
run, 2 processes agree; and each family's README lines are that script's code."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("sdxl", "sd3", "flux")
MONITOR = {"every_n_steps": 2, "num_duplicate_probes": 2, "num_random_probes": 2, "num_heldout_probes": 0,
           "curvature_every_k_checks": 2, "curvature_num_probes": 1, "curvature_hutchinson_probes": 2,
           "generation_steps": 2, "batch_size": 8}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny pipeline directory of each family, as diffusers' pipeline tests build them."""
    from mnemoguard.trainer.tiny import build_tiny_pipeline

    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"tiny-{family}")
        build_tiny_pipeline(family, root / "build").save_pretrained(root / "model")
        out[family] = root / "model"
    return out


def write_guard(path: Path, **sections) -> str:
    section = {"monitor": dict(MONITOR), "report": {"plots": False}, **sections}
    path.write_text(yaml.safe_dump(section))
    return str(path)


def run(family: str, model_dir: Path, out: Path, *args: str, guard: str | None = None) -> dict:
    from accelerate.state import AcceleratorState

    script = importlib.import_module(f"tests.diffusers_script_{family}")
    argv = ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out), *args]
    try:
        return script.main(argv + (["--guard_config", guard] if guard else []))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_monitoring_leaves_the_weights_bit_identical_and_writes_the_checks(family, model_dirs, tmp_path):
    common = ("--gradient_accumulation_steps", "2", "--max_train_steps", "4", "--checkpointing_steps", "10")
    plain = run(family, model_dirs[family], tmp_path / "plain", *common)
    guarded = run(family, model_dirs[family], tmp_path / "guarded", *common, guard=write_guard(tmp_path / "g.yaml"))
    assert plain["global_step"] == guarded["global_step"] == 4
    assert same_weights(plain["weights"], guarded["weights"])
    guard = guarded["guard_object"]
    assert [h["step"] for h in guard.monitor.history] == [2, 4] and guard.state.micro_step == 8
    metrics = guard.monitor.history[-1]["metrics"]
    for band in ("low", "mid", "high"):
        assert metrics[f"mem/probe_loss/band={band}/train"] > 0 and metrics[f"mem/wen_gap/band={band}/train"] > 0
    assert "mem/nn_ratio/train" in metrics  # the visual check: generations through the family's sampler
    with safe_open(str(tmp_path / "guarded" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
        prefix = "unet." if family == "sdxl" else "transformer."
        assert all(k.startswith(prefix) for k in f.keys())
    assert meta["mnemoguard_global_step"] == "4" and meta["mnemoguard_checks"] == "2"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stop_leaves_both_loops_and_a_resume_replays_the_uninterrupted_run(family, model_dirs, tmp_path):
    model = model_dirs[family]
    stop = {"enabled": True, "monitor": "train/loss", "divergence_threshold": 0.0, "start_from_step": 3}
    stopped = run(family, model, tmp_path / "stop", "--max_train_steps", "30", "--checkpointing_steps", "100",
                  guard=write_guard(tmp_path / "stop.yaml", early_stopping=stop))
    assert stopped["global_step"] == stopped["guard_object"].global_step == 3
    assert (tmp_path / "stop" / "checkpoint-3" / "mnemoguard_state.json").is_file()

    guard = write_guard(tmp_path / "g.yaml")
    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "2")
    straight = run(family, model, tmp_path / "a", *common, "--max_train_steps", "4", guard=guard)
    run(family, model, tmp_path / "b", *common, "--max_train_steps", "2", guard=guard)
    resumed = run(family, model, tmp_path / "b", *common, "--max_train_steps", "4", "--resume_from_checkpoint",
                  "latest", guard=guard)
    assert resumed["global_step"] == 4 and same_weights(straight["weights"], resumed["weights"])
    a, b = straight["guard_object"], resumed["guard_object"]
    assert [h["step"] for h in b.monitor.history] == [2, 4]
    assert b.monitor.history[-1]["metrics"] == a.monitor.history[-1]["metrics"]
    summary = json.loads((tmp_path / "b" / "report" / "summary.json").read_text())
    assert summary["run"]["global_step"] == 4 and summary["run"]["max_steps"] == 4


def _launch(family: str, model_dir: Path, out: Path, *args: str, port: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "multi_gpu.yaml"), "--main_process_port", str(port),
           str(ROOT / "tests" / f"diffusers_script_{family}.py"), "--pretrained_model_name_or_path", str(model_dir),
           "--output_dir", str(out), "--record", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"record{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_with_accumulation_stop_together_and_agree(family, model_dirs, tmp_path):
    stop = {"enabled": True, "monitor": "train/loss", "divergence_threshold": 0.0, "start_from_step": 3}
    port = 29661 + FAMILIES.index(family)
    ranks = _launch(family, model_dirs[family], tmp_path, "--gradient_accumulation_steps", "2", "--train_batch_size",
                    "2", "--max_train_steps", "6", "--checkpointing_steps", "100", "--guard_config",
                    write_guard(tmp_path / "stop.yaml", early_stopping=stop), port=port)
    assert [r["world"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [3, 3]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP: the same weights on both ranks
    assert ranks[0]["guard"] == ranks[1]["guard"]  # the same metrics, history and stop on every rank
    assert [h["step"] for h in ranks[0]["guard"]["history"]] == [2, 3]
    assert (tmp_path / "checkpoint-3").is_dir()


# ---------------------------------------------------------------------------------------------------- the README
def readme_snippet(family: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Plug into an existing diffusers training script", 1)[1].split("\n## ", 1)[0]
    heading = {"sdxl": "### SDXL", "sd3": "### SD3 and SD3.5", "flux": "### FLUX.1"}[family]
    part = section.split(heading, 1)[1].split("\n### ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", part, re.S).group(1)
    code = [line.split("  #")[0].strip() for line in snippet.splitlines()]
    return [line for line in code if line and not line.startswith("#") and line != "..."]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_readme_lines_of_each_family_are_its_scripts_code(family):
    script = {line.strip() for line in (ROOT / "tests" / f"diffusers_script_{family}.py").read_text().splitlines()}
    code = readme_snippet(family)
    assert len(code) >= 6
    missing = [line for line in code if not any(s == line or s.startswith(line) for s in script)]
    assert not missing, f"README lines not in tests/diffusers_script_{family}.py: {missing}"
