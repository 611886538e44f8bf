import pytest
import torch

from mnemoguard.callbacks import (
    AntiGradientControl,
    Callback,
    EarlyStopping,
    LowLossFlags,
    MemorizationMonitor,
    MemorizationReport,
    MitigationPolicy,
    NoiseGapScheduler,
    TensorBoardDashboard,
    WenFilter,
)
from mnemoguard.config import ConfigError, load_config
from mnemoguard.guard import build_components
from mnemoguard.trainer import Trainer

from .trainer_utils import tiny_recipe


class SeenTimesteps(Callback):
    def __init__(self):
        self.seen = []

    def on_before_forward(self, state, control, inputs, **kwargs):
        self.seen += inputs["timesteps"].tolist()


def test_guard_is_off_unless_enabled():
    assert build_components(load_config().guard).ordered() == []
    cfg = load_config(None, ["guard.noise_gap.enabled=true"])
    assert build_components(cfg.guard).ordered() == []


def test_recipe_guard_builds_components_in_producer_consumer_order_and_wires_them():
    cfg = load_config({"guard": {
        "enabled": True,
        "policy": [{"signal": "mem/probe_loss/band=mid/train", "threshold": 1.0, "band": [300, 700]}],
        "noise_gap": {"enabled": True},
        "regularizers": {"iet_agc": {"enabled": False}, "wen_filter": {"threshold": 4.0}},
        "early_stopping": {"enabled": True, "monitor": "mem/probe_loss/band=mid/train"},
    }})
    mine = SeenTimesteps()
    parts = build_components(cfg.guard, [mine])
    assert [type(cb) for cb in parts.ordered()] == [
        LowLossFlags, MemorizationMonitor, SeenTimesteps, MitigationPolicy, NoiseGapScheduler, WenFilter,
        AntiGradientControl, EarlyStopping, TensorBoardDashboard, MemorizationReport,
    ]
    assert parts.report.monitor is parts.monitor and parts.dashboard.monitor is parts.monitor
    assert parts.dashboard.policy is parts.policy and parts.report.loss_flags is parts.loss_flags
    assert parts.policy.actions == {"noise_gap": parts.noise_gap, "wen_filter": parts.regularizers[0],
                                    "iet_agc": parts.regularizers[1]}


def test_bad_guard_settings_are_clear_errors():
    with pytest.raises(ConfigError, match=r"guard\.early_stopping\.mode: expected one of \['min', 'max'\]"):
        load_config(None, ["guard.early_stopping.mode=lowest"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) guard\.noise_gap\.gap_size"):
        load_config(None, ["guard.noise_gap.gap_size=3"])
    with pytest.raises(ConfigError, match=r"guard.regularizers.wen: unknown regularizer 'wen'; expected one of"):
        load_config(None, ["guard.enabled=true", "guard.regularizers={wen: {}}"])
    with pytest.raises(ConfigError, match="needs guard.early_stopping.monitor"):
        load_config(None, ["guard.enabled=true", "guard.early_stopping.enabled=true"])
    with pytest.raises(ConfigError, match=r"action 'wen_filter' is not configured, so the rule could never act"):
        load_config(None, ["guard.enabled=true", "guard.policy=[{signal: val/x, action: wen_filter, threshold: 1}]"])


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
    policy = trainer.guard.policy
    assert policy.alarms and policy.alarms[0]["action"] == "noise_gap"
    assert [s for s, _ in scalars(tmp_path / "logs", signal)] == [2, 4]
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "summary.json").is_file()


def test_the_guard_docs_first_example_loads_and_turns_on_the_defaults(tmp_path):
    import re
    from pathlib import Path

    from mnemoguard.config.plan import plan_components

    text = (Path(__file__).resolve().parents[1] / "docs" / "guard.md").read_text()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(re.search(r"```yaml\n(guard:.*?)```", text, re.S).group(1))
    guard = load_config(recipe).guard
    plan = plan_components(guard)
    assert guard.default_policy and plan.danger_zone and guard.danger_zone.every_n_checks == 1
    assert plan.early_stopping.monitor == "mem/danger_zone/copy_rate_lower"
