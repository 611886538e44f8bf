"""The bench's mitigation arms (recipe settings they turn on) and the mitigation / early-stopping summary."""

import contextlib

import pytest

from mnemoguard.bench.config import load_bench_config
from mnemoguard.bench.mitigation import MITIGATIONS, READS_MONITOR, WEN_TAU_TESTBED, apply_mitigation
from mnemoguard.bench.mitigation_summary import (
    STOPPED,
    early_stop_step,
    mitigation_markdown,
    stopping_markdown,
)
from mnemoguard.config import ConfigError, GuardConfig, load_config
from mnemoguard.guard import build_components


def _guard(arm: str, monitor_on: bool = True) -> GuardConfig:
    guard = GuardConfig()
    apply_mitigation(guard, arm, monitor_on)
    return guard


def test_none_leaves_the_guard_off():
    assert _guard("none") == GuardConfig()


@pytest.mark.parametrize("arm", sorted(set(MITIGATIONS) - {"none"}))
def test_every_arm_turns_the_guard_on_and_builds(arm, tmp_path):
    reads_monitor = arm in READS_MONITOR
    guard = _guard(arm, monitor_on=reads_monitor)
    if arm == "policy":
        guard = _with_heldout(guard, tmp_path)
    assert guard.enabled
    callbacks = build_components(guard).ordered()
    names = {type(c).__name__ for c in callbacks} | {getattr(c, "name", "") for c in callbacks}
    expected = {"noise_gap_low": "NoiseGapScheduler", "noise_gap_mid": "NoiseGapScheduler",
                "noise_gap_low_half": "NoiseGapScheduler", "noise_gap_prior": "NoiseGapScheduler",
                "adaptive_gap": "DangerZoneTracker", "danger_zone_policy": "MitigationPolicy",
                "policy": "duplicate_weight", "caption_replacement": "random_caption_replacement",
                "embedding_noise": "gaussian_embedding_noise", "preservation": "baseline_preservation",
                "danger_zone_duplicate": "duplicate_weight"}.get(arm, arm)
    assert expected in names  # the arm's action is among the callbacks
    assert ("MemorizationMonitor" in names) == reads_monitor
    if arm == "adaptive_gap":
        policy = next(c for c in callbacks if type(c).__name__ == "MitigationPolicy")
        tracker = next(c for c in callbacks if type(c).__name__ == "DangerZoneTracker")
        follow = next(r for r in policy.rules if r.action == "noise_gap")  # the one route: a rule on the tracker
        tracker.zone, tracker.strength = (100, 200), 0.3
        assert follow.signal == "mem/danger_zone/active" and follow.band() == (100, 200) and follow.strength() == 0.3
    with pytest.raises(ConfigError, match="monitor") if reads_monitor else contextlib.nullcontext():
        _guard(arm, monitor_on=False)


def test_arms_set_the_documented_actions():
    gap = _guard("noise_gap_mid").noise_gap
    assert gap.enabled and gap.timestep_bias_strategy == "gap" and gap.timestep_bias_multiplier == 0.0
    assert (gap.timestep_bias_begin, gap.timestep_bias_end) == (333, 666)
    assert _guard("noise_gap_low").noise_gap.timestep_bias_end == 333
    half = _guard("noise_gap_low_half").noise_gap
    assert (half.timestep_bias_end, half.timestep_bias_multiplier) == (333, 0.5)
    rule = _guard("danger_zone_policy", monitor_on=True).policy[0]  # scale-free: a difference of return rates
    assert (rule.signal, rule.action, rule.threshold, rule.release) == ("mem/danger_zone/excess", "iet_agc", 0.5, 0.25)
    prior = _guard("noise_gap_prior").noise_gap  # Dodson's gap training over the digits testbed's prior band
    assert (prior.timestep_bias_begin, prior.timestep_bias_end, prior.timestep_bias_multiplier) == (180, 740, 0.0)
    assert _guard("wen_filter").regularizers == {"wen_filter": {"threshold": WEN_TAU_TESTBED}}
    assert _guard("caption_replacement").regularizers["random_caption_replacement"]["prob"] == 0.1
    assert _guard("embedding_noise").regularizers["gaussian_embedding_noise"]["lam"] == 0.1
    assert _guard("iet_agc").monitor.enabled and not _guard("iet_agc", monitor_on=False).monitor.enabled


def test_policy_arm_installs_the_default_policy_that_the_duplicate_weight_arm_measures(tmp_path):
    from mnemoguard.callbacks import MitigationPolicy
    from mnemoguard.callbacks.regularizers import DuplicateWeight
    from mnemoguard.config import check_guard_config
    from mnemoguard.config.plan import plan_components

    guard = _guard("policy")
    assert guard.default_policy and guard.policy == []
    check_guard_config(guard)  # no held-out images needed: the default mitigation reads the duplicate scan only
    plan, measured = plan_components(guard), plan_components(_guard("duplicate_weight"))
    assert (plan.rules, plan.regularizers, plan.danger_zone) == (measured.rules, measured.regularizers, False)
    callbacks = build_components(_with_heldout(guard, tmp_path)).ordered()
    action = next(c for c in callbacks if isinstance(c, DuplicateWeight))
    assert action.active and action.strength == 1.0  # on from the first step, every copy weighed 1/m
    assert not any(isinstance(c, MitigationPolicy) and c.rules for c in callbacks)
    guard.monitor.enabled = False
    with pytest.raises(ConfigError, match=r"guard.default_policy reads the copies of each image .* needs "
                                          r"guard.monitor.enabled, found false"):
        check_guard_config(guard)


def _with_heldout(guard: GuardConfig, tmp_path) -> GuardConfig:
    """The guard with a tiny held-out image folder (two 16-px images with captions)."""
    import json

    import numpy as np
    from PIL import Image

    folder = tmp_path / "heldout"
    folder.mkdir()
    rows = []
    for i in range(2):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a digit {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    guard.monitor.heldout_data = str(folder)
    return guard


def test_unknown_arm_and_policy_without_monitor_are_config_errors():
    with pytest.raises(ConfigError, match="expected one of .*found 'dedupe'"):
        load_bench_config(None, ["train.mitigation=dedupe"])
    with pytest.raises(ConfigError, match="monitor_every > 0, found 0"):
        load_bench_config(None, ["train.mitigation=policy", "train.monitor_every=0"])
    with pytest.raises(ConfigError, match="found 'dedupe'"):
        apply_mitigation(load_config().guard, "dedupe", True)


# ---------------------------------------------------------------------------------------------------- summary
def _run(arm, seed, mem, held, fid, monitor=(), checkpoints=None, stop=False):
    """A bench.json with one last checkpoint (or ``checkpoints``: [(step, memorized at w=1)]), no ``exported``
    (as written before it existed: the last checkpoint is read)."""
    cps = [(1000, mem)] if checkpoints is None else checkpoints
    return {
        "seed": seed,
        "config": {"train": {"mitigation": arm, "eval_every": 100, "stop": stop}},
        "monitor": [{"step": s, "mem/x": v} for s, v in monitor],
        "checkpoints": [{
            "step": step,
            "ground_truth": {w: {"planted": {"memorized_fraction": {"fraction": m}}} for w in ("w=1", "w=3")},
            "loss_by_band": {"held_out": [held, held]},
            "fidelity": {"w=1": {"negatives": fid}, "w=3": {"negatives": fid}},
        } for step, m in cps],
    }


def test_mitigation_table_compares_each_arm_with_none_of_the_same_seed():
    runs = [_run("none", 0, 0.5, 0.10, 0.9), _run("none", 1, 0.4, 0.20, 0.8),
            _run("wen_filter", 0, 0.05, 0.104, 0.89), _run("wen_filter", 1, 0.0, 0.21, 0.8)]
    table = mitigation_markdown(runs)
    row = next(line for line in table.splitlines() if line.startswith("| wen_filter"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == "0,1"
    assert cells[2] == "2.5 (5.0, 0.0) %"  # memorized at w=1, mean then each seed
    assert cells[4].startswith("0.05 (0.10, 0.00)")  # ratios to none: 0.05/0.5, 0/0.4
    assert cells[6] == "4.5 (4.0, 5.0) %"  # held-out loss change
    assert cells[9] == "-0.5 (-1.0, 0.0)"  # fidelity points
    with pytest.raises(ValueError, match="unmitigated runs"):
        mitigation_markdown(runs[2:])


def test_stopped_arm_reads_the_weights_its_run_exported():
    stops = _run("none", 0, 0.5, 0.1, 0.9, checkpoints=[(300, 0.0), (400, 0.01), (500, 0.06)], stop=True)
    stops.update(steps=500, exported={**stops["checkpoints"][1], "source": "best"})  # rolled back to 400
    never = _run("none", 1, 0.4, 0.1, 0.9, stop=True)
    never.update(steps=1000, exported={**never["checkpoints"][-1], "source": "last"})
    table = mitigation_markdown([_run("none", 0, 0.5, 0.1, 0.9), _run("none", 1, 0.4, 0.1, 0.9), stops, never])
    row = next(line for line in table.splitlines() if line.startswith(f"| none{STOPPED}"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0].endswith("(ended at → exported: 500 → 400, 1000 → 1000)")
    assert cells[2] == "20.5 (1.0, 40.0) %"  # the rollback checkpoint's 1 %, not the stop step's 6 %
    assert cells[4].startswith("0.51 (0.02, 1.00)")  # against the unstopped runs of the same seeds
    assert stopping_markdown([stops, never], "mem/x", [0.05]).count("\n") == 1  # stopped runs are no reference


def test_early_stop_replay_uses_lightning_divergence_semantics():
    history = [{"step": 50, "mem/x": 0.02}, {"step": 100, "mem/x": 0.09}, {"step": 150, "mem/x": 0.11},
               {"step": 200}, {"step": 250, "mem/x": 0.2}]
    assert early_stop_step(history, "mem/x", 0.1)[0] == 150  # first value worse than the threshold (mode min)
    assert early_stop_step(history, "mem/x", 0.15)[0] == 250
    assert early_stop_step(history, "mem/x", 0.5) == (None, None)
    assert early_stop_step(history, "mem/x", 0.1, start_from_step=200)[0] == 250
    # The default stop's rollback: the last check before the stop, not the best-scoring one.
    assert early_stop_step(history, "mem/x", 0.1, rollback="last_good") == (150, 100)
    assert early_stop_step(history, "mem/x", 0.1) == (150, 50)


def test_stopping_table_marks_stops_within_ten_percent_of_the_oracle():
    run = _run("none", 0, 0, 0.1, 0.9, monitor=[(300, 0.05), (400, 0.09), (500, 0.12)],
               checkpoints=[(300, 0.0), (400, 0.02), (500, 0.06), (600, 0.2)])
    table = stopping_markdown([run], "mem/x", [0.1, 0.08])
    row = table.splitlines()[-1]
    assert "| 0 | 100 | 500 | 600 | 500 (+0%, ok) | 400 (-20%) |" == row


def test_a_mitigation_arm_runs_end_to_end_with_fidelity_and_no_signals(tmp_path):
    from mnemoguard.bench.run import run_bench

    from .test_bench import TINY

    res = run_bench(None, tmp_path / "run", overrides=[
        *TINY, "train.mitigation=noise_gap_mid", "signals.enabled=false", "localization.enabled=false",
        "danger_zone.enabled=false"])
    assert res["config"]["train"]["mitigation"] == "noise_gap_mid"
    cp = res["checkpoints"][-1]
    assert cp["detection"] == {} and cp["scores"] == {}
    assert set(cp["fidelity"]) == {"w=1", "w=3"}
    assert set(cp["fidelity"]["w=1"]) == {"planted", "unseen", "held_out", "negatives"}
    assert all(0 <= v <= 1 for f in cp["fidelity"].values() for v in f.values())
    assert any(k.startswith("mem/noise_gap/") for h in res["monitor"] for k in h)  # the gap was installed
