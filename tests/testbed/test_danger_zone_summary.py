"""The danger-zone tables: the default stop replayed on a tracker curve against the oracle, false alarms, cost."""

from mnemoguard.bench.danger_zone_summary import (
    cost_markdown,
    false_alarm_markdown,
    stop_markdown,
    where_markdown,
)


def _run(copy_rates, gt, seed=0, excess=0.8):
    history = [{"step": s, "excess": excess, "copy_rate": c, "heldout_copy_rate": 0.0, "active": excess >= 0.5,
                "band": {"t_begin": 100, "t_end": 600, "sigma_lo": 0.3, "sigma_hi": 2.0} if excess >= 0.5 else None,
                "strength": 0.0,
                "profile": {"sigmas": [0.3, 1.0, 6.0], "timesteps": [166, 500, 999], "counts": {},
                            "rates": {"at_risk": [1.0, excess, c], "heldout_self": [1.0, 0.0, 0.0]}}}
               for s, c in copy_rates]
    return {
        "seed": seed, "config": {"train": {"mitigation": "none"}},
        "monitor": [{"step": s, "mem/danger_zone/copy_rate": c} for s, c in copy_rates],
        "checkpoints": [{"step": s, "ground_truth": {"w=1": {"planted": {"memorized_fraction": {"fraction": f}}}}}
                        for s, f in gt],
        "danger_zone_tracker": {"prior": {"band": {"sigma_lo": 0.3, "sigma_hi": 2.0, "empty": False},
                                          "sigmas": [0.1, 0.3, 1.0], "coverage": [0.0, 0.6, 1.0]},
                                "history": history},
        "timing": {"danger_zone_prior": 1.0, "danger_zone_measure": 9.0, "training": 500.0},
    }


def test_the_default_stop_is_judged_against_the_oracle_with_its_rollback():
    run = _run([(100, 0.0), (200, 0.03), (300, 0.06), (400, 0.2)], [(100, 0.0), (200, 0.01), (300, 0.06),
                                                                     (400, 0.2)])
    row = stop_markdown([run]).splitlines()[-1].split(" | ")
    assert row[1:3] == ["300", "400"] and row[4] == "300 (200): +0%, yes"  # oracle 300, stop 300, rollback 200
    assert row[3] == "100 (200)"  # the band turned on at the first measurement, 200 steps before the oracle
    late = _run([(100, 0.0), (200, 0.0), (300, 0.0), (400, 0.2)], [(100, 0.0), (200, 0.06), (300, 0.2)])
    assert stop_markdown([late], [0.05, 0.5]).splitlines()[-1].split(" | ")[4:6] == ["400 (300): +100%, no",
                                                                                       "no stop"]
    for row, lower in zip(run["monitor"], [0.0, 0.01, 0.02, 0.08]):  # the bound passes 5 % one measurement later
        row["mem/danger_zone/copy_rate_lower"] = lower
    table = stop_markdown([run], statistic="mem/danger_zone/copy_rate_lower")
    assert "stop at copy rate lower > 0.05" in table
    assert table.splitlines()[-1].split(" | ")[4] == "400 (300): +33%, no"


def test_false_alarms_cost_and_where_tables():
    clean = _run([(100, 0.0), (200, 0.0)], [(200, 0.0)], excess=0.1)
    row = false_alarm_markdown([clean]).splitlines()[-1].split(" | ")
    assert row[1:3] == ["no", "no"]  # band (excess 0.1 < its on-level 0.5), stop
    memorizing = _run([(100, 0.0), (200, 0.1)], [(200, 0.0)], excess=0.8)
    row = false_alarm_markdown([memorizing]).splitlines()[-1].split(" | ")
    assert row[1:3] == ["100", "200"]  # both fire: this table would show a false alarm
    for r, lower in zip(memorizing["monitor"], [0.0, 0.02]):  # the default stop's bound stays below 5 %
        r["mem/danger_zone/copy_rate_lower"] = lower
    table = false_alarm_markdown([memorizing], "mem/danger_zone/copy_rate_lower")
    assert "stop (copy rate lower > 0.05)" in table and table.splitlines()[-1].split(" | ")[2] == "no"
    assert "| none | 0 | 2 | 10.0 | 500 | 2.0 % |" in cost_markdown([clean])
    assert "σ 0.3–2" in where_markdown([clean]) and "| off |" in where_markdown([clean])
