"""``mnemoguard demo``: the story runs end to end — monitor checks, an alarm that turns the mitigation on, a stop."""

from mnemoguard.demo import DemoSettings, run_demo


def test_demo_story_alarms_mitigates_and_stops(tmp_path, capsys):
    # Thresholds forced so that every event happens within a few steps: the contrast is always above -10, and any
    # generation's d1/d2 is below 10.
    settings = DemoSettings(max_train_steps=12, monitor_every=2, alarm_rise=None, alarm_threshold=-10.0,
                            alarm_patience=2,
                            copy_ratio=10.0, base=None)
    story = run_demo(tmp_path / "demo", settings, overrides=["model.tiny.text_encoder=clip",
                                                              "training.train_batch_size=8"])
    assert [a["step"] for a in story["alarms"]] == [4] and story["alarms"][0]["action"] == "iet_agc"
    assert story["steps"] == 8 and "mem/nn_ratio/train" in story["stop_reason"]  # first generation check: step 8
    assert [s for s, _ in story["contrast"]] == [2, 4, 6, 8]
    assert (tmp_path / "demo" / "train" / "report" / "report.md").is_file()
    out = capsys.readouterr().out
    assert "alarm at step 4" in out and "stop:" in out and "report:" in out
