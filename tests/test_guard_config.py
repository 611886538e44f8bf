import pytest
import torch

from mnemoguard.callbacks import (
    AntiGradientControl,
    Callback,
    EarlyStopping,
    MemorizationMonitor,
    MemorizationReport,
    MitigationPolicy,
    NoiseGapScheduler,
    TensorBoardDashboard,
    WenFilter,
)
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
        "regularizers": {"iet_agc": {"enabled": False}, "wen_filter": {"threshold": 4.0}},
        "early_stopping": {"enabled": True, "monitor": "mem/x"},
    }})
    callbacks = build_guard_callbacks(cfg.guard)
    assert [type(cb) for cb in callbacks] == [
        MemorizationMonitor, MitigationPolicy, NoiseGapScheduler, WenFilter, AntiGradientControl, EarlyStopping,
        TensorBoardDashboard, MemorizationReport,
    ]
    assert callbacks[-1].monitor is callbacks[0] and callbacks[-2].monitor is callbacks[0]


def test_bad_guard_settings_are_clear_errors():
    with pytest.raises(ConfigError, match=r"guard\.early_stopping\.mode: expected one of \('min', 'max'\)"):
        load_config(None, ["guard.early_stopping.mode=lowest"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) guard\.noise_gap\.gap_size"):
        load_config(None, ["guard.noise_gap.gap_size=3"])
    with pytest.raises(KeyError, match="unknown regularizer 'wen'"):
        build_guard_callbacks(load_config(None, ["guard.enabled=true", "guard.regularizers={wen: {}}"]).guard)
    with pytest.raises(ValueError, match="needs guard.early_stopping.monitor"):
        build_guard_callbacks(load_config(None, ["guard.enabled=true", "guard.early_stopping.enabled=true"]).guard)


def test_recipe_noise_gap_and_early_stopping_act_on_a_real_run(tmp_path):
    seen = SeenTimesteps()
    cfg = tiny_recipe(
        tmp_path, "guard.enabled=true", "guard.monitor.enabled=false", "guard.noise_gap.enabled=true",
        "guard.noise_gap.timestep_bias_strategy=gap", "guard.noise_gap.timestep_bias_begin=300",
        "guard.noise_gap.timestep_bias_end=700", "guard.noise_gap.timestep_bias_multiplier=0.0",
        "guard.early_stopping.enabled=true", "guard.early_stopping.monitor=train/loss",
        "guard.early_stopping.divergence_threshold=0.0", "guard.early_stopping.start_from_step=2",
    )
    state = Trainer(cfg, callbacks=[seen]).train()
    assert state.global_step == 2 and "train/loss" in state.stop_reason
    t = torch.tensor(seen.seen)
    assert len(t) == 16 and not ((t >= 300) & (t < 700)).any()


def test_the_whole_guard_from_a_recipe_monitors_acts_and_reports(tmp_path):
    from .trainer_utils import scalars

    signal = "mem/live_vs_ema/band=mid/train"
    cfg = tiny_recipe(
        tmp_path, "training.max_train_steps=4", "guard.enabled=true", "guard.monitor.every_n_steps=2",
        "guard.monitor.curvature_every_k_checks=0", "guard.noise_gap.enabled=true",
        f"guard.policy=[{{signal: {signal}, threshold: 0.0, band: [333, 666]}}]",
        "guard.early_stopping.enabled=true", f"guard.early_stopping.monitor={signal}",
    )
    trainer = Trainer(cfg)
    state = trainer.train()
    assert state.is_fresh(signal) and state.global_step == 4
    policy = next(cb for cb in trainer.callbacks if isinstance(cb, MitigationPolicy))
    assert policy.alarms and policy.alarms[0]["action"] == "noise_gap"
    assert [s for s, _ in scalars(tmp_path / "logs", signal)] == [2, 4]
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "summary.json").is_file()
