"""MemorizationMonitor: RNG isolation (same weights on and off), determinism, separate band tags, state round-trip,
probe choice, and the per-step low-loss flags."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mnemoguard.callbacks import MemorizationMonitor
from mnemoguard.callbacks.monitor import duplicated_caption_rows
from mnemoguard.config import ConfigError, MonitorConfig
from mnemoguard.isolation import preserved_rng_state
from mnemoguard.serialization import load_state_files, save_state_files
from mnemoguard.trainer import Trainer

from ..trainer_utils import tiny_recipe, unet_weights
from ._guard_run import HELDOUT, RUN_OVERRIDES, STEPS, guard_overrides, guarded_run


def test_monitor_does_not_change_the_training_trajectory(tmp_path):
    run = guarded_run()
    plain = Trainer(tiny_recipe(tmp_path, *RUN_OVERRIDES))  # the same EMA, no guard
    plain.train()
    off = unet_weights(plain)
    assert off.keys() == run.weights.keys()
    assert all(torch.equal(off[k], run.weights[k]) for k in off)
    assert [h["step"] for h in run.monitor.history] == [2, 4] and run.state.global_step == STEPS


def test_monitor_values_are_deterministic_and_logged_per_band():
    run = guarded_run()
    mon, state = run.monitor, run.state
    last = mon.history[-1]["metrics"]
    # The same weights measured again give exactly the logged values (fixed probes, noise, timesteps, seed).
    assert run.remeasured[0] == run.remeasured[1]
    assert {k: v for k, v in run.remeasured[0].items()} == last
    # One tag per signal, band and split; nothing averaged across bands.
    assert list(mon.bands) == ["low", "mid", "high"]
    for sig in ("live_vs_ema", "wen_gap", "anisotropy", "probe_loss"):
        for band in ("low", "mid", "high"):
            for part in ("train", "heldout", "contrast", "train_std", "heldout_std"):
                assert f"mem/{sig}/band={band}/{part}" in last
    assert not [k for k in last if k.startswith("mem/") and "band=" not in k and "nn_ratio" not in k
                and "curvature_diff" not in k]
    assert run.monitor.needs == {"dataset", "prompts", "ema"}
    assert "mem/nn_ratio/train" in last and "mem/curvature_diff/t=1/train" in last
    # Under the metrics contract: in state.metrics, fresh at the check, and written to the log history.
    logged = {row["step"]: row for row in state.log_history}
    assert logged[4]["mem/live_vs_ema/band=mid/train"] == last["mem/live_vs_ema/band=mid/train"]
    assert "mem/live_vs_ema/band=mid/train" in logged[2] and "mem/agc/flagged_samples" in logged[4]
    rates = [k for row in logged.values() for k in row if k.startswith("mem/agc/flag_rate/band=")]
    assert {r.rsplit("=", 1)[1] for r in rates} == {"low", "mid", "high"}  # bands with samples in the window
    assert state.metric_steps["mem/wen_gap/band=high/heldout"] == 4
    # Per-probe values kept for the histograms: 4 training probes, 2 held-out captions, per band.
    per = mon.history[-1]["per_probe"]["live_vs_ema"]["mid"]
    assert len(per["train"]) == 4 and len(per["heldout"]) == 2
    assert np.isclose(np.mean(per["train"]), last["mem/live_vs_ema/band=mid/train"])
    # Probes: duplicated captions first, then random rows; unseen captions as held-out probes.
    probes = mon.probes()
    assert [p["kind"] for p in probes] == ["duplicate", "duplicate", "random", "random", "captions", "captions"]
    assert [p["caption"] for p in probes[4:]] == HELDOUT
    vis = mon.latest_visuals
    assert vis["step"] == 4 and vis["generations"].shape == (2, 1, 16, 16) and vis["maps"].shape == (2, 16, 16)
    # The per-step low-loss flags counted every captioned sample of every micro-batch, per dataset row.
    seen = run.loss_flags.row_counts[1]
    assert 0 < seen.sum() <= STEPS * 8 and seen.sum() > STEPS * 8 * 0.7  # caption dropout leaves ~10 % out


def test_monitor_state_round_trip_and_resume(tmp_path):
    run = guarded_run()
    saved = run.monitor.state_dict()
    save_state_files({"m": saved}, tmp_path, "monitor")  # what the guard's run state does: JSON + safetensors
    fresh = MemorizationMonitor(run.monitor.config)
    fresh.load_state_dict(load_state_files(tmp_path, "monitor")["m"])
    assert fresh.state_dict() == json.loads(json.dumps(saved))
    assert fresh.spec["train_rows"] == run.monitor.spec["train_rows"] and fresh.num_checks == 2
    # The hooks' wall time (the monitoring overhead) is counted and kept across a resume.
    assert saved["seconds"]["checks"] > 0 and saved["seconds"]["setup"] > 0 and fresh.seconds == saved["seconds"]

    # Resume from checkpoint-2: the same probe set, and step 4 replays the uninterrupted values.
    shutil.copytree(run.out / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    cfg = tiny_recipe(tmp_path / "run", *RUN_OVERRIDES, *guard_overrides(),
                      "training.resume_from_checkpoint=checkpoint-2", "logging.report_to=none")
    trainer = Trainer(cfg)
    trainer.train()
    resumed = trainer.guard.monitor
    assert resumed.spec == run.monitor.spec and len(resumed.probe_sets) == 1
    assert [h["step"] for h in resumed.history] == [2, 4]
    assert resumed.history[0] == json.loads(json.dumps(run.monitor.history[0]))
    assert resumed.history[1]["metrics"] == run.monitor.history[1]["metrics"]


def test_a_changed_probe_setting_on_resume_chooses_new_probes_and_says_so(tmp_path, caplog):
    run = guarded_run()
    shutil.copytree(run.out / "checkpoint-2", tmp_path / "checkpoint-2")
    cfg = tiny_recipe(tmp_path, *RUN_OVERRIDES, *guard_overrides(), "guard.monitor.num_random_probes=3",
                      "training.resume_from_checkpoint=checkpoint-2", "logging.report_to=none")
    trainer = Trainer(cfg)
    with caplog.at_level("WARNING", logger="mnemoguard"):
        trainer.train()
    mon = trainer.guard.monitor
    assert "num_random_probes: 2 -> 3" in caplog.text and "new probe set is chosen at step 2" in caplog.text
    assert [p["step"] for p in mon.probe_sets] == [0, 2] and len(mon.spec["train_rows"]) == 5
    assert [(h["step"], h["probe_set"]) for h in mon.history] == [(2, 0), (4, 1)]


def test_preserved_rng_state_restores_every_generator():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    with preserved_rng_state():
        torch.rand(5), np.random.rand(5), random.random()
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_duplicated_caption_rows_ranks_by_count():
    caps = ["a", "b", "a", "c", "b", "a", "d", "", ""]
    assert duplicated_caption_rows(caps) == [(0, 3), (1, 2)]


def test_config_errors_say_what_was_expected():
    with pytest.raises(ConfigError, match="baseline_checkpoint"):
        MonitorConfig(baseline="checkpoint")
    with pytest.raises(ConfigError, match="t_lo < t_hi"):
        MonitorConfig(bands=[(500, 100)])
    with pytest.raises(ConfigError, match="band_names"):
        MonitorConfig(bands=[(0, 100), (100, 200)], band_names=["a"])
    with pytest.raises(ConfigError, match=r"guard.monitor.every_n_steps must be >= 1, found 0"):
        MonitorConfig(every_n_steps=0)
    with pytest.raises(ConfigError, match="one source of held-out probes"):
        MonitorConfig(heldout_data="x", heldout_captions=["y"])


@pytest.mark.slow
def test_two_ranks_hold_the_same_monitor_and_danger_zone_values(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "recipes" / "accelerate" / "multi_gpu.yaml"), "--main_process_port", "29641",
           str(Path(__file__).with_name("_monitor_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"monitor{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0] == ranks[1]  # probes, every check's values, per-probe values, the per-step loss flags, the
    # danger-zone tracker's prior and measurements (rank 0's return flags decide on every rank)
    assert [h["step"] for h in ranks[0]["danger_zone"]["history"]] == [2, 4]
    last = ranks[0]["history"][-1]
    assert [h["step"] for h in ranks[0]["history"]] == [2, 4]
    per = last["per_probe"]["live_vs_ema"]["high"]
    assert len(per["train"]) == 5 and len(per["heldout"]) == 2 and all(np.isfinite(per["train"] + per["heldout"]))
    seen = sum(ranks[0]["row_counts"][1])  # the low-loss flags: both ranks' samples, reduced at every log step
    assert 32 < seen <= 64  # 4 steps x 8 per rank x 2 ranks, minus dropped captions


def test_heldout_samples_load_from_a_folder_and_exclude_other_sources(tmp_path):
    from mnemoguard.data import digits_dataset

    digits_dataset().select(range(3)).save_to_disk(str(tmp_path / "held"))
    mon = MemorizationMonitor(heldout_data=str(tmp_path / "held"))
    assert len(mon.heldout) == 3 and mon.has_heldout and mon.heldout[0]["text"].startswith("a handwritten digit")
    with pytest.raises(ValueError, match="give one source of held-out probes"):
        MemorizationMonitor(heldout_data=str(tmp_path / "held"), heldout=[("x", "y")])
