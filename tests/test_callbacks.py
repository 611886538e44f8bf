import pytest
import torch

from mnemoguard.callbacks import Callback, CallbackList, DensitySampler, TrainerControl, TrainerState


class Recorder(Callback):
    def __init__(self, name, events):
        self.name, self.events, self.count = name, events, 0

    @property
    def state_key(self):
        return self.name

    def on_step_end(self, state, control, **kwargs):
        self.count += 1
        self.events.append((self.name, "on_step_end", state.global_step))

    def on_train_begin(self, state, control, **kwargs):
        self.events.append((self.name, "on_train_begin", state.global_step))

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_callbacks_fire_in_registration_order():
    events = []
    cbs = CallbackList([Recorder("a", events), Recorder("b", events)])
    state, control = TrainerState(), TrainerControl()
    cbs.call("on_train_begin", state, control)
    state.global_step = 1
    cbs.call("on_step_end", state, control, logs={})
    assert events == [("a", "on_train_begin", 0), ("b", "on_train_begin", 0), ("a", "on_step_end", 1),
                      ("b", "on_step_end", 1)]


def test_callback_state_round_trips_by_key():
    events = []
    cbs = CallbackList([Recorder("a", events)])
    cbs.call("on_step_end", TrainerState(), TrainerControl())
    saved = {key: cb.state_dict() for key, cb in cbs.stateful().items()}
    fresh = CallbackList([Recorder("a", [])])
    fresh.stateful()["a"].load_state_dict(saved["a"])
    assert fresh.callbacks[0].count == 1 and set(cbs.seconds) == {"a"}


def test_duplicate_state_keys_and_unknown_events_are_errors():
    with pytest.raises(ValueError, match="already registered"):
        CallbackList([Recorder("a", []), Recorder("a", [])])
    with pytest.raises(ValueError, match="unknown callback event"):
        CallbackList().call("on_banana", TrainerState(), TrainerControl())
    with pytest.raises(TypeError, match="expected a mnemoguard Callback"):
        CallbackList([object()])


def test_trainer_state_log_keeps_history_and_latest_metrics():
    state = TrainerState(global_step=3)
    state.log({"train/loss": torch.tensor(0.5)})
    assert state.metrics == {"train/loss": 0.5} and state.log_history == [{"step": 3, "train/loss": 0.5}]
    restored = TrainerState()
    restored.load_state_dict(state.state_dict())
    assert restored.global_step == 3 and restored.log_history == state.log_history


def test_uniform_sampler_covers_the_range_with_unit_weights():
    from diffusers import DDPMScheduler

    from mnemoguard.family import noise_schedule

    sampler = DensitySampler(noise_schedule(DDPMScheduler(num_train_timesteps=1000)))
    t, w = sampler(20_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1000
    assert torch.equal(w, torch.ones(20_000))
    counts = torch.bincount(t // 100, minlength=10).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.06
