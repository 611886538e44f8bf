import pytest

from mnemoguard.callbacks import MitigationPolicy, NoiseGapScheduler, TrainerControl, TrainerState
from mnemoguard.config import Rule

from ._drive import drive


class Switch:
    """An action that records its calls."""

    def __init__(self):
        self.calls = []

    def activate(self, strength=1.0, band=None):
        self.calls.append(("on", strength, band))

    def deactivate(self):
        self.calls.append(("off",))


def alarms(policy):
    return [(a["step"], a["rule"], a["on"]) for a in policy.alarms]


def test_threshold_needs_patience_consecutive_fresh_checks():
    sw = Switch()
    policy = MitigationPolicy([Rule("mem/gap", "sw", threshold=0.5, patience=2, name="r")], {"sw": sw})
    # Fresh every 3 steps; the stale steps in between must not count.
    drive(policy, "mem/gap", [0.1, 0.6, 0.4, 0.6, 0.7, 0.9], every=3)
    assert alarms(policy) == [(15, "r", True)] and sw.calls == [("on", 1.0, None)]
    a = policy.alarms[0]
    assert a["signal"] == "mem/gap" and a["value"] == 0.7 and a["level"] == 0.5 and a["action"] == "sw"
    assert "mem/gap = 0.7 above 0.5 for 2 check(s) -> sw on" in a["message"]


def test_hysteresis_turns_off_below_the_release_level_only():
    sw = Switch()
    rule = Rule("s", "sw", threshold=0.5, release_patience=2, name="r")  # default release: 0.8 x 0.5 = 0.4
    policy = MitigationPolicy([rule], {"sw": sw})
    drive(policy, "s", [0.6, 0.45, 0.3, 0.45, 0.3, 0.35, 0.55, 0.2, 0.1])
    # on at 1; 0.45 stays on (above release); 0.3 then 0.45 resets the count; 0.3, 0.35 -> off at 6;
    # 0.55 -> on at 7; 0.2, 0.1 -> off at 9.
    assert alarms(policy) == [(1, "r", True), (6, "r", False), (7, "r", True), (9, "r", False)]
    assert sw.calls == [("on", 1.0, None), ("off",), ("on", 1.0, None), ("off",)]
    assert policy.alarms[1]["level"] == pytest.approx(0.4)
    explicit = Rule("s", "sw", threshold=0.5, release=0.1)
    assert explicit.levels(None) == (0.5, 0.1)
    with pytest.raises(ValueError, match="release level 0.7 must not be above the on-level 0.5"):
        Rule("s", "sw", threshold=0.5, release=0.7)


def test_rise_factor_is_relative_to_the_first_value_and_a_threshold_is_a_floor():
    sw = Switch()
    policy = MitigationPolicy([Rule("s", "sw", rise_factor=2.0, name="rise"),
                               Rule("s", "sw", rise_factor=2.0, threshold=0.6, name="floored")], {"sw": sw})
    drive(policy, "s", [0.2, 0.35, 0.45, 0.65])
    assert alarms(policy) == [(3, "rise", True), (4, "floored", True)]
    assert sw.calls == [("on", 1.0, None)]  # the action was already on: the second rule changes nothing


def test_direction_below_mirrors_the_levels():
    sw = Switch()
    policy = MitigationPolicy([Rule("loss", "sw", rise_factor=0.5, direction="below", name="r")], {"sw": sw})
    drive(policy, "loss", [1.0, 0.6, 0.4, 0.45, 0.7])  # on-level 0.5, release 0.6
    assert alarms(policy) == [(3, "r", True), (5, "r", False)]


def test_several_rules_share_an_action_at_the_largest_strength():
    calls = []
    policy = MitigationPolicy(
        [Rule("a", "cb", threshold=1.0, strength=0.5, name="weak"), Rule("b", "cb", threshold=1.0, name="strong")],
        {"cb": calls.append},  # a callable action gets the strength, 0.0 turns it off
    )
    state = TrainerState()
    for step, (a, b) in enumerate([(2, 0), (2, 2), (2, 0), (0, 0)], start=1):
        state.global_step = step
        state.update_metrics({"a": a, "b": b})
        policy.on_step_end(state, TrainerControl(), logs={})
    assert calls == [0.5, 1.0, 0.5, 0.0]
    assert [a["strength"] for a in policy.alarms] == [0.5, 1.0, 0.5, 0.0]


def test_logs_are_float_counts_and_the_text_stays_in_alarms():
    policy = MitigationPolicy([Rule("s", "sw", threshold=0.5)], {"sw": Switch()})
    state, control, logs = TrainerState(global_step=1), TrainerControl(), {}
    state.update_metrics({"s": 0.1})
    policy.on_step_end(state, control, logs=logs)
    assert logs == {"mem/alarm": 0.0, "mem/policy/sw": 0.0} and not control.should_log
    state.global_step, logs = 2, {}
    state.update_metrics({"s": 0.9})
    policy.on_step_end(state, control, logs=logs)
    assert logs == {"mem/alarm": 1.0, "mem/policy/sw": 1.0} and control.should_log
    assert state.is_fresh("mem/alarm") and isinstance(policy.alarms[0]["message"], str)


def test_drives_the_noise_gap_scheduler_with_a_band():
    gap = NoiseGapScheduler(num_train_timesteps=1000)
    policy = MitigationPolicy([Rule("mem/gap/t=500", "noise_gap", threshold=0.3, strength=0.8, band=(400, 600))],
                              actions={"noise_gap": gap})  # as the Guard's builder wires it
    policy.on_train_begin(TrainerState(), TrainerControl())
    drive(policy, "mem/gap/t=500", [0.5, 0.1])
    assert policy.alarms[0]["on"] and not policy.alarms[1]["on"] and not gap.active
    drive(policy, "mem/gap/t=500", [0.5], start_step=2)
    assert gap.active and gap.band == (400, 600) and gap.strength == 0.8
    assert float(gap.distribution()[400:600].sum()) == pytest.approx(0.2 * 200 / (800 + 0.2 * 200))


def test_a_rule_on_the_danger_zone_band_follows_it_while_on():
    from mnemoguard.signals.danger_zone import DangerZone

    class Tracker:  # the tracker's live band (DangerZoneTracker.zone), moved by hand between checks
        zone = DangerZone(0.2, 0.5, 50, 399)

    gap = NoiseGapScheduler(num_train_timesteps=1000)
    rule = Rule("mem/danger_zone/excess", "noise_gap", threshold=0.5, strength=0.5, band=lambda: Tracker.zone)
    policy = MitigationPolicy([rule],
                              actions={"noise_gap": gap})
    policy.on_train_begin(TrainerState(), TrainerControl())
    state, _ = drive(policy, "mem/danger_zone/excess", [0.6])
    assert gap.active and gap.band == (50, 400)
    Tracker.zone = DangerZone(0.2, 1.0, 50, 599)  # the band grows while the rule stays on: the action follows it
    state, _ = drive(policy, "mem/danger_zone/excess", [0.7], state=state, start_step=1)
    assert gap.band == (50, 600) and policy.applied["noise_gap"]["band"] == [50, 600] and len(policy.alarms) == 1
    Tracker.zone = None  # no band while the rule is on: the action's own band (here: the whole schedule)
    drive(policy, "mem/danger_zone/excess", [0.7], state=state, start_step=2)
    assert gap.active and gap.band == (0, 1000)


def test_the_band_is_followed_also_at_a_check_where_another_rule_raises_an_alarm():
    from mnemoguard.signals.danger_zone import DangerZone

    class Tracker:
        zone = DangerZone(0.2, 0.5, 50, 399)

    gap, other = NoiseGapScheduler(num_train_timesteps=1000), Switch()
    follow = Rule("mem/a", "noise_gap", threshold=0.5, strength=0.5, band=lambda: Tracker.zone)
    policy = MitigationPolicy([follow, Rule("mem/b", "other", threshold=0.5)],
                              actions={"noise_gap": gap, "other": other})
    policy.on_train_begin(TrainerState(), TrainerControl())
    state = TrainerState(global_step=1)
    state.update_metrics({"mem/a": 0.6, "mem/b": 0.0})
    policy.on_step_end(state, TrainerControl(), logs={})
    assert gap.band == (50, 400)
    Tracker.zone = DangerZone(0.2, 1.0, 50, 599)
    state.global_step = 2
    state.update_metrics({"mem/a": 0.6, "mem/b": 0.9})  # rule b turns its action on at the step the band moves
    policy.on_step_end(state, TrainerControl(), logs={})
    assert other.calls[-1][0] == "on" and gap.band == (50, 600)


def test_a_danger_zone_band_in_a_rule_needs_the_tracker():
    from mnemoguard.config import ConfigError, load_config
    from mnemoguard.guard.build import build_components

    rule = {"signal": "mem/danger_zone/excess", "action": "noise_gap", "threshold": 0.5, "band": "danger_zone"}
    base = ["guard.enabled=true", "guard.noise_gap.enabled=true", "guard.monitor.num_random_probes=2"]
    cfg = load_config(None, [*base, "guard.danger_zone.enabled=true"])
    cfg.guard.policy = [Rule(**rule)]
    parts = build_components(cfg.guard)
    assert parts.policy.rules[0].band() is parts.danger_zone.zone  # bound to the tracker's live band
    documented = load_config(None, [*base, "guard.danger_zone.enabled=true",
                                    "guard.regularizers.iet_agc.enabled=false",
                                    "guard.policy=[{signal: mem/danger_zone/excess, threshold: 0.5, action: iet_agc, "
                                    "band: danger_zone}]"])  # docs/guard.md's example
    agc = build_components(documented.guard).policy.actions["iet_agc"]
    assert documented.guard.policy[0].band == "danger_zone" and not agc.active
    with pytest.raises(ConfigError, match="danger_zone.enabled"):
        load_config(None, [*base, f"guard.policy=[{rule}]".replace("'", "")])
    with pytest.raises(ConfigError, match="band"):
        load_config(None, [*base, "guard.danger_zone.enabled=true",
                           f"guard.policy=[{ {**rule, 'band': 'middle'} }]".replace("'", "")])


def test_state_round_trip_resumes_the_state_machine_and_the_actions():
    values = [0.1, 0.6, 0.7, 0.3, 0.2, 0.9, 0.95]

    def make(sw):
        return MitigationPolicy([Rule("s", "sw", threshold=0.5, patience=2, release_patience=2, name="r")],
                                {"sw": sw})

    full = make(Switch())
    drive(full, "s", values)
    first = make(Switch())
    state, _ = drive(first, "s", values[:4])  # on since step 3, one check below release
    sw2 = Switch()
    resumed = make(sw2)
    resumed.load_state_dict(first.state_dict())
    assert sw2.calls == []  # put back at the first step, once every action is set up
    resumed.on_step_begin(state, TrainerControl())
    assert sw2.calls == [("on", 1.0, None)]  # the action is put back as the checkpoint had it
    drive(resumed, "s", values[4:], state=state, start_step=4)
    assert alarms(resumed) == alarms(full) == [(3, "r", True), (5, "r", False), (7, "r", True)]


def test_configuration_errors_say_what_was_expected():
    with pytest.raises(ValueError, match="threshold and/or a rise_factor"):
        Rule("s", "sw")
    with pytest.raises(ValueError, match="rise_factor must be > 1"):
        Rule("s", "sw", rise_factor=0.5)
    with pytest.raises(ValueError, match="rule names must be unique"):
        MitigationPolicy([Rule("s", "sw", threshold=1), Rule("s", "sw", threshold=2)])
    policy = MitigationPolicy([Rule("s", "missing", threshold=1)], {"sw": Switch()})
    with pytest.raises(ValueError, match=r"unregistered actions \['missing'\]; registered: \['sw'\]"):
        policy.on_train_begin(TrainerState(), TrainerControl())
    with pytest.raises(TypeError, match="activate\\(\\)/deactivate\\(\\) or be a callable"):
        MitigationPolicy([], {"x": 3})
