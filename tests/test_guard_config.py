import pytest
import torch

from mnemoguard.callbacks import Callback, EarlyStopping, MitigationPolicy, NoiseGapScheduler
from mnemoguard.callbacks.guard import build_guard_callbacks
from mnemoguard.config import ConfigError, load_config
from mnemoguard.trainer import Trainer

from .trainer_utils import tiny_recipe


class SeenTimesteps(Callback):
    def __init__(self):
        self.seen = []

    def on_before_forward(self, state, control, inputs, **kwargs):
        self.seen += inputs["timesteps"].tolist()


def test_guard_is_off_unless_enabled():
    assert build_guard_callbacks(load_config().guard) == []
    cfg = load_config(None, ["guard.noise_gap.enabled=true"])
    assert build_guard_callbacks(cfg.guard) == []


def test_recipe_guard_builds_callbacks_in_producer_consumer_order():
    cfg = load_config({"guard": {
        "enabled": True,
        "policy": [{"signal": "mem/x", "threshold": 1.0, "band": [300, 700]}],
        "noise_gap": {"enabled": True},
        "early_stopping": {"enabled": True, "monitor": "mem/x"},
    }})
    kinds = [type(cb) for cb in build_guard_callbacks(cfg.guard)]
    assert kinds == [MitigationPolicy, NoiseGapScheduler, EarlyStopping]


def test_bad_guard_settings_are_clear_errors():
    with pytest.raises(ConfigError, match=r"guard\.early_stopping\.mode: expected one of \('min', 'max'\)"):
        load_config(None, ["guard.early_stopping.mode=lowest"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) guard\.noise_gap\.gap_size"):
        load_config(None, ["guard.noise_gap.gap_size=3"])
    with pytest.raises(ValueError, match="needs guard.early_stopping.monitor"):
        build_guard_callbacks(load_config(None, ["guard.enabled=true", "guard.early_stopping.enabled=true"]).guard)


def test_recipe_noise_gap_and_early_stopping_act_on_a_real_run(tmp_path):
    seen = SeenTimesteps()
    cfg = tiny_recipe(
        tmp_path, "guard.enabled=true", "guard.noise_gap.enabled=true",
        "guard.noise_gap.timestep_bias_strategy=gap", "guard.noise_gap.timestep_bias_begin=300",
        "guard.noise_gap.timestep_bias_end=700", "guard.noise_gap.timestep_bias_multiplier=0.0",
        "guard.early_stopping.enabled=true", "guard.early_stopping.monitor=train/loss",
        "guard.early_stopping.divergence_threshold=0.0", "guard.early_stopping.start_from_step=2",
    )
    state = Trainer(cfg, callbacks=[seen]).train()
    assert state.global_step == 2 and "train/loss" in state.stop_reason
    t = torch.tensor(seen.seen)
    assert len(t) == 16 and not ((t >= 300) & (t < 700)).any()
