"""One short real run of the reference trainer with the scheduler, the policy and early stopping together."""

import torch

from mnemoguard.callbacks import Callback, EarlyStopping, MitigationPolicy, NoiseGapScheduler, Rule
from mnemoguard.trainer import Trainer

from ..trainer_utils import tiny_recipe


class Producer(Callback):
    """Plays a monitor: a memorization signal and a held-out loss, fresh every step."""

    def on_step_end(self, state, control, logs, **kwargs):
        values = {"mem/fake/t=500": 0.9, "val/fake": [1.0, 0.5, 0.6, 0.7][state.global_step - 1]}
        state.update_metrics(values)
        logs.update(values)
        control.should_log = True


class Recorder(Callback):
    """Records the timesteps each step trains on and every use of the cross-rank stop trigger."""

    def __init__(self):
        self.timesteps, self.triggers = {}, []

    def on_train_begin(self, state, control, accelerator, **kwargs):
        set_trigger = accelerator.set_trigger

        def spy():
            self.triggers.append(state.global_step)
            set_trigger()

        accelerator.set_trigger = spy

    def on_before_forward(self, state, control, inputs, **kwargs):
        self.timesteps.setdefault(state.global_step + 1, []).extend(inputs["timesteps"].tolist())


def test_scheduler_policy_and_early_stopping_in_a_real_run(tmp_path):
    gap = NoiseGapScheduler()
    policy = MitigationPolicy([Rule("mem/fake/t=500", "noise_gap", threshold=0.5, band=(300, 700))])
    stopper = EarlyStopping("val/fake", patience=1)
    rec = Recorder()
    trainer = Trainer(tiny_recipe(tmp_path, "training.max_train_steps=4", "training.checkpointing_steps=100"),
                      callbacks=[Producer(), gap, policy, stopper, rec])
    state = trainer.train()

    assert trainer.timestep_sampler is gap and gap.num_train_timesteps == 1000
    # The policy turned the gap on at step 1: steps 2 and 3 never train on [300, 700).
    assert [a["step"] for a in policy.alarms] == [1] and gap.active and gap.band == (300, 700)
    later = torch.tensor(rec.timesteps[2] + rec.timesteps[3])
    assert later.numel() == 16 and not ((later >= 300) & (later < 700)).any()
    # Early stopping: best at step 2 (checkpointed, recorded as the rollback target), stop at step 3 on the only
    # rank, through the accelerator's cross-rank trigger; the run ends there with a checkpoint.
    assert state.global_step == 3 and stopper.stopped_step == 3 and rec.triggers == [3]
    assert state.best_step == 2 and state.best_metric == 0.5 and state.best_checkpoint.endswith("checkpoint-2")
    assert state.stop_reason == stopper.stop_reason and "val/fake" in state.stop_reason
    # Each improvement (steps 1 and 2) asked for a checkpoint; the stop wrote the last one.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    logged = state.log_history[-1]
    assert logged["mem/noise_gap/strength"] == logged["mem/alarm"] == logged["mem/policy/noise_gap"] == 1.0
    # Every callback's state rides in the checkpoint.
    files = sorted((tmp_path / "checkpoint-3").glob("custom_checkpoint_*"))
    saved = [torch.load(p, weights_only=False) for p in files]
    callbacks = next(s for s in saved if stopper.state_key in s)
    assert callbacks[stopper.state_key]["stopped_step"] == 3 and callbacks[stopper.state_key]["best_step"] == 2
    assert callbacks["MitigationPolicy"]["alarms"][0]["action"] == "noise_gap"
    assert callbacks["NoiseGapScheduler"]["band"] == [300, 700]

    # Resume from the best checkpoint with fresh callbacks: every state comes back and the run replays the stop.
    gap2, stopper2, rec2 = NoiseGapScheduler(), EarlyStopping("val/fake", patience=1), Recorder()
    policy2 = MitigationPolicy([Rule("mem/fake/t=500", "noise_gap", threshold=0.5, band=(300, 700))])
    cfg = tiny_recipe(tmp_path, "training.max_train_steps=4", "training.checkpointing_steps=100",
                      "training.resume_from_checkpoint=checkpoint-2")
    state = Trainer(cfg, callbacks=[Producer(), gap2, policy2, stopper2, rec2]).train()
    assert gap2.active and gap2.band == (300, 700) and policy2.alarms == policy.alarms
    assert not any(300 <= t < 700 for t in rec2.timesteps[3])
    assert state.global_step == 3 and stopper2.stopped_step == 3 and stopper2.best_step == 2 and rec2.triggers == [3]
