"""One short real run of the reference trainer with the noise gap, the policy and early stopping from a recipe, fed by
a callback of the user's; then a resume from the best checkpoint."""

import json

import torch

from mnemoguard.callbacks import Callback
from mnemoguard.trainer import Trainer

from ..trainer_utils import tiny_recipe

GUARD = ("guard.enabled=true", "guard.monitor.enabled=false",
         "guard.policy=[{signal: 'val/fake_gap', action: noise_gap, threshold: 0.5, band: [300, 700]}]",
         "guard.early_stopping.enabled=true", "guard.early_stopping.monitor=val/fake",
         "guard.early_stopping.patience=1")


class Producer(Callback):
    """Plays a monitor: a memorization signal and a held-out loss, fresh every step."""

    def on_step_end(self, state, control, logs, **kwargs):
        values = {"val/fake_gap": 0.9, "val/fake": [1.0, 0.5, 0.6, 0.7][state.global_step - 1]}
        state.update_metrics(values)
        logs.update(values)
        control.should_log = True


class Recorder(Callback):
    """Records the timesteps each step trains on and every use of the cross-rank stop trigger."""


    def __init__(self):
        self.timesteps, self.triggers = {}, []

    def on_train_begin(self, state, control, context, **kwargs):
        accelerator = context.accelerator
        set_trigger = accelerator.set_trigger

        def spy():
            self.triggers.append(state.global_step)
            set_trigger()

        accelerator.set_trigger = spy

    def on_before_forward(self, state, control, inputs, **kwargs):
        self.timesteps.setdefault(state.global_step + 1, []).extend(inputs["timesteps"].tolist())


def test_scheduler_policy_and_early_stopping_in_a_real_run(tmp_path):
    rec = Recorder()
    cfg = tiny_recipe(tmp_path, "training.max_train_steps=4", "training.checkpointing_steps=100", *GUARD)
    trainer = Trainer(cfg, callbacks=[Producer(), rec])
    state = trainer.train()
    parts = trainer.guard.components
    gap, policy, stopper = parts.noise_gap, parts.policy, parts.early_stopping

    assert trainer.guard.context.timesteps.sampler is gap and gap.num_train_timesteps == 1000
    # The policy turned the gap on at step 1: steps 2 and 3 never train on [300, 700).
    assert [a["step"] for a in policy.alarms] == [1] and gap.active and gap.band == (300, 700)
    later = torch.tensor(rec.timesteps[2] + rec.timesteps[3])
    assert later.numel() == 16 and not ((later >= 300) & (later < 700)).any()
    # Early stopping: best at step 2 (checkpointed, recorded as the rollback target), stop at step 3; with one process
    # the accelerator's cross-rank trigger is not used (no sync; tests/test_distributed.py has the two-rank stop).
    assert state.global_step == 3 and stopper.stopped_step == 3 and rec.triggers == []
    assert state.best_step == 2 and state.best_metric == 0.5 and state.best_checkpoint.endswith("checkpoint-2")
    assert state.stop_reason == stopper.stop_reason and "val/fake" in state.stop_reason
    # Each improvement (steps 1 and 2) asked for a checkpoint; the stop wrote the last one.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    logged = state.log_history[-1]
    assert logged["mem/noise_gap/strength"] == logged["mem/alarm"] == logged["mem/policy/noise_gap"] == 1.0
    # Every component's state rides in the checkpoint, as JSON (no pickle of the project's).
    doc = json.loads((tmp_path / "checkpoint-3" / "mnemoguard_state.json").read_text())
    assert not list((tmp_path / "checkpoint-3").glob("custom_checkpoint_*"))
    components = doc["components"]
    assert components[stopper.state_key]["stopped_step"] == 3 and components[stopper.state_key]["best_step"] == 2
    assert components["MitigationPolicy"]["alarms"][0]["action"] == "noise_gap"
    assert components["NoiseGapScheduler"]["band"] == [300, 700]
    assert doc["trainer_state"]["best_checkpoint"].endswith("checkpoint-2")  # the final name, not the temporary one

    # Resume from the best checkpoint with a fresh trainer: every state comes back and the run replays the stop.
    rec2 = Recorder()
    cfg = tiny_recipe(tmp_path, "training.max_train_steps=4", "training.checkpointing_steps=100", *GUARD,
                      "training.resume_from_checkpoint=checkpoint-2")
    trainer2 = Trainer(cfg, callbacks=[Producer(), rec2])
    state = trainer2.train()
    parts2 = trainer2.guard.components
    assert parts2.noise_gap.active and parts2.noise_gap.band == (300, 700)
    assert parts2.policy.alarms == json.loads(json.dumps(policy.alarms))
    assert not any(300 <= t < 700 for t in rec2.timesteps[3])
    assert state.global_step == 3 and parts2.early_stopping.stopped_step == 3
    assert parts2.early_stopping.best_step == 2
