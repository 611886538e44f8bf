"""TensorBoardDashboard: what TensorBoard shows is in the event files of a real run — the verdict group with its
levels as lines of their own, switches at every step, bands as runs, no crowding tags, labelled probe panels, hparams
in the training run; a resume appends to the same runs; without TensorBoard (or off the main process) it does
nothing."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from mnemoguard.callbacks import TensorBoardDashboard, TrainerControl, TrainerState
from mnemoguard.callbacks.panels import probe_figure, probe_panels
from mnemoguard.trainer import Trainer

from ..trainer_utils import tiny_recipe
from ._guard_run import RUN_OVERRIDES, SIGNAL, guard_overrides, guarded_run

LEVEL_RUNS = {"threshold", "release"}
BAND_RUNS = {"band=low", "band=mid", "band=high"}


def _accumulator(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def _series(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def _runs(logs: Path) -> set[str]:
    return {str(p.parent.relative_to(logs)) for p in logs.rglob("events.out.tfevents.*")}


def test_the_verdict_group_draws_the_watched_signal_with_its_levels_and_the_switches_at_every_step():
    run = guarded_run()
    logs = run.out / "logs" / "mnemoguard"
    main = _accumulator(logs)
    watched = "guard/" + SIGNAL.removeprefix("mem/")
    # The watched signal at each check, equal to the flat metric; its on-level and release level as runs of their own.
    assert _series(main, watched) == _series(main, SIGNAL) and sorted(_series(main, watched)) == [2, 4]
    threshold = _series(_accumulator(logs / "threshold"), watched)
    release = _series(_accumulator(logs / "release"), watched)
    assert sorted(threshold) == sorted(release) == [2, 4]
    assert set(threshold.values()) == {np.float32(1e-9)} and set(release.values()) == {np.float32(0.8e-9)}
    # Switches at every optimizer step: the rule fires at the first check (step 2) and stays on; no stop.
    assert _series(main, "guard/alarm") == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert _series(main, "guard/action/gaussian_embedding_noise") == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert _series(main, "guard/stop") == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}


def test_bands_are_runs_of_their_own_and_nothing_crowds_the_scalar_views():
    run = guarded_run()
    logs = run.out / "logs" / "mnemoguard"
    main = _accumulator(logs)
    scalars = set(main.Tags()["scalars"])
    assert not [t for t in scalars if t.startswith("hparam/") or t.endswith(("_std", "_lo", "_hi"))]
    # One training run plus its level and band lines; no accelerate-style timestamped run.
    assert _runs(run.out / "logs") == {"mnemoguard", *(f"mnemoguard/{r}" for r in LEVEL_RUNS | BAND_RUNS)}
    for band in ("low", "mid", "high"):
        band_run = _accumulator(logs / f"band={band}")
        for split in ("train", "heldout", "contrast"):
            flat = _series(main, f"mem/live_vs_ema/band={band}/{split}")
            assert _series(band_run, f"mem/live_vs_ema/{split}") == flat and sorted(flat) == [2, 4]
        assert _series(band_run, "mem/agc/flag_rate") == _series(main, f"mem/agc/flag_rate/band={band}")
    # The custom-scalars layout opens on the verdict; the by-band charts follow, watched signal first.
    events = main.Tensors("custom_scalars__config__")
    assert len(events) == 1
    layout = layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])
    titles = [cat.title for cat in layout.category]
    assert titles[:2] == ["guard: verdict", "mem: live_vs_ema"]
    verdict = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    assert verdict[f"{SIGNAL} (rule gaussian_embedding_noise<-{SIGNAL}) with its levels"] == \
        ["^guard/live_vs_ema/band=mid/train$"]
    assert list(verdict)[1:] == ["alarm (1 while a rule or the danger zone is on)", "actions (strength applied)",
                                 "stop (1 from the stop step)"]
    assert any("wen_gap / contrast" in c.title and "expected negative" in c.title
               for cat in layout.category for c in cat.chart)


def test_probe_panels_are_a_labelled_image_and_hparams_live_in_the_training_run():
    run = guarded_run()
    main = _accumulator(run.out / "logs" / "mnemoguard")
    images = main.Images("mem/probes/generation_nearest_curvature")
    assert [e.step for e in images] == [4] and images[0].height >= 300 and images[0].width >= 500
    alarm = main.Tensors("mem/alarms/text_summary")
    assert len(alarm) == 1 and alarm[0].step == 2
    assert b"gaussian_embedding_noise on" in alarm[0].tensor_proto.string_val[0]
    content = main.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert metrics == {"guard/" + SIGNAL.removeprefix("mem/"), "guard/alarm", "guard/stop", "mem/nn_ratio/train"}
    assert metrics <= set(main.Tags()["scalars"])  # the HParams table reads their last values from this run
    hparams = {h.name for h in experiment.hparam_infos}
    assert {"training/learning_rate", "monitor/baseline"} <= hparams
    assert "_hparams_/session_end_info" in content


def test_a_resumed_run_appends_to_the_same_runs(tmp_path):
    run = guarded_run()
    out = tmp_path / "run"
    shutil.copytree(run.out, out)
    trainer = Trainer(tiny_recipe(out, *RUN_OVERRIDES, *guard_overrides(),
                                  "training.resume_from_checkpoint=checkpoint-2"))
    trainer.train()
    logs = out / "logs" / "mnemoguard"
    assert _runs(out / "logs") == _runs(run.out / "logs")
    main = _accumulator(logs)  # TensorBoard drops what the first run wrote after step 2 (purge_step)
    assert sorted(e.step for e in main.Scalars("guard/alarm")) == [1, 2, 3, 4]
    assert sorted(e.step for e in _accumulator(logs / "band=mid").Scalars("mem/live_vs_ema/train")) == [2, 4]


class _Writer:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append(name)


def test_dashboard_is_a_no_op_without_tensorboard_or_off_the_main_process():
    state, control = TrainerState(global_step=1), TrainerControl()
    writer = _Writer()
    for accelerator in (SimpleNamespace(is_main_process=True, trackers=[]),  # report_to: none
                        SimpleNamespace(is_main_process=False, trackers=[SimpleNamespace(name="tensorboard")],
                                        get_tracker=lambda *a, **k: writer)):
        dash = TensorBoardDashboard()
        context = SimpleNamespace(accelerator=accelerator, hparams={})
        dash.on_train_begin(state, control, context=context)
        dash.on_step_begin(state, control, context=context)
        dash.on_step_end(state, control, context=context)
        dash.on_train_end(state, control, context=context)
    assert writer.calls == []


def test_probe_panels_put_generation_nearest_and_map_side_by_side_and_label_each_probe():
    vis = {"generations": torch.rand(2, 1, 8, 8), "nearest": torch.rand(2, 1, 8, 8), "maps": torch.rand(2, 4, 4),
           "captions": ["a seven", "a one"], "nn_ratio": [0.2, 0.9], "nearest_is_own": [True, False]}
    panels = probe_panels(vis, min_size=16)
    assert panels.shape == (2, 3, 16, 48) and 0 <= float(panels.min()) and float(panels.max()) <= 1
    fig = probe_figure(vis, step=7)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert fig._suptitle.get_text() == "Probe generations step 7"
    assert titles[0].startswith('"a seven"\nd1/d2 = 0.200 (COPY') and "its own image" in titles[0]
    assert "(not a copy" in titles[1] and "another image" in titles[1]


def test_a_signal_watched_by_the_band_and_a_policy_rule_is_one_card_with_both_and_its_levels_once():
    from types import SimpleNamespace

    from mnemoguard.callbacks import EarlyStopping, MitigationPolicy
    from mnemoguard.callbacks.danger_zone import DangerZoneTracker
    from mnemoguard.callbacks.watched import signal_levels, watched_signals
    from mnemoguard.config import Rule
    from mnemoguard.config.danger_zone import default_stop

    tracker = DangerZoneTracker(None, monitor=SimpleNamespace())
    policy = MitigationPolicy([Rule(signal="mem/danger_zone/excess", action="iet_agc", threshold=0.5, release=0.25,
                                    release_patience=2)])
    stop = EarlyStopping(**{k: v for k, v in default_stop().items() if k != "enabled"})
    watched = dict(watched_signals(policy, [stop], tracker))
    assert list(watched) == ["mem/danger_zone/excess", "mem/danger_zone/copy_rate_lower"]
    assert watched["mem/danger_zone/excess"] == "the danger-zone band, rule iet_agc<-mem/danger_zone/excess"
    levels = signal_levels(policy, [stop], tracker)
    assert levels["mem/danger_zone/excess"] == [("threshold", 0.5), ("release", 0.25)]
    assert levels["mem/danger_zone/copy_rate_lower"] == [("divergence", 0.05)]
