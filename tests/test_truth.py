"""What the guard says is true: a NaN run stops with the step named and never applies the step; a rule that can never
fire, an unknown name or an impossible value is an error before anything loads (also in ``mnemoguard config``); a
crafted pickle in a checkpoint is never executed and a malformed state names its file and key; the report after a
rollback is about the exported weights; bad data is a one-line error naming the row; an earlier run is not silently
overwritten."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mnemoguard.cli import main as cli
from mnemoguard.config import ConfigError, load_config
from mnemoguard.errors import OutputDirError, StateFormatError
from mnemoguard.trainer import Trainer

from .trainer_utils import tiny_recipe, unet_weights

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- non-finite
def test_a_nan_loss_is_never_applied_and_stops_the_run_naming_the_step(tmp_path):
    from mnemoguard.callbacks import Callback

    class PoisonAt(Callback):
        """The loss of step 3's micro-batch becomes NaN (a diverging model, deterministically)."""

        def on_loss(self, state, control, inputs, **kwargs):
            if state.global_step + 1 == 3:
                inputs["loss_per_sample"] = inputs["loss_per_sample"] * float("nan")

    cfg = tiny_recipe(tmp_path, "training.max_train_steps=6", "training.checkpointing_steps=1",
                      "training.checkpoints_total_limit=1", "guard.enabled=true", "guard.monitor.every_n_steps=2",
                      "guard.monitor.curvature_every_k_checks=0", "guard.report.plots=false")
    trainer = Trainer(cfg, callbacks=[PoisonAt()])
    trainer.setup()
    weights = {}
    original_step = trainer.guard.step  # record the weights after each step

    def recording_step(*args, **kwargs):
        out = original_step(*args, **kwargs)
        weights[trainer.guard.global_step] = unet_weights(trainer)
        return out

    trainer.guard.step = recording_step
    trainer.setup = lambda: None
    state = trainer.train()
    assert state.global_step == 3 and state.diverged_step == 3 and state.nonfinite_steps == 1
    assert "Diverged: the loss or a gradient was not finite at step 3" in state.stop_reason
    assert "the step was skipped" in state.stop_reason
    assert all(torch.equal(weights[2][n], weights[3][n]) for n in weights[2])  # step 3 was not applied
    assert all(torch.isfinite(w).all() for w in weights[3].values())
    # The last checkpoint saved before the divergence is kept by rotation (limit 1) next to the stop's.
    assert state.finite_checkpoint.endswith("checkpoint-2") and (tmp_path / "checkpoint-2").is_dir()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["verdict"] == "diverged" and summary["run"]["diverged_step"] == 3
    assert "**Verdict: diverged**" in (tmp_path / "report" / "report.md").read_text()


def test_a_diverging_recipe_exits_non_zero_with_the_step(tmp_path, capsys):
    code = cli(["train", str(ROOT / "recipes" / "demo.yaml"), "--set", f"training.output_dir={tmp_path}",
                "--set", "training.learning_rate=1e6", "--set", "training.max_train_steps=30",
                "--set", "model.tiny.text_encoder=clip", "--set", "data.max_samples=64",
                "--set", "training.train_batch_size=8", "--set", "validation.prompts=[]",
                "--set", "logging.progress_bar=false", "--set", "model.tiny.base=null"])
    out = capsys.readouterr().out
    assert code == 1 and "Stopped early: Diverged: the loss or a gradient was not finite at step" in out
    from mnemoguard.trainer import load_components

    exported = load_components(tmp_path / "final").unet
    assert all(torch.isfinite(p).all() for p in exported.parameters())  # never a NaN export


# ---------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("overrides, message", [
    (["guard.policy=[{signal: mem/probe_loss/band=lo/train, action: noise_gap, threshold: 0.1}]"],
     r"policy\[0\]\.signal: 'mem/probe_loss/band=lo/train' could never be produced: there is no band 'lo'; the "
     r"bands are \['low', 'mid', 'high'\]"),
    (["guard.policy=[{signal: mem/probe_loss/band=low/contrast, action: noise_gap, threshold: 0.1}]",
      "guard.monitor.heldout_data=x", "guard.monitor.bands=[[0, 500], [500, 1000]]"],
     r"policy\[0\]\.signal: .* there is no band 'low'; the bands are \['t0-500', 't500-1000'\]"),
    (["guard.default_policy=true", "guard.monitor.enabled=false"],
     r"default_policy reads the copies of each image from the monitor's duplicate scan .* needs guard.monitor"),
    (["guard.early_stopping.enabled=true", "guard.early_stopping.monitor=mem/nn_ratio/train",
      "guard.monitor.curvature_every_k_checks=0"], r"probe generations run only with .*curvature_every_k_checks > 0"),
    (["guard.monitor.signals=[wen_gap, score_gap]"], r"guard.monitor.signals\[1\]: expected one of \['live_vs_"),
    (["guard.regularizers={wen: {}}"], r"unknown regularizer 'wen'; expected one of \['baseline_preservation'"),
    (["guard.policy=[{signal: val/x, action: dedupe, threshold: 1}]"], r"action: expected 'noise_gap' or a regul"),
    (["guard.monitor.every_n_steps=0"], r"guard.monitor.every_n_steps must be >= 1, found 0"),
])
def test_impossible_guard_settings_are_config_errors_before_anything_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["guard.enabled=true", *overrides])


def test_mnemoguard_config_rejects_them_in_one_line(capsys):
    code = cli(["config", "--set", "guard.enabled=true", "--set", "guard.regularizers={wen: {}}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown regularizer 'wen'" in err
    code = subprocess.run([sys.executable, "-c", "import sys, mnemoguard.cli; sys.exit('torch' in sys.modules)"])
    assert code.returncode == 0  # the command line loads no torch for a config


def test_early_stopping_on_a_user_metric_that_never_appears_is_a_warning_in_the_report(tmp_path):
    cfg = tiny_recipe(tmp_path, "training.max_train_steps=2", "guard.enabled=true", "guard.monitor.enabled=false",
                      "guard.early_stopping.enabled=true", "guard.early_stopping.monitor=val/loss",
                      "guard.report.plots=false")
    state = Trainer(cfg).train()
    assert any("EarlyStopping never saw its monitored metric 'val/loss'" in w for w in state.warnings)
    assert "## Warnings" in (tmp_path / "report" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------- checkpoints
class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_crafted_pickle_in_a_checkpoint_is_never_executed_and_bad_state_names_file_and_key(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_recipe(out, "training.max_train_steps=2", "training.checkpointing_steps=2")).train()
    ckpt = out / "checkpoint-2"
    _Payload.marker = str(tmp_path / "pwned")
    assert list(ckpt.glob("mnemoguard_state.*")) and not list(ckpt.glob("custom_checkpoint_*"))
    torch.save({"x": _Payload()}, ckpt / "custom_checkpoint_0.pkl")  # what an attacker would plant
    resumed = Trainer(tiny_recipe(out, "training.max_train_steps=3", "training.resume_from_checkpoint=latest"))
    with pytest.raises(RuntimeError, match="Number of custom checkpoints"):  # accelerate refuses, unread
        resumed.setup()
    assert not (tmp_path / "pwned").exists()
    (ckpt / "custom_checkpoint_0.pkl").unlink()

    doc = json.loads((ckpt / "mnemoguard_state.json").read_text())
    doc["trainer_state"]["global_step"] = "forty"
    (ckpt / "mnemoguard_state.json").write_text(json.dumps(doc))
    bad = Trainer(tiny_recipe(out, "training.max_train_steps=4", "training.resume_from_checkpoint=checkpoint-2"))
    with pytest.raises(StateFormatError, match=r"checkpoint-2/mnemoguard_state\.json: trainer_state\.global_step: "
                                               r"expected int, found str 'forty'"):
        bad.setup()


# ---------------------------------------------------------------------------------------------------- the report
def test_after_a_rollback_the_report_and_the_export_describe_the_exported_weights(tmp_path):
    from mnemoguard.callbacks import Callback

    class BestAt2(Callback):
        def on_step_end(self, state, control, **kwargs):
            if state.global_step == 2:
                state.best_step, state.best_metric = 2, 0.0
                control.should_save = True

    cfg = tiny_recipe(tmp_path, "training.max_train_steps=4", "training.checkpointing_steps=100",
                      "training.export=best", "guard.enabled=true", "guard.monitor.every_n_steps=2",
                      "guard.monitor.curvature_every_k_checks=0", "guard.report.plots=false")
    trainer = Trainer(cfg, callbacks=[BestAt2()])
    trainer.train()
    mon = trainer.guard.monitor
    assert [h["step"] for h in mon.training_history] == [2, 4] and mon.history[-1]["weights"]["source"] == "best"
    # The end check measured the exported (step-2) weights: it repeats the step-2 check, not the step-4 one (but for
    # the live-vs-EMA gap: the EMA is the run's, at step 4).
    end, at2, at4 = ({k: v for k, v in h["metrics"].items() if "live_vs" not in k} for h in
                     (mon.history[-1], mon.history[0], mon.history[1]))
    assert end == at2 != at4
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["exported"]["source"] == "best" and summary["exported"]["step"] == 2
    assert summary["last_step"]["step"] == 4
    with safe_open(str(tmp_path / "final" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["mnemoguard_exported_source"] == "best" and meta["mnemoguard_exported_step"] == "2"
    assert meta["mnemoguard_verdict"] == summary["verdict"]
    assert "(about the exported best weights, step 2)" in (tmp_path / "report" / "report.md").read_text()


def test_a_failed_run_leaves_a_report_marked_failed(tmp_path):
    from mnemoguard.callbacks import Callback

    class Crash(Callback):
        def on_step_end(self, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("disk full")

    cfg = tiny_recipe(tmp_path, "training.max_train_steps=4", "guard.enabled=true", "guard.monitor.every_n_steps=1",
                      "guard.monitor.curvature_every_k_checks=0", "guard.report.plots=false")
    with pytest.raises(RuntimeError, match="disk full"):
        Trainer(cfg, callbacks=[Crash()]).train()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "This report is incomplete: the run is failed at step 2: RuntimeError: disk full" in report


# ---------------------------------------------------------------------------------------------------- data, dirs
def _folder(root: Path, rows: list[tuple[str, str]], corrupt: set[int] = frozenset()) -> Path:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    for i, _ in enumerate(rows):
        if i in corrupt:
            (root / f"{i}.png").write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((16, 16), 15 * i, dtype=np.uint8)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": t}) + "\n"
                                                 for i, (_, t) in enumerate(rows)))
    return root


def test_bad_data_is_one_line_naming_the_row_and_file_before_step_one(tmp_path, capsys):
    data = _folder(tmp_path / "data", [("", "a digit")] * 12, corrupt={7})
    args = ["train", str(ROOT / "recipes" / "demo.yaml"), "--set", f"training.output_dir={tmp_path / 'out'}",
            "--set", f"data.source={data}", "--set", "model.tiny.text_encoder=clip", "--set", "model.tiny.base=null",
            "--set", "training.train_batch_size=4"]
    assert cli(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: datasets' own progress bars)
    assert last.startswith("mnemoguard: DataError: row 7") and "7.png" in last and "cannot read the image" in last
    (data / "metadata.jsonl").write_text("")
    assert cli(args) == 2
    assert "metadata.jsonl is empty: expected one JSON line per image" in capsys.readouterr().err


def test_skipped_rows_are_counted_across_a_resume(tmp_path):
    data = _folder(tmp_path / "data", [("", "a digit")] * 16, corrupt={1, 3, 5, 7, 9, 11, 13})
    common = (f"data.source={data}", "data.skip_bad_samples=true", "training.train_batch_size=5",
              "training.checkpointing_steps=2", "logging.report_to=none")
    first = Trainer(tiny_recipe(tmp_path / "out", "training.max_train_steps=2", *common)).train()
    skipped = first.metrics["data/skipped_samples"]
    assert skipped >= 1
    resumed = Trainer(tiny_recipe(tmp_path / "out", "training.max_train_steps=6", *common,
                                  "training.resume_from_checkpoint=latest")).train()
    assert resumed.metrics["data/skipped_samples"] > skipped  # counting on from the checkpoint's count


def test_an_earlier_run_in_the_output_dir_is_refused_unless_overwrite(tmp_path):
    Trainer(tiny_recipe(tmp_path, "training.max_train_steps=2", "logging.report_to=none")).train()
    with pytest.raises(OutputDirError, match="holds an earlier run .*checkpoint-2.*--overwrite"):
        Trainer(tiny_recipe(tmp_path, "training.max_train_steps=2")).setup()
    state = Trainer(tiny_recipe(tmp_path, "training.max_train_steps=1", "training.overwrite_output_dir=true",
                                "training.checkpointing_steps=1", "logging.report_to=none")).train()
    assert state.global_step == 1 and sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not math.isnan(state.metrics["train/loss"])
