"""What a user's loop gets right without thinking about it: a last check when the run is shorter than the cadence,
train/loss over every micro-batch, a transformed dataset, a report that says what flags mean without rows, random
probes that never repeat another probe's content, the config without torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import torch
import torch.nn.functional as F

from mnemoguard.config import MonitorConfig, TinyModelConfig
from mnemoguard.data import digits_dataset, preprocess_image


def _loop(tmp_path, steps: int, accumulation: int, train_dataset, **guard_kwargs):
    """A minimal Accelerate loop with the guard (pixel-space tiny UNet, tiny CLIP), no indices passed."""
    from accelerate import Accelerator

    from mnemoguard import Guard
    from mnemoguard.trainer.models import build_tiny_components

    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    parts = build_tiny_components(TinyModelConfig(text_encoder="clip"), tmp_path / "model")
    unet, sched = parts.unet, parts.noise_scheduler
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet, optimizer = acc.prepare(unet, optimizer)
    section = {"monitor": {"every_n_steps": 100, "num_duplicate_probes": 2, "num_random_probes": 1,
                           "curvature_every_k_checks": 0}, "report": {"plots": False}}
    guard = Guard(section, accelerator=acc, unet=unet, noise_scheduler=sched, optimizer=optimizer,
                  encode_prompt=parts.encode_prompt, train_dataset=train_dataset, output_dir=tmp_path,
                  **guard_kwargs)
    data = digits_dataset().select(range(8 * steps * accumulation))
    returned, logs = [], []
    for i in range(steps * accumulation):
        rows = data[i * 8:(i + 1) * 8]
        x0 = torch.stack([preprocess_image(img, 16, 1) for img in rows["image"]])
        with acc.accumulate(unet):
            t = guard.sample_timesteps(8)
            noise = torch.randn_like(x0)
            inputs = guard.before_forward(timesteps=t, noisy_model_input=sched.add_noise(x0, noise, t),
                                          captions=list(rows["text"]))
            pred = unet(inputs["noisy_model_input"], t, inputs["encoder_hidden_states"]).sample
            loss = guard.loss(F.mse_loss(pred.float(), noise, reduction="none"), inputs, model_pred=pred)
            returned.append(float(loss.detach()))
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        out = guard.step()
        if out is not None:
            logs.append(out)
    guard.end()
    return guard, returned, logs


def test_a_short_run_gets_a_last_check_and_train_loss_covers_every_micro_batch(tmp_path):
    class Boom:
        """A with_transform that must never run for the guard (the loop's own preprocessing)."""

        def __call__(self, batch):
            raise AssertionError("the guard called the loop's transform")

    raw = digits_dataset().select(range(40))
    guard, returned, logs = _loop(tmp_path, steps=2, accumulation=2, train_dataset=raw.with_transform(Boom()))
    # every_n_steps=100 but 2 steps: one check, at the end of training (and the report knows it).
    assert [h["step"] for h in guard.monitor.history] == [2]
    assert [row["step"] for row in guard.state.log_history] == [1, 2, 2]  # the end check is logged at its step
    # train/loss is the mean over the step's micro-batches (here 2), not the last one.
    assert math.isclose(logs[0]["train/loss"], (returned[0] + returned[1]) / 2, rel_tol=1e-6)  # a float32 mean
    assert math.isclose(logs[1]["train/loss"], (returned[2] + returned[3]) / 2, rel_tol=1e-6)
    assert not math.isclose(logs[0]["train/loss"], returned[1], rel_tol=1e-3)
    report = (tmp_path / "report" / "report.md").read_text()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["monitor"]["checks"] == 1 and summary["verdict"] in ("ok", "suspect", "memorized")
    # No indices were passed: the report says what the flags are without rows, and how to get them.
    assert "no training sample can be named. Pass `indices=` to `guard.before_forward`" in report
    assert "held-out minus training for the probe loss" in report or "heldout" not in summary["monitor"]["splits"]


def test_the_report_names_the_contrast_orientation(tmp_path):
    from mnemoguard.callbacks.report.markdown import render_markdown

    summary = {"run": {"global_step": 4, "max_steps": 4, "stopped": False, "stop_step": None, "stop_reason": None,
                       "best_step": None, "best_checkpoint": None, "exported": None},
               "verdict": "ok", "alarms": [], "actions": {}, "early_stopping": [], "verdicts": [], "callbacks": {},
               "loss_flags": None, "status": "complete", "exported": {"source": "last", "step": 4, "verdict": "ok"},
               "last_step": {"step": 4, "verdict": "ok"}, "warnings": [],
               "monitor": {"config": {"baseline": "ema", "every_n_steps": 2}, "checks": 1, "bands": {"low": [0, 5]},
                           "splits": ["train", "heldout"], "signals": ["probe_loss"], "last_check": None}}
    text = render_markdown(summary, {})
    assert "training minus held-out for the gaps, held-out minus training for the probe loss" in text


def test_random_probes_never_repeat_the_content_of_another_probe():
    import datasets

    from mnemoguard.callbacks.bands import resolve_bands
    from mnemoguard.callbacks.monitor import choose_probes
    from mnemoguard.config import DataConfig
    from mnemoguard.data import ImageCaptionDataset

    base = digits_dataset().select(range(6))
    # Row 0's image and caption 30 times (a duplicated pair) among 5 other rows: the duplicate probe is row 0; no
    # random probe may be another copy of it, and no two random probes may be copies of each other.
    rows = [0] * 30 + [1, 2, 3, 4, 5]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": [base[i]["image"] for i in rows],
                                       "text": [base[i]["text"] for i in rows]}, features=features)
    ds = ImageCaptionDataset(data, DataConfig(resolution=16), 1)
    cfg = MonitorConfig(num_duplicate_probes=1, num_random_probes=5, num_heldout_probes=0)
    from diffusers import DDPMScheduler

    from mnemoguard.family import noise_schedule

    spec = choose_probes(ds, cfg, resolve_bands(cfg, noise_schedule(DDPMScheduler())), 1000)
    contents = [(ds.canonical_image(r).numpy().tobytes(), ds.captions[r]) for r in spec["train_rows"]]
    assert spec["train_rows"][0] == 0 and spec["train_kinds"][0] == "image_duplicate"  # image and caption repeat
    assert len(set(contents)) == len(contents) == 6


def test_the_config_imports_without_torch():
    code = "import sys, mnemoguard.config, mnemoguard.config.guard; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
