"""Real multi-process runs on CPU: 2-process DDP (gloo) and DeepSpeed ZeRO-2 / ZeRO-3 through accelerate launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _launch(config: str, out: Path, *overrides: str, port: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = [*ACCELERATE, "--config_file", str(ROOT / "recipes" / "accelerate" / config), "--main_process_port",
           str(port), str(ROOT / "tests" / "dist_worker.py"), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_process_ddp_on_cpu_ends_with_identical_weights(tmp_path):
    ranks = _launch("multi_gpu.yaml", tmp_path, "training.max_train_steps=4", port=29611)
    assert [r["world"] for r in ranks] == [2, 2]
    assert all("MULTI_CPU" in r["distributed_type"] for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["ema_checksum"] == ranks[1]["ema_checksum"]
    assert [r["global_step"] for r in ranks] == [4, 4]


@pytest.mark.slow
def test_a_stop_asked_on_one_rank_stops_every_rank(tmp_path):
    ranks = _launch("multi_gpu.yaml", tmp_path, "training.max_train_steps=6", "stop_on_last_rank=2", port=29612)
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert (tmp_path / "checkpoint-2").is_dir()


@pytest.mark.slow
def test_a_step_where_every_rank_dropped_every_sample_leaves_the_weights_alone(tmp_path):
    """DDP keeps the zero-gradient graph; the trainer must still skip the optimizer step (Adam's moments would
    otherwise move the weights), on both ranks alike."""
    _launch("multi_gpu.yaml", tmp_path, "training.max_train_steps=4", "drop_all_at=3", port=29613)
    sums = [json.loads((tmp_path / f"checksums{r}.json").read_text()) for r in range(2)]
    assert sums[0] == sums[1] and len(sums[0]) == 4
    assert sums[0][2] == sums[0][1]  # step 3 skipped
    assert len(set(sums[0][:2])) == 2 and sums[0][3] != sums[0][2]  # the others moved


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_saves_and_resumes(tmp_path, stage):
    port = 29620 + stage
    first = _launch(f"zero{stage}.yaml", tmp_path, "training.max_train_steps=2", port=port)
    assert all("DEEPSPEED" in r["distributed_type"] for r in first)
    assert (tmp_path / "checkpoint-2" / "pytorch_model").is_dir()
    resumed = _launch(f"zero{stage}.yaml", tmp_path, "training.max_train_steps=4",
                      "training.resume_from_checkpoint=latest", port=port)
    for r in resumed:
        assert r["resumed_from"].endswith("checkpoint-2") and r["global_step"] == 4 and r["ema_step"] == 4
        assert r["loss_steps"] == [1, 2, 3, 4]
    assert resumed[0]["checksum"] == pytest.approx(resumed[1]["checksum"], rel=1e-6)
    assert resumed[0]["ema_checksum"] == pytest.approx(resumed[1]["ema_checksum"], rel=1e-6)
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert float(sum(t.double().sum() for t in exported.values())) == pytest.approx(resumed[0]["checksum"], rel=1e-6)
