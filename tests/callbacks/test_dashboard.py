"""TensorBoardDashboard: the layout, margin bounds, histograms, probe images, alarm text and hparams are in the event
files of a real run; without TensorBoard (or off the main process) it does nothing."""

from pathlib import Path
from types import SimpleNamespace

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from mnemoguard.callbacks import TensorBoardDashboard, TrainerControl, TrainerState
from mnemoguard.callbacks.dashboard import probe_panels

from ._guard_run import guarded_run


def _accumulator(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_dashboard_tags_are_in_the_event_files():
    run = guarded_run()
    acc = _accumulator(run.out / "logs" / "mnemoguard")
    tags = acc.Tags()
    bands = ("low", "mid", "high")
    for band in bands:
        for split in ("train", "heldout"):
            tag = f"mem/live_vs_ema/band={band}/{split}"
            assert {tag, f"{tag}_lo", f"{tag}_hi"} <= set(tags["scalars"])
            assert f"{tag}/per_probe" in tags["histograms"]
            mid = {e.step: e.value for e in acc.Scalars(tag)}
            lo = {e.step: e.value for e in acc.Scalars(f"{tag}_lo")}
            assert sorted(mid) == sorted(lo) == [2, 4] and all(lo[s] <= mid[s] for s in mid)
    # One layout (once per writer): a multiline chart per signal across the three bands, margin charts.
    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1
    layout = layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    multi = charts["live_vs_ema / train / by band"].multiline.tag
    assert [t for t in multi] == [f"^mem/live_vs_ema/band={b}/train$" for b in bands]
    margin = charts["wen_gap / heldout / band=mid (mean ± std)"].margin.series[0]
    assert (margin.value, margin.lower, margin.upper) == ("mem/wen_gap/band=mid/heldout",
                                                          "mem/wen_gap/band=mid/heldout_lo",
                                                          "mem/wen_gap/band=mid/heldout_hi")
    assert "mem: policy" in [cat.title for cat in layout.category]
    # Probe panels at the curvature check, alarm text from the policy, hparams at the end.
    images = acc.Images("mem/probes/generation_nearest_curvature")
    assert [e.step for e in images] == [4]  # one grid of the two probe panels
    alarm = acc.Tensors("mem/alarms/text_summary")
    assert len(alarm) == 1 and alarm[0].step == 2
    assert b"gaussian_embedding_noise on" in alarm[0].tensor_proto.string_val[0]
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")
    assert [e.value for e in acc.Scalars("hparam/global_step")] == [4.0]
    assert "hparam/mem/live_vs_ema/band=mid/train" in tags["scalars"]


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


def test_probe_panels_put_generation_nearest_and_map_side_by_side():
    vis = {"generations": torch.rand(2, 1, 8, 8), "nearest": torch.rand(2, 1, 8, 8), "maps": torch.rand(2, 4, 4)}
    panels = probe_panels(vis, min_size=16)
    assert panels.shape == (2, 3, 16, 48) and 0 <= float(panels.min()) and float(panels.max()) <= 1
