import math
import warnings

import pytest

from mnemoguard.callbacks import CallbackList, EarlyStopping, TrainerControl, TrainerState

from ._drive import drive, save_steps, stop_step


def test_patience_counts_fresh_checks_not_steps():
    es = EarlyStopping("val/loss", patience=3)
    # Fresh every 5 steps: best at step 10, then three checks without improvement -> stop at step 25.
    state, events = drive(es, "val/loss", [3.0, 2.0, 2.5, 2.4, 2.3, 1.0], every=5)
    assert stop_step(events) == 25 and len(events) == 25
    assert es.best_score == 2.0 and es.best_step == 10 and es.stopped_step == 25 and es.num_checks == 5
    assert save_steps(events) == [5, 10]  # each improvement asks for a checkpoint
    assert state.best_metric == 2.0 and state.best_step == 10
    assert "val/loss" in state.stop_reason and "2" in state.stop_reason and "25" in state.stop_reason


def test_max_mode_mirrors_min_mode():
    es = EarlyStopping("val/acc", mode="max", patience=2)
    _, events = drive(es, "val/acc", [0.1, 0.5, 0.4, 0.6, 0.3, 0.2], every=2)
    assert stop_step(events) == 12 and es.best_score == 0.6 and es.best_step == 8


def test_min_delta_is_a_strict_absolute_margin():
    es = EarlyStopping("m", patience=2, min_delta=0.25)
    _, events = drive(es, "m", [1.0, 0.75, 0.8, 0.1])  # 0.75 is exactly min_delta better: not an improvement
    assert stop_step(events) == 3 and es.best_score == 1.0 and es.best_step == 1
    es = EarlyStopping("m", mode="max", patience=1, min_delta=0.1)
    _, events = drive(es, "m", [1.0, 1.2, 1.25])
    assert stop_step(events) == 3 and es.best_score == 1.2


def test_stopping_threshold_stops_and_records_the_good_enough_value_as_best():
    es = EarlyStopping("m", patience=10, stopping_threshold=0.5)
    state, events = drive(es, "m", [1.0, 0.4, 0.3])
    assert stop_step(events) == 2 and events[-1][1].should_save
    assert es.best_score == 0.4 and state.best_step == 2 and "Stopping threshold" in state.stop_reason


def test_divergence_threshold_stops_at_once_and_keeps_the_best():
    es = EarlyStopping("m", mode="max", patience=10, divergence_threshold=0.2)
    state, events = drive(es, "m", [0.5, 0.6, 0.1, 0.9])
    assert stop_step(events) == 3 and not events[-1][1].should_save
    assert es.best_score == 0.6 and es.best_step == 2 and "Divergence" in state.stop_reason


def test_non_finite_stops_first_unless_check_finite_is_off():
    # inf is both non-finite and beyond the divergence threshold: the non-finite rule comes first (Lightning order).
    es = EarlyStopping("m", patience=5, divergence_threshold=10.0)
    state, events = drive(es, "m", [1.0, math.inf])
    assert stop_step(events) == 2 and "not finite" in state.stop_reason
    es = EarlyStopping("m", patience=2, check_finite=False)
    _, events = drive(es, "m", [1.0, math.nan, math.nan, 0.5])
    assert stop_step(events) == 3 and es.best_score == 1.0  # NaN never counts as an improvement


def test_threshold_order_and_validation():
    with pytest.raises(ValueError, match="must be better than the divergence_threshold"):
        EarlyStopping("m", stopping_threshold=2.0, divergence_threshold=1.0)
    with pytest.raises(ValueError, match="mode must be"):
        EarlyStopping("m", mode="auto")
    with pytest.raises(ValueError, match="patience counts checks"):
        EarlyStopping("m", patience=0)


def test_strict_missing_metric_lists_the_available_keys():
    es = EarlyStopping("mem/gap/t=500")
    state = TrainerState(global_step=1)
    state.update_metrics({"train/loss": 0.3})
    es.on_step_end(state, TrainerControl())  # absent at step 1 proves nothing: checks come every N steps
    state.global_step = 50
    state.update_metrics({"mem/gap/t=400": 0.1})  # its producer ran and did not produce it (a wrong band tag)
    with pytest.raises(RuntimeError, match=r"'mem/gap/t=500'.*available metrics: \['mem/gap/t=400', 'train/loss'\]"):
        es.on_step_end(state, TrainerControl())


def test_missing_metric_waits_for_expect_by_step_then_warns_once_when_not_strict():
    es = EarlyStopping("val/loss", strict=False, expect_by_step=10)
    state = TrainerState()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 21):
            state.global_step = step
            state.update_metrics({"train/loss": 1.0})
            es.on_step_end(state, TrainerControl())
    assert [str(w.message).count("val/loss") > 0 for w in caught] == [True]
    assert "step 10" in str(caught[0].message) and es.disabled


def test_start_from_step_ignores_earlier_checks():
    es = EarlyStopping("m", patience=1, start_from_step=6)
    _, events = drive(es, "m", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], every=2)  # worsening all along
    # Checks at 2 and 4 are ignored; the first counted check (step 6) is the best; step 8 stops.
    assert stop_step(events) == 8 and es.best_step == 6 and es.best_score == 3.0


def test_state_round_trips_and_resumed_run_stops_at_the_same_step():
    values = [5.0, 4.0, 4.5, 3.0, 3.5, 3.6, 3.7, 2.0]
    es = EarlyStopping("m", patience=3)
    _, events = drive(es, "m", values, every=3)
    full_stop = stop_step(events)

    first = EarlyStopping("m", patience=3)
    state, _ = drive(first, "m", values[:5], every=3)  # up to step 15, one check without improvement
    saved = first.state_dict()
    assert saved["wait_count"] == 1 and saved["best_step"] == 12 and saved["best_score"] == 3.0
    resumed = EarlyStopping("m", patience=3)
    resumed.load_state_dict(saved)
    _, events = drive(resumed, "m", values[5:], every=3, state=state, start_step=15)
    assert stop_step(events) == full_stop == 21 and resumed.best_step == es.best_step
    with pytest.raises(ValueError, match="monitor='m', mode='min'"):
        EarlyStopping("other").load_state_dict(saved)


def test_instances_with_different_monitor_or_mode_coexist_in_a_checkpoint():
    a, b, c = EarlyStopping("m"), EarlyStopping("m", mode="max"), EarlyStopping("n")
    cbs = CallbackList([a, b, c])
    state = TrainerState(global_step=1)
    state.update_metrics({"m": 1.0, "n": 2.0})
    cbs.call("on_step_end", state, TrainerControl())
    saved = {key: cb.state_dict() for key, cb in cbs.stateful().items()}
    assert len(saved) == 3
    fresh = CallbackList([EarlyStopping("m"), EarlyStopping("m", mode="max"), EarlyStopping("n")])
    for key, cb in fresh.stateful().items():
        cb.load_state_dict(saved[key])
    assert [cb.best_score for cb in fresh] == [1.0, 1.0, 2.0]


def test_a_value_is_checked_once_per_step():
    es = EarlyStopping("m", patience=1)
    state = TrainerState(global_step=1)
    state.update_metrics({"m": 1.0})
    es.on_step_end(state, TrainerControl())
    es.on_step_end(state, TrainerControl())
    assert es.num_checks == 1
    state.global_step = 2
    state.update_metrics({"m": 2.0})
    control = TrainerControl()
    es.on_step_end(state, control)
    assert es.num_checks == 2 and control.should_training_stop
