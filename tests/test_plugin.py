"""mnemoguard.Guard inside a script shaped like diffusers' train_text_to_image(_lora).py (tests/diffusers_script.py),
added as the README shows: monitoring changes nothing, the script's own EMA is the baseline, a stop leaves both loops
with a checkpoint, resume replays the uninterrupted run (also from a checkpoint saved without the guard), 2 processes
agree; and the README's snippet is the script's code."""

from __future__ import annotations

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

from . import diffusers_script

ROOT = Path(__file__).resolve().parents[1]
MONITOR = {"every_n_steps": 2, "num_duplicate_probes": 2, "num_random_probes": 2, "num_heldout_probes": 0,
           "curvature_every_k_checks": 0, "batch_size": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny latent Stable Diffusion (tiny VAE, tiny CLIP, 8x8 latents) saved in diffusers' layout."""
    from mnemoguard.config import TinyModelConfig
    from mnemoguard.trainer.models import build_tiny_components

    out = tmp_path_factory.mktemp("tiny-sd")
    cfg = TinyModelConfig(latent=True, channels=3, text_encoder="clip", sample_size=8)
    build_tiny_components(cfg, out / "build").save_pretrained(out / "model")
    return out / "model"


def write_guard(path: Path, **sections) -> str:
    section = {"monitor": dict(MONITOR), "report": {"plots": False}}
    for key, value in sections.items():
        section[key] = {**section.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(section))
    return str(path)


def run(model_dir: Path, out: Path, *args: str, guard: str | None = None) -> dict:
    argv = ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out), *args]
    return diffusers_script.main(argv + (["--guard_config", guard] if guard else []))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- one process
def test_lora_script_monitoring_leaves_the_weights_bit_identical_and_stamps_the_export(model_dir, tmp_path):
    common = ("--lora", "--gradient_accumulation_steps", "2", "--max_train_steps", "5", "--checkpointing_steps", "10")
    plain = run(model_dir, tmp_path / "plain", *common)
    guarded = run(model_dir, tmp_path / "guarded", *common, guard=write_guard(tmp_path / "g.yaml"))
    assert plain["global_step"] == guarded["global_step"] == 5
    assert same_weights(plain["weights"], guarded["weights"])
    guard = guarded["guard_object"]
    # Checks at its cadence and a last one at the end of training; train/loss is the mean over micro-batches.
    assert [h["step"] for h in guard.monitor.history] == [2, 4, 5]
    assert guard.state.micro_step == 10 and "train/loss" in guard.metrics
    assert guard._owns_ema and guard.ema.optimization_step == 5  # the monitor's baseline, built by the guard
    assert guard.components.loss_flags.row_counts[1].sum() > 0  # rows known: the collate_fn passed indices
    stamped = tmp_path / "guarded" / "pytorch_lora_weights.safetensors"
    with safe_open(str(stamped), "pt") as f:
        meta = f.metadata()
    assert meta["mnemoguard_global_step"] == "5" and meta["mnemoguard_checks"] == "3"
    report = json.loads((tmp_path / "guarded" / "report" / "summary.json").read_text())
    assert report["run"]["global_step"] == 5 and report["run"]["max_steps"] == 5


def test_full_fine_tune_with_use_ema_takes_the_scripts_ema_as_the_baseline_and_reports_on_the_exported_ema(
        model_dir, tmp_path):
    result = run(model_dir, tmp_path, "--use_ema", "--max_train_steps", "2", "--checkpointing_steps", "10",
                 guard=write_guard(tmp_path / "g.yaml"))
    guard = result["guard_object"]
    assert not guard._owns_ema and type(guard.ema).__module__ == "diffusers.training_utils"  # no second copy
    assert guard.context.ema.optimization_step == 2
    live, end = guard.monitor.training_history[-1], guard.monitor.history[-1]
    assert live["metrics"]["mem/live_vs_ema/band=mid/train"] > 0.1  # the EMA differs from the live weights
    # The script exports the EMA (guard.end(exported="ema")): the last check measures the EMA weights themselves
    # (the model holds the live ones again after ema_unet.restore), so the EMA's distance to itself is ~0.
    assert end["weights"] == {"source": "ema", "step": 2}
    assert abs(end["metrics"]["mem/live_vs_ema/band=mid/train"]) < 1e-4
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with safe_open(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.metadata()["mnemoguard_exported_source"] == "ema"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["exported"]["source"] == "ema" and "about the exported ema weights" in (
        tmp_path / "report" / "report.md").read_text()


def test_a_stop_leaves_both_loops_and_writes_a_checkpoint_at_the_stop_step(model_dir, tmp_path):
    stop = {"enabled": True, "monitor": "train/loss", "divergence_threshold": 0.0, "start_from_step": 3}
    result = run(model_dir, tmp_path, "--lora", "--max_train_steps", "30", "--checkpointing_steps", "100",
                 guard=write_guard(tmp_path / "g.yaml", early_stopping=stop))
    guard = result["guard_object"]
    assert result["global_step"] == guard.global_step == 3 and "train/loss" in guard.stop_reason
    assert (tmp_path / "checkpoint-3" / "mnemoguard_state.json").is_file()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["run"]["stop_step"] == 3 and summary["early_stopping"][0]["stopped_step"] == 3


def test_the_danger_zone_tracker_and_the_default_stop_run_in_the_script_on_a_latent_model(model_dir, tmp_path):
    dz = {"enabled": True, "every_n_checks": 1, "num_inference_steps": 4, "draws": 1, "prior_rows": 32}
    guard_yaml = write_guard(tmp_path / "g.yaml", danger_zone=dz, default_stop=True,
                             noise_gap={"enabled": True, "follow_danger_zone": True})
    result = run(model_dir, tmp_path, "--lora", "--max_train_steps", "4", "--checkpointing_steps", "100",
                 guard=guard_yaml)
    guard = result["guard_object"]
    tracker = guard.components.danger_zone
    # The prior on the VAE latents of the script's own images, a measurement at every check, the band's scalars.
    assert tracker.prior is not None and len(tracker.prior["sigmas"]) > 0
    assert [h["step"] for h in tracker.history] == [2, 4]
    assert all(guard.state.metric_steps[f"mem/danger_zone/{name}"] == 4 for name in ("excess", "copy_rate", "active"))
    # The default stop's rollback target: each check that does not stop asks the script to save a checkpoint.
    assert result["global_step"] == 4 and (tmp_path / "checkpoint-2" / "mnemoguard_state.json").is_file()


def test_resume_latest_replays_the_uninterrupted_run(model_dir, tmp_path):
    guard = write_guard(tmp_path / "g.yaml")
    common = ("--lora", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2")
    straight = run(model_dir, tmp_path / "a", *common, "--max_train_steps", "4", guard=guard)
    run(model_dir, tmp_path / "b", *common, "--max_train_steps", "2", guard=guard)
    resumed = run(model_dir, tmp_path / "b", *common, "--max_train_steps", "4", "--resume_from_checkpoint",
                  "latest", guard=guard)
    assert resumed["global_step"] == 4 and same_weights(straight["weights"], resumed["weights"])
    a, b = straight["guard_object"], resumed["guard_object"]
    assert [h["step"] for h in b.monitor.history] == [2, 4]
    assert b.monitor.history[-1]["metrics"] == a.monitor.history[-1]["metrics"]
    assert [r["step"] for r in b.state.log_history] == [1, 2, 3, 4] and b.ema.optimization_step == 4
    # the resumed run plans 4 steps, not the 2 of the run that wrote the checkpoint
    summary = json.loads((tmp_path / "b" / "report" / "summary.json").read_text())
    assert b.state.max_steps == 4 and summary["run"]["max_steps"] == 4 and "4 / 4" in (
        tmp_path / "b" / "report" / "report.md").read_text()


def test_a_guard_built_after_load_state_is_a_one_line_error(model_dir, tmp_path):
    guard = write_guard(tmp_path / "g.yaml")
    run(model_dir, tmp_path, "--lora", "--max_train_steps", "2", "--checkpointing_steps", "2", guard=guard)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"build the Guard before accelerator.load_state\(...\) so that the "):
        run(model_dir, tmp_path, "--lora", "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--resume_from_checkpoint", "latest", "--guard_after_load_state", guard=guard)


def test_without_held_out_probes_the_report_says_so_and_counts_checks_in_the_singular(model_dir, tmp_path):
    run(model_dir, tmp_path, "--lora", "--max_train_steps", "2", "--checkpointing_steps", "10",
        guard=write_guard(tmp_path / "g.yaml"))
    text = (tmp_path / "report" / "report.md").read_text()
    assert "none stands out from the held-out probes" not in text and "there are no held-out probes" in text
    assert "1 check every 2 steps" in text and "1 checks" not in text


def test_resume_from_a_checkpoint_saved_without_the_guard(model_dir, tmp_path, caplog):
    common = ("--lora", "--checkpointing_steps", "2")
    run(model_dir, tmp_path, *common, "--max_train_steps", "2")
    for path in (tmp_path / "checkpoint-2").glob("mnemoguard_state.*"):  # as a script without the guard saves it
        path.unlink()
    with caplog.at_level("WARNING", logger="mnemoguard"):
        resumed = run(model_dir, tmp_path, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                      guard=write_guard(tmp_path / "g.yaml"))
    assert "holds no guard state (saved without the guard); the guard starts fresh" in caplog.text
    guard = resumed["guard_object"]
    assert resumed["global_step"] == guard.global_step == 4 and [h["step"] for h in guard.monitor.history] == [4]


def test_a_disabled_guard_is_a_pass_through(tmp_path):
    """What the plain runs above rest on: with ``enabled: false`` the five calls are the diffusers script's own
    operations (timesteps drawn exactly as torch.randint draws them, the plain per-sample mean loss)."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from mnemoguard import Guard

    from .conftest import make_tiny_unet

    guard = Guard({"enabled": False}, accelerator=Accelerator(cpu=True), unet=make_tiny_unet(),
                  noise_scheduler=DDPMScheduler())
    assert not guard.enabled and len(guard.callbacks) == 0 and guard.ema is None
    torch.manual_seed(3)
    expected = torch.randint(0, 1000, (8,))
    torch.manual_seed(3)
    t = guard.sample_timesteps(8)
    assert torch.equal(t, expected)
    x = torch.randn(8, 1, 16, 16)
    inputs = guard.before_forward(timesteps=t, noisy_model_input=x, encoder_hidden_states=torch.randn(8, 16, 32))
    per_element = torch.rand(8, 1, 16, 16)
    assert torch.equal(guard.loss(per_element, inputs), per_element.mean(dim=[1, 2, 3]).mean())
    assert guard.step(logs={"train/lr": 0.5})["train/lr"] == 0.5 and guard.global_step == 1


def test_bad_input_is_a_clear_error(tmp_path):
    from accelerate import Accelerator

    from mnemoguard import Guard
    from mnemoguard.config import ConfigError, TinyModelConfig
    from mnemoguard.data import digits_dataset
    from mnemoguard.trainer.models import build_tiny_components

    parts = build_tiny_components(TinyModelConfig(text_encoder="clip"), tmp_path / "model")
    common = dict(accelerator=Accelerator(cpu=True), unet=parts.unet, noise_scheduler=parts.noise_scheduler,
                  output_dir=tmp_path)
    data = digits_dataset().select(range(16))
    with pytest.raises(ValueError, match=r"MemorizationMonitor needs a text encoder: .*; found none"):
        Guard({}, train_dataset=data, **common)
    with pytest.raises(ValueError, match=r"MemorizationMonitor needs the training data .*Guard\(train_dataset=\)"):
        Guard({}, encode_prompt=parts.encode_prompt, **common)
    with pytest.raises(ValueError, match=r"caption_column='caption' is not a column of train_dataset; its columns"):
        Guard({}, encode_prompt=parts.encode_prompt, train_dataset=data, caption_column="caption", **common)
    with pytest.raises(ConfigError, match="monitr"):
        Guard({"monitr": {"every_n_steps": 2}}, **common)
    with pytest.raises(ValueError, match=r"random_token_addition needs the tokenizer"):
        Guard({"monitor": {"enabled": False}, "regularizers": {"random_token_addition": {}}},
              encode_prompt=parts.encode_prompt, **common)
    with pytest.raises(TypeError, match=r"ema: expected a mnemoguard.ema.EMAModel or a diffusers"):
        Guard({}, encode_prompt=parts.encode_prompt, train_dataset=data, ema=object(), **common)

    guard = Guard({"regularizers": {"wen_filter": {}}, "monitor": {"curvature_every_k_checks": 0}},
                  encode_prompt=parts.encode_prompt, train_dataset=data, **common)
    x = torch.randn(4, 1, 16, 16)
    t = guard.sample_timesteps(4)
    with pytest.raises(ValueError, match=r"missing \['encoder_hidden_states \(or captions\)'\].*found \["):
        guard.before_forward(timesteps=t, noisy_model_input=x)
    with pytest.raises(ValueError, match=r"DDPM model takes integer timesteps in \[0, 1000\); found a torch.float32"):
        guard.before_forward(timesteps=t.float(), noisy_model_input=x, captions=["a"] * 4)
    inputs = guard.before_forward(timesteps=t, noisy_model_input=x, captions=["a cat"] * 4)  # encoded by the guard
    assert inputs["encoder_hidden_states"].shape == (4, 16, 32) and inputs["indices"].tolist() == [-1] * 4
    pred = parts.unet(x, t, inputs["encoder_hidden_states"]).sample
    per_sample = torch.nn.functional.mse_loss(pred, x, reduction="none").mean(dim=(1, 2, 3))
    with pytest.raises(ValueError, match=r"expected per-sample losses of shape \[4\].*found shape \(\)"):
        guard.loss(per_sample.mean(), inputs, model_pred=pred)
    with pytest.raises(ValueError, match="wen_filter compares the network's prediction: expected model_pred=; found"):
        guard.loss(per_sample, inputs)
    with pytest.raises(ValueError, match="expected the dict returned by guard.before_forward"):
        guard.loss(per_sample, {"timesteps": t})
    assert guard.loss(per_sample, inputs, model_pred=pred).ndim == 0
    with pytest.raises(ValueError, match="global_step must grow; found 0 after 0"):
        guard.step(0)


# ---------------------------------------------------------------------------------------------------- two processes
def _launch(model_dir: Path, out: Path, *args: str, port: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "multi_gpu.yaml"), "--main_process_port", str(port),
           str(ROOT / "tests" / "diffusers_script.py"), "--pretrained_model_name_or_path", str(model_dir),
           "--output_dir", str(out), "--record", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"record{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_processes_with_accumulation_stop_together_and_resume(model_dir, tmp_path):
    stop = {"enabled": True, "monitor": "train/loss", "divergence_threshold": 0.0, "start_from_step": 3}
    common = ("--lora", "--gradient_accumulation_steps", "2", "--train_batch_size", "2", "--checkpointing_steps",
              "100")
    first = _launch(model_dir, tmp_path, *common, "--max_train_steps", "6", "--guard_config",
                    write_guard(tmp_path / "stop.yaml", early_stopping=stop), port=29651)
    assert [r["world"] for r in first] == [2, 2] and [r["global_step"] for r in first] == [3, 3]
    assert first[0]["checksum"] == first[1]["checksum"]  # DDP: the same weights on both ranks
    assert first[0]["guard"] == first[1]["guard"]  # the same metrics, history and stop on every rank
    assert "train/loss" in first[0]["guard"]["stop_reason"] and (tmp_path / "checkpoint-3").is_dir()
    resumed = _launch(model_dir, tmp_path, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                      "--guard_config", write_guard(tmp_path / "go.yaml"), port=29652)
    assert [r["global_step"] for r in resumed] == [4, 4] and resumed[0]["guard"] == resumed[1]["guard"]
    assert [h["step"] for h in resumed[0]["guard"]["history"]] == [2, 4]  # the first run's check at 2, kept


@pytest.mark.slow
def test_two_processes_measure_the_exported_ema_on_every_rank(model_dir, tmp_path):
    ranks = _launch(model_dir, tmp_path, "--use_ema", "--max_train_steps", "2", "--train_batch_size", "2",
                    "--checkpointing_steps", "10", "--guard_config", write_guard(tmp_path / "g.yaml"), port=29655)
    ends = [r["guard"]["history"][-1] for r in ranks]
    assert ends[0] == ends[1] and ends[0]["weights"] == {"source": "ema", "step": 2}
    assert abs(ends[0]["metrics"]["mem/live_vs_ema/band=mid/train"]) < 1e-4  # not the live weights of rank 1


@pytest.mark.slow
def test_guard_end_on_the_main_process_only_is_a_one_line_error(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "multi_gpu.yaml"), "--main_process_port", "29656",
           str(ROOT / "tests" / "diffusers_script.py"), "--pretrained_model_name_or_path", str(model_dir),
           "--output_dir", str(tmp_path), "--lora", "--max_train_steps", "3", "--train_batch_size", "2",
           "--checkpointing_steps", "10", "--end_on_main_process_only", "--guard_config",
           write_guard(tmp_path / "g.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Guard.end() must be called on every process (2 here)" in proc.stderr, proc.stderr[-4000:]


def test_the_readme_says_how_a_cpu_runs_diffusers_scripts_on_two_processes():
    readme = (ROOT / "README.md").read_text()
    assert "ACCELERATE_USE_CPU=1" in readme and "accelerate launch --multi_gpu" in readme


# ---------------------------------------------------------------------------------------------------- the README
def test_the_readme_plug_in_snippet_is_the_scripts_code():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Plug into an existing diffusers training script", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = {line.strip() for line in (ROOT / "tests" / "diffusers_script.py").read_text().splitlines()}
    code = [line.split("  #")[0].strip() for line in snippet.splitlines()]
    code = [line for line in code if line and not line.startswith("#") and line != "..."]
    assert len(code) >= 12
    missing = [line for line in code if not any(s == line or s.startswith(line) for s in script)]
    assert not missing, f"README lines not in tests/diffusers_script.py: {missing}"
