import math

import pytest
import torch

from mnemoguard.callbacks import Callback
from mnemoguard.trainer import Trainer, load_components

from .trainer_utils import image_tags, scalars, tiny_recipe, unet_weights


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            state.stop_reason = f"test stop at {self.step}"


def test_full_fine_tune_checkpoints_rotates_exports_and_logs(tmp_path):
    cfg = tiny_recipe(tmp_path, "training.checkpoints_total_limit=2", "validation.every_n_steps=3")
    trainer = Trainer(cfg)
    state = trainer.train()
    assert state.global_step == 6
    losses = [h["train/loss"] for h in state.log_history]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # no half-written checkpoint left behind
    assert (tmp_path / "checkpoint-6" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = load_components(tmp_path / "final")
    for name, p in reloaded.unet.named_parameters():
        torch.testing.assert_close(p, unet_weights(trainer)[name])
    logs = tmp_path / "logs"
    assert [s for s, _ in scalars(logs, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars(logs, "train/lr")] == pytest.approx([5e-4] * 6)
    assert "validation" in image_tags(logs)


def test_lora_run_trains_only_adapters_and_exports_a_lora_file(tmp_path):
    cfg = tiny_recipe(tmp_path, "model.lora.enabled=true", "training.max_train_steps=3", "training.learning_rate=1e-2")
    trainer = Trainer(cfg)
    trainer.setup()
    before = unet_weights(trainer)
    trainer.setup = lambda: None
    trainer.train()
    after = unet_weights(trainer)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora" in n for n in changed)
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert trainer.ema is not None and all("lora" in n for n in trainer.ema.names)


def test_resumed_run_ends_with_the_same_weights_ema_and_curves(tmp_path):
    common = ("training.max_train_steps=8", "training.gradient_accumulation_steps=2", "training.checkpointing_steps=4",
              "ema.snapshot_every=2", "ema.num_snapshots=2")
    straight = Trainer(tiny_recipe(tmp_path / "a", *common))
    straight.train()

    first = Trainer(tiny_recipe(tmp_path / "b", *common), callbacks=[StopAt(3)])
    assert first.train().global_step == 3  # interrupted mid-epoch (4 optimizer steps per epoch)
    resumed = Trainer(tiny_recipe(tmp_path / "b", *common, "training.resume_from_checkpoint=latest"))
    state = resumed.train()
    assert resumed.resumed_from.name == "checkpoint-3" and state.global_step == 8

    a, b = unet_weights(straight), unet_weights(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    assert resumed.ema.optimization_step == straight.ema.optimization_step == 8
    assert resumed.ema.snapshot_steps == straight.ema.snapshot_steps == [6, 8]
    for name in a:
        torch.testing.assert_close(resumed.ema.shadow[name], straight.ema.shadow[name], rtol=1e-5, atol=1e-6)
    assert [h["step"] for h in state.log_history] == list(range(1, 9))
    # TensorBoard: every step once, the resumed part continuing the same curve
    steps = [s for s, _ in scalars(tmp_path / "b" / "logs", "train/loss")]
    assert steps == list(range(1, 9))
    curve_a = [v for _, v in scalars(tmp_path / "a" / "logs", "train/loss")]
    curve_b = [v for _, v in scalars(tmp_path / "b" / "logs", "train/loss")]
    assert curve_b == pytest.approx(curve_a, rel=1e-4)


def test_a_callback_can_stop_training_and_a_checkpoint_is_written(tmp_path):
    trainer = Trainer(tiny_recipe(tmp_path, "training.checkpointing_steps=100"), callbacks=[StopAt(2)])
    state = trainer.train()
    assert state.global_step == 2 and state.stop_reason == "test stop at 2"
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "final").is_dir()


class DropEverything(Callback):
    drops_samples = True  # the Guard then checks whether anything was kept, and skips the optimizer step if not

    def on_loss(self, state, control, inputs, **kwargs):
        assert inputs["loss_per_sample"].shape == (8,)
        inputs["weights"] = torch.zeros_like(inputs["weights"])


class FixedTimesteps(Callback):
    def __init__(self):
        self.seen = []

    def on_train_begin(self, state, control, context, **kwargs):
        context.timesteps.install(lambda n, device, generator=None: (
            torch.full((n,), 7, device=device), torch.ones(n, device=device)), "FixedTimesteps")

    def on_before_forward(self, state, control, inputs, **kwargs):
        self.seen.append(inputs["timesteps"].unique().tolist())
        inputs["encoder_hidden_states"] = torch.zeros_like(inputs["encoder_hidden_states"])


def test_loss_hook_can_drop_every_sample_and_nothing_moves(tmp_path):
    trainer = Trainer(tiny_recipe(tmp_path, "training.max_train_steps=2", "training.adam_weight_decay=0"),
                      callbacks=[DropEverything()])
    trainer.setup()
    before = unet_weights(trainer)
    trainer.setup = lambda: None
    trainer.train()
    for name, w in unet_weights(trainer).items():
        assert torch.equal(w, before[name])


def test_timestep_sampler_and_conditioning_can_be_replaced_by_a_callback(tmp_path):
    cb = FixedTimesteps()
    Trainer(tiny_recipe(tmp_path, "training.max_train_steps=2"), callbacks=[cb]).train()
    assert cb.seen == [[7], [7]]


def test_v_prediction_min_snr_noise_offset_and_accumulation_train(tmp_path):
    cfg = tiny_recipe(tmp_path, "model.prediction_type=v_prediction", "training.snr_gamma=5",
                      "training.noise_offset=0.05", "training.gradient_accumulation_steps=2",
                      "training.max_train_steps=3", "training.lr_scheduler=cosine", "training.lr_warmup_steps=1")
    trainer = Trainer(cfg)
    state = trainer.train()
    assert trainer.components.noise_scheduler.config.prediction_type == "v_prediction"
    assert state.micro_step == 6 and all(math.isfinite(h["train/loss"]) for h in state.log_history)


def test_latent_model_trains_through_the_vae(tmp_path):
    cfg = tiny_recipe(tmp_path, "model.tiny.latent=true", "model.tiny.channels=3", "data.resolution=32",
                      "training.max_train_steps=2")
    state = Trainer(cfg).train()
    assert state.global_step == 2
    assert (tmp_path / "final" / "model_index.json").is_file()


def test_resolution_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"data.resolution=32 but the model makes 16x16 images"):
        Trainer(tiny_recipe(tmp_path, "data.resolution=32")).setup()


def test_bf16_mixed_precision_trains_lora_adapters_in_fp32(tmp_path):
    cfg = tiny_recipe(tmp_path, "training.mixed_precision=bf16", "model.lora.enabled=true",
                      "training.max_train_steps=2")
    trainer = Trainer(cfg)
    state = trainer.train()
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    dtypes = {n: p.dtype for n, p in unet.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora" not in n)
    assert all(math.isfinite(h["train/loss"]) for h in state.log_history)


class MarkBestAt(Callback):
    """Plays an early-stopping callback: an improvement at ``step`` asks for the best checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, control, **kwargs):
        if state.global_step == self.step:
            state.best_step, state.best_metric = self.step, 0.0
            control.should_save = True


def test_export_best_rolls_back_to_the_best_checkpoint(tmp_path):
    cfg = tiny_recipe(tmp_path, "training.export=best", "training.checkpointing_steps=100",
                      "training.checkpoints_total_limit=1", "training.max_train_steps=4")
    trainer = Trainer(cfg, callbacks=[MarkBestAt(2)])
    state = trainer.train()
    assert state.best_checkpoint.endswith("checkpoint-2") and (tmp_path / "checkpoint-2").is_dir()
    from diffusers import UNet2DConditionModel

    at_best = UNet2DConditionModel.from_pretrained(tmp_path / "checkpoint-2", subfolder="unet").state_dict()
    exported = load_components(tmp_path / "final").unet.state_dict()
    for name, w in at_best.items():
        assert torch.equal(exported[name], w)


def test_export_ema_writes_the_average_and_keeps_the_live_weights(tmp_path):
    trainer = Trainer(tiny_recipe(tmp_path, "training.export=ema", "training.max_train_steps=3"))
    trainer.train()
    exported = dict(load_components(tmp_path / "final").unet.named_parameters())
    for name, w in trainer.ema.shadow.items():
        assert torch.equal(exported[name], w)
    live = unet_weights(trainer)
    assert any(not torch.equal(live[n], trainer.ema.shadow[n]) for n in trainer.ema.names)
