"""mnemoguard.Guard in a hand-written Accelerate loop (what a user of diffusers' train_text_to_image.py writes):
metrics at the monitor's cadence, RNG isolation, state round trip through accelerate, early stopping, bad input."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mnemoguard import Guard
from mnemoguard.config import TinyModelConfig
from mnemoguard.data import preprocess_image
from mnemoguard.trainer.models import build_tiny_components

SIGNAL = "mem/live_vs_ema/band=mid/train"
HELDOUT = ["a handwritten digit eleven", "a handwritten digit twelve"]


def guard_section(**sections) -> dict:
    """A small guard: the monitor every 2 steps on 2 + 2 probes and 2 unseen captions, no curvature panels."""
    monitor = dict(every_n_steps=2, num_duplicate_probes=2, num_random_probes=2, num_heldout_probes=2,
                   heldout_captions=list(HELDOUT), curvature_every_k_checks=0, loss_min_count=1)
    report = {"plots": False, **sections.pop("report", {})}  # matplotlib would take most of the test's time
    return {"monitor": {**monitor, **sections.pop("monitor", {})}, "report": report, **sections}


@functools.cache
def digits(n: int = 32):
    """The first ``n`` builtin real digits (16x16 grayscale, captioned by class: captions repeat)."""
    from mnemoguard.data import digits_dataset

    return digits_dataset().select(range(n))


def list_tracker():
    """A custom accelerate tracker that keeps what accelerator.log sends (in ``.rows``)."""
    from accelerate.tracking import GeneralTracker

    class ListTracker(GeneralTracker):
        name = "list"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.rows: list[tuple[int, dict]] = []

        @property
        def tracker(self):
            return self.rows

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.rows.append((step, dict(values)))

    return ListTracker()


class UserData(torch.utils.data.Dataset):
    """The user's own dataset class: pixels in [-1, 1], the caption and the row index."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[i]
        return {"pixel_values": preprocess_image(row["image"], 16, 1), "caption": row["text"], "index": i}


def collate(rows):
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "captions": [r["caption"] for r in rows], "indices": torch.tensor([r["index"] for r in rows])}


def user_loop(tmp_path: Path, guard_config=None, steps: int = 4, *, resume=None,
              save_at: int | None = None, accumulation: int = 1, encode_with_callable: bool = False,
              **guard_kwargs) -> SimpleNamespace:
    """A short text-to-image fine-tune written as a user would (tiny pixel-space UNet, tiny CLIP); the guard is
    plugged in with its few lines when ``guard_config`` is not None."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    tracker = list_tracker()
    acc = Accelerator(cpu=True, log_with=[tracker], gradient_accumulation_steps=accumulation,
                      project_config=ProjectConfiguration(project_dir=str(tmp_path)))
    acc.init_trackers("user-run")
    set_seed(0)
    parts = build_tiny_components(TinyModelConfig(text_encoder="clip"), tmp_path / "model")
    parts.text_encoder.requires_grad_(False).eval()
    unet, sched = parts.unet, parts.noise_scheduler
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(UserData(digits()), batch_size=8, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    unet, optimizer, loader = acc.prepare(unet, optimizer, loader)
    guard = None
    if guard_config is not None:
        if encode_with_callable:  # the user's own prompt encoder
            guard_kwargs["encode_prompt"] = lambda captions: parts.encode_prompt(captions)
        else:
            guard_kwargs.update(text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)
        guard = Guard(guard_config, accelerator=acc, unet=unet, noise_scheduler=sched, train_dataset=digits(),
                      **guard_kwargs)
        acc.register_for_checkpointing(guard)
    global_step, step_logs, seen_t = 0, {}, []
    skip = 0
    if resume is not None:
        acc.load_state(str(resume))
        global_step = int(Path(resume).name.split("-")[1])
        skip = global_step * accumulation % len(loader)  # the batches of this epoch already trained on
    done = global_step >= steps
    while not done:
        for batch in acc.skip_first_batches(loader, skip) if skip else loader:
            with acc.accumulate(unet):
                x0 = batch["pixel_values"]
                noise = torch.randn_like(x0)
                bsz = x0.shape[0]
                if guard is not None:
                    t = guard.sample_timesteps(bsz, x0.device)
                else:
                    t = torch.randint(0, sched.config.num_train_timesteps, (bsz,)).to(x0.device)
                seen_t += t.tolist()
                x_t = sched.add_noise(x0, noise, t)
                ehs = parts.encode_prompt(batch["captions"])
                if guard is not None:
                    inputs = guard.before_forward(timesteps=t, noisy_model_input=x_t, encoder_hidden_states=ehs,
                                                  captions=batch["captions"], indices=batch["indices"])
                    ehs = inputs["encoder_hidden_states"]
                pred = unet(x_t, t, ehs).sample
                per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
                loss = guard.loss(per_sample, inputs, model_pred=pred) if guard is not None else per_sample.mean()
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if guard is not None and not acc.sync_gradients:
                assert guard.step(global_step + 1) is None  # a no-op between accumulation micro-batches
            if acc.sync_gradients:
                global_step += 1
                if guard is not None:
                    step_logs[global_step] = guard.step(global_step, logs={"train/loss": loss.detach()})
                if save_at == global_step:
                    path = tmp_path / f"checkpoint-{global_step}"
                    guard.save_state(path) if guard is not None else acc.save_state(str(path))
                if guard is not None and guard.should_stop:
                    done = True
                    break
                if global_step >= steps:
                    done = True
                    break
        skip = 0
    if guard is not None and global_step:
        guard.end()
    weights = {n: p.detach().clone() for n, p in acc.unwrap_model(unet).named_parameters()}
    acc.end_training()
    return SimpleNamespace(guard=guard, weights=weights, logs=step_logs, tracked=tracker.rows, steps=global_step,
                           timesteps=seen_t)


# ---------------------------------------------------------------------------------------------------- tests
def test_monitor_metrics_reach_the_logs_at_its_cadence(tmp_path):
    run = user_loop(tmp_path, guard_section(), steps=5)
    guard = run.guard
    # Checks at steps 2 and 4, per band and split, in the step's logs, the state and the tracker.
    checked = [s for s, logs in run.logs.items() if SIGNAL in logs]
    assert checked == [2, 4]
    for band in ("low", "mid", "high"):
        for part in ("train", "heldout", "contrast"):
            assert f"mem/probe_loss/band={band}/{part}" in run.logs[4]
    assert guard.state.metric_steps[SIGNAL] == 4 and guard.state.global_step == 5
    assert [s for s, values in run.tracked if SIGNAL in values] == [2, 4]
    assert all("train/loss" in values for _, values in run.tracked) and len(run.tracked) == 5
    # The per-step loss flags (no extra forward) ran on every micro-batch, with the dataset rows.
    mon = guard.monitor
    assert sum(mon.agc_count) == 5 * 8 and "mem/agc/flagged_samples" in run.logs[1]
    assert [h["step"] for h in mon.history] == [2, 4] and guard.ema.optimization_step == 5
    # The report went to output_dir (the accelerator's project_dir here).
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "summary.json").is_file()


def test_a_monitoring_guard_leaves_the_weights_bit_identical(tmp_path):
    plain = user_loop(tmp_path / "plain", None, steps=4)
    guarded = user_loop(tmp_path / "guarded", guard_section(), steps=4, encode_with_callable=True)
    assert guarded.guard.monitor.history and guarded.guard.state.global_step == 4
    assert plain.weights.keys() == guarded.weights.keys()
    assert all(torch.equal(plain.weights[k], guarded.weights[k]) for k in plain.weights)



def test_state_dict_round_trip_and_resume_through_accelerate(tmp_path):
    section = guard_section()
    full = user_loop(tmp_path / "full", section, steps=4, save_at=2)
    guard = full.guard
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "custom_checkpoint_0.pkl").is_file()  # accelerate wrote the registered guard

    # In memory: a fresh guard gets every counter back.
    fresh = user_loop(tmp_path / "fresh", section, steps=0).guard
    saved = guard.state_dict()
    fresh.load_state_dict(saved)
    assert fresh.state.global_step == 4 and fresh.state.micro_step == 4
    assert fresh.state.log_history == guard.state.log_history and fresh.state.metrics == guard.state.metrics
    assert fresh.monitor.num_checks == 2 and fresh.monitor.history == guard.monitor.history
    assert fresh.monitor.spec == guard.monitor.spec and fresh.monitor.flag_counts == guard.monitor.flag_counts
    assert fresh.ema.optimization_step == 4
    assert all(torch.equal(fresh.ema.shadow[k], guard.ema.shadow[k]) for k in guard.ema.shadow)
    assert fresh.state_dict()["callbacks"] == saved["callbacks"]

    # Through accelerate: load_state(checkpoint-2) restores the guard at step 2, and the resumed run replays the
    # uninterrupted one (same check at step 4, same EMA, same weights).
    resumed = user_loop(tmp_path / "resumed", section, steps=4, resume=ckpt)
    g = resumed.guard
    assert g.state.global_step == 4 and [h["step"] for h in g.monitor.history] == [2, 4]
    assert [row["step"] for row in g.state.log_history] == [1, 2, 3, 4]
    assert g.ema.optimization_step == 4
    assert g.monitor.history[-1]["metrics"] == guard.monitor.history[-1]["metrics"]
    assert all(torch.equal(resumed.weights[k], full.weights[k]) for k in full.weights)


def test_policy_noise_gap_and_early_stopping_drive_the_loop(tmp_path):
    stop_on = "mem/probe_loss/band=high/train"
    section = guard_section(
        noise_gap={"enabled": True},
        policy=[{"signal": SIGNAL, "threshold": 0.0, "band": [333, 666]}],
        early_stopping={"enabled": True, "monitor": stop_on, "divergence_threshold": 0.0, "start_from_step": 4},
    )
    run = user_loop(tmp_path, section, steps=10, accumulation=2)
    guard = run.guard
    # The check at step 2 turns the gap on: afterwards no timestep is drawn in [333, 666).
    policy = next(cb for cb in guard.callbacks if type(cb).__name__ == "MitigationPolicy")
    assert [(a["step"], a["action"], a["on"]) for a in policy.alarms] == [(2, "noise_gap", True)]
    t = torch.tensor(run.timesteps)
    assert len(t) == 4 * 2 * 8 and not ((t[2 * 2 * 8:] >= 333) & (t[2 * 2 * 8:] < 666)).any()
    assert run.logs[3]["mem/noise_gap/strength"] == 1.0
    # Early stopping acts on the check at step 4 (not before start_from_step): the loop breaks on guard.should_stop.
    assert guard.should_stop and run.steps == 4 and guard.state.global_step == 4
    assert stop_on in guard.stop_reason and "Divergence" in guard.stop_reason
    assert guard.state.micro_step == 8  # two micro-batches per optimizer step


def test_bad_input_is_a_clear_error(tmp_path):
    from accelerate import Accelerator

    from mnemoguard.config import ConfigError

    acc = Accelerator(cpu=True)
    parts = build_tiny_components(TinyModelConfig(text_encoder="clip"), tmp_path / "model")
    common = dict(accelerator=acc, unet=parts.unet, noise_scheduler=parts.noise_scheduler, output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"expected encode_prompt= .* or text_encoder= and tokenizer=; found neither"):
        Guard(guard_section(), train_dataset=digits(), **common)
    with pytest.raises(ValueError, match=r"expected train_dataset= .*; found None"):
        Guard(guard_section(), encode_prompt=parts.encode_prompt, **common)
    with pytest.raises(ValueError, match=r"caption_column='caption' is not a column of train_dataset; its columns"):
        Guard(guard_section(), encode_prompt=parts.encode_prompt, train_dataset=digits(), caption_column="caption",
              **common)
    with pytest.raises(ConfigError, match="monitr"):
        Guard({"monitr": {"every_n_steps": 2}}, **common)
    with pytest.raises(ValueError, match=r"random_token_addition draws random tokens .* expected tokenizer="):
        Guard({"monitor": {"enabled": False}, "regularizers": {"random_token_addition": {}}},
              encode_prompt=parts.encode_prompt, **common)

    guard = Guard(guard_section(regularizers={"wen_filter": {}}), encode_prompt=parts.encode_prompt,
                  train_dataset=digits(), **common)
    x = torch.randn(4, 1, 16, 16)
    t = guard.sample_timesteps(4)
    assert guard.ema is not None  # built at the first use: the monitor's baseline is the EMA
    with pytest.raises(ValueError, match=r"missing \['encoder_hidden_states \(or captions\)'\].*found \["):
        guard.before_forward(timesteps=t, noisy_model_input=x)
    with pytest.raises(ValueError, match=r"timesteps must be a \[B\] integer tensor, found torch.float32"):
        guard.before_forward(timesteps=t.float(), noisy_model_input=x, captions=["a"] * 4)
    inputs = guard.before_forward(timesteps=t, noisy_model_input=x, captions=["a cat"] * 4)  # encoded by the guard
    assert inputs["encoder_hidden_states"].shape == (4, 16, 32) and inputs["indices"].tolist() == [-1] * 4
    pred = parts.unet(x, t, inputs["encoder_hidden_states"]).sample
    per_sample = F.mse_loss(pred, x, reduction="none").mean(dim=(1, 2, 3))
    with pytest.raises(ValueError, match=r"expected per-sample losses of shape \[4\].*found shape \(\)"):
        guard.loss(per_sample.mean(), inputs, model_pred=pred)
    with pytest.raises(ValueError, match="wen_filter compares the UNet's prediction: expected model_pred=; found"):
        guard.loss(per_sample, inputs)
    with pytest.raises(ValueError, match="expected the dict returned by guard.before_forward"):
        guard.loss(per_sample, {"timesteps": t})
    assert guard.loss(per_sample, inputs, model_pred=pred).ndim == 0
    with pytest.raises(ValueError, match="global_step must grow; found 0 after 0"):
        guard.step(0)
    with pytest.raises(ValueError, match=r"expected a Guard.state_dict\(\)"):
        guard.load_state_dict({"step": 3})


def test_a_disabled_guard_is_a_pass_through(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    parts = build_tiny_components(TinyModelConfig(text_encoder="clip"), tmp_path / "model")
    guard = Guard({"enabled": False}, accelerator=acc, unet=parts.unet, noise_scheduler=parts.noise_scheduler)
    assert not guard.enabled and len(guard.callbacks) == 0
    torch.manual_seed(3)
    expected = torch.randint(0, 1000, (8,))
    torch.manual_seed(3)
    t = guard.sample_timesteps(8)
    assert torch.equal(t, expected)  # drawn exactly as the diffusers scripts draw them
    x = torch.randn(8, 1, 16, 16)
    inputs = guard.before_forward(timesteps=t, noisy_model_input=x, encoder_hidden_states=torch.randn(8, 16, 32))
    per_sample = torch.rand(8)
    assert torch.equal(guard.loss(per_sample, inputs), per_sample.mean())
    assert guard.step(logs={"train/loss": 0.5}) == {"train/loss": 0.5} and guard.global_step == 1
    assert guard.ema is None and not guard.should_stop
