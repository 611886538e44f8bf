"""``mnemoguard demo``: both runs end to end — the watching run counts copies, the guarded run measures the danger
zone, the default policy weighs the duplicated images as one image each, a policy rule fires, and the default stop
stops on the copy rate with a rollback; the story is printed."""

from mnemoguard.demo import DemoSettings, run_demo


def test_demo_runs_without_and_with_the_guard_and_tells_both_stories(tmp_path, capsys):
    settings = DemoSettings(max_train_steps=4, monitor_every=2, eval_every=2, eval_seeds=1, base=None)
    story = run_demo(tmp_path / "demo", settings, overrides=[
        "model.tiny.text_encoder=clip", "training.train_batch_size=8", "guard.danger_zone.num_inference_steps=3",
        "guard.danger_zone.draws=1", "guard.danger_zone.prior_rows=32",
        # forced so that every event happens within a few steps: any excess turns the band on, any copy stops
        "guard.danger_zone.on_level=0.0", "guard.danger_zone.release_level=0.0"],
        guarded_overrides=["guard.policy=[{signal: mem/danger_zone/excess, action: iet_agc, threshold: -1.0, "
                           "name: forced}]", "guard.regularizers={iet_agc: {enabled: false}}"])
    un, g = story["unguarded"], story["guarded"]
    assert [c["step"] for c in un["counts"]] == [2, 4] and un["counts"][0]["total"] == 4
    assert un["stop_reason"] is None and un["export"] == "last" and un["exported"]["step"] == 4
    assert [h["step"] for h in g["tracker"]] == [2, 4] and g["tracker"][0]["active"]
    assert g["export"] == "best" and g["best_step"] in (2, 4)
    assert g["alarm"]["step"] == 2 and un["alarm"] is None and un["duplicate_weight"] is None  # unguarded: watches
    dw = g["duplicate_weight"]  # 240 of the 400 rows are copies of the 4 duplicated digits, each weighed 1/60
    assert 0.0 < dw["weighted_fraction"] < 1.0 and 0.0 < dw["mean_weight"] < 1.0
    for run in ("unguarded", "guarded"):
        assert (tmp_path / "demo" / run / "report" / "report.md").is_file()
        assert (tmp_path / "demo" / run / "copies.png").is_file()
    out = capsys.readouterr().out
    assert "Without the guard" in out and "With the guard" in out and "the alarm: at step 2" in out
    assert "Exported weights: without the guard" in out
    assert ("the rollback: exported" if g["stop_reason"] else "the export (no stop, nothing to roll back)") in out
    assert "the mitigation (the default policy, from the first step)" in out
    assert "the policy's rule 'forced' switched its action on at step 2" in out
