"""The reference trainer: an Accelerate loop for full-UNet or LoRA fine-tuning of a text-to-image diffusion model.

It is the diffusers ``train_text_to_image(_lora).py`` loop with its usual flags (gradient accumulation, mixed
precision, clipping, LR schedulers, Min-SNR, noise offset, caption dropout, ``epsilon`` / ``v_prediction``,
checkpoints with rotation and resume, validation images), plus what mnemoguard needs: an EMA of the trainable weights
kept as the less-trained baseline, a callback list, a replaceable timestep sampler and per-sample loss hooks.
DeepSpeed ZeRO-2/3 comes from the Accelerate config (``accelerate launch --config_file recipes/accelerate/...``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..callbacks import Callback, CallbackList, TrainerControl, TrainerState, UniformTimestepSampler
from ..callbacks.guard import build_guard_callbacks
from ..callbacks.stepping import step_end_and_log, sync_stop
from ..config import RecipeConfig
from ..ema import EMAModel
from ..prompts import PromptEncoder
from ..sampling import generate
from . import checkpoints
from .data import ImageCaptionDataset, load_dataset_source, make_dataloader
from .models import SDComponents, load_or_build

logger = logging.getLogger("mnemoguard")

TRACKER_PROJECT = "mnemoguard"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat ``a/b`` keys with TensorBoard-hparams-safe values (lists become strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    return out


class Trainer:
    """Fine-tune the recipe's model on the recipe's data, calling ``callbacks`` along the way.

    Args:
        config: the recipe.
        callbacks: :class:`~mnemoguard.callbacks.Callback` instances, called in order.
        dataset: a ``datasets.Dataset`` to train on instead of ``config.data.source``.
        components: already-built model parts instead of ``config.model`` (LoRA is still added if enabled).
    """

    def __init__(
        self,
        config: RecipeConfig,
        callbacks: list[Callback] | None = None,
        dataset=None,
        components: SDComponents | None = None,
    ) -> None:
        self.config = config
        # The recipe's guard first (its monitor produces what its consumers read), then the caller's callbacks.
        self.callbacks = CallbackList([*build_guard_callbacks(config.guard), *(callbacks or [])])
        self._dataset_override = dataset
        self._components_override = components
        self.state = TrainerState()
        self.control = TrainerControl()
        self.output_dir = Path(config.training.output_dir)
        self.timestep_sampler = None
        self.ema: EMAModel | None = None

    # ------------------------------------------------------------------------------------------------ set-up
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

        t = self.config.training
        use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        no_cuda = not torch.cuda.is_available()
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        project = ProjectConfiguration(
            project_dir=str(self.output_dir), logging_dir=str(self.output_dir / self.config.logging.logging_dir)
        )
        return Accelerator(
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision=t.mixed_precision,
            log_with=None if self.config.logging.report_to == "none" else self.config.logging.report_to,
            project_config=project,
            # Without CUDA, multi-process runs need cpu=True (gloo DDP); DeepSpeed needs cpu=False plus gloo.
            cpu=no_cuda and not use_deepspeed,
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if no_cuda and distributed else [],
        )

    def _register_hooks(self) -> None:
        acc, lora = self.accelerator, self.config.model.lora.enabled

        def save_hook(models, weights, output_dir):
            if not weights:  # DeepSpeed saves its own engine checkpoint
                return
            if acc.is_main_process:
                for model in models:
                    self._export_unet(acc.unwrap_model(model), Path(output_dir), lora)
            weights.pop()

        def load_hook(models, input_dir):
            while models:
                self._load_unet(acc.unwrap_model(models.pop()), Path(input_dir), lora)

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    @staticmethod
    def _export_unet(unet, directory: Path, lora: bool, state_dict=None) -> None:
        """The UNet in diffusers format: ``unet/`` (full) or ``pytorch_lora_weights.safetensors`` (LoRA)."""
        if lora:
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=state_dict))
            StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
        else:
            unet.save_pretrained(directory / "unet", state_dict=state_dict)

    @staticmethod
    def _load_unet(unet, directory: Path, lora: bool) -> None:
        if lora:
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft.utils import set_peft_model_state_dict

            state, _ = StableDiffusionPipeline.lora_state_dict(directory)
            state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
            result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"LoRA checkpoint {directory} has unexpected keys: {result.unexpected_keys[:5]}")
        else:
            from diffusers import UNet2DConditionModel

            loaded = UNet2DConditionModel.from_pretrained(directory, subfolder="unet")
            unet.register_to_config(**loaded.config)
            unet.load_state_dict(loaded.state_dict())
            del loaded

    # ------------------------------------------------------------------------------------------------ helpers
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Text embeddings of the training captions: each caption encoded alone and cached (the encoder is frozen),
        so an embedding never depends on the batch it first came in (:mod:`mnemoguard.prompts`)."""
        return self.prompts(captions)

    def _training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, bool]:
        """One micro-batch: noise, timesteps, conditioning, UNet forward, per-sample loss -> (loss, whether a
        regularizer dropped every sample: ``inputs["step_skipped"]``)."""
        t, parts, sched = self.config.training, self.components, self.components.noise_scheduler
        device = self.accelerator.device
        model_input = parts.encode_images(batch["pixel_values"].to(device, self.weight_dtype)).float()
        bsz = model_input.shape[0]
        noise = torch.randn_like(model_input)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn(bsz, model_input.shape[1], 1, 1, device=device)
        timesteps, weights = self.timestep_sampler(bsz, device)
        captions = list(batch["captions"])
        if t.caption_dropout > 0:
            drop = torch.rand(bsz) < t.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        inputs: dict[str, Any] = {
            "captions": captions,
            "indices": batch["indices"],
            "model_input": model_input,
            "noise": noise,
            "timesteps": timesteps,
            "noisy_model_input": sched.add_noise(model_input, noise, timesteps),
            "encoder_hidden_states": self.encode_captions(captions),
            "weights": weights.float(),
            "extra_loss": torch.zeros((), device=device),
        }
        kw = self._hook_kwargs()
        self.callbacks.call("on_before_forward", self.state, self.control, inputs=inputs, **kw)
        pred = self.unet(inputs["noisy_model_input"], inputs["timesteps"], inputs["encoder_hidden_states"]).sample
        if sched.config.prediction_type == "epsilon":
            target = noise
        elif sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(model_input, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {sched.config.prediction_type!r} for training")
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if t.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sched, timesteps)
            clipped = torch.clamp(snr, max=t.snr_gamma)
            per_sample = per_sample * (clipped / (snr + 1 if sched.config.prediction_type == "v_prediction" else snr))
        inputs.update(model_pred=pred, target=target, loss_per_sample=per_sample)
        self.callbacks.call("on_loss", self.state, self.control, inputs=inputs, **kw)
        # Weights multiply per-sample losses; the mean is over the batch (samplers re-weight, filters zero out).
        loss = (inputs["loss_per_sample"] * inputs["weights"]).mean() + inputs["extra_loss"]
        return loss, bool(inputs.get("step_skipped", False))

    def _skip_optimizer_step(self, all_dropped: bool) -> bool:
        """Whether every micro-batch of this optimizer step, on every rank, had all its samples dropped by a
        regularizer (Wen's filter, IET-AGC): then the step is skipped, as in Wen et al.'s code, so that Adam's moments
        do not move the weights on zero gradients. One all-reduce of a flag per step when distributed. DeepSpeed
        steps its engine inside ``backward``, so there the zero-gradient step is taken (documented limitation)."""
        acc = self.accelerator
        if acc.distributed_type.name == "DEEPSPEED":
            return False
        if acc.num_processes == 1:
            return all_dropped
        flag = torch.tensor([0.0 if all_dropped else 1.0], device=acc.device)
        return float(acc.reduce(flag, reduction="sum").item()) == 0.0

    def _hook_kwargs(self) -> dict[str, Any]:
        return {
            "trainer": self, "accelerator": self.accelerator, "unet": self.unet, "components": self.components,
            "ema": self.ema, "optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler,
        }

    @torch.no_grad()
    def log_validation(self) -> torch.Tensor | None:
        """Images for the validation prompts on a fixed seed (no global RNG use) -> TensorBoard ``validation``."""
        v = self.config.validation
        if not v.prompts:
            return None
        unet = self.accelerator.unwrap_model(self.unet)
        was_training = unet.training
        unet.eval()
        prompts = [p for p in v.prompts for _ in range(v.num_images_per_prompt)]
        cond = self.encode_captions(prompts)
        uncond = self.encode_captions([""])
        images = generate(
            unet, self.components.noise_scheduler, cond, uncond, v.guidance_scale, v.num_inference_steps,
            torch.Generator().manual_seed(v.seed), decode=self.components.decode if self.components.latent else None,
        )
        unet.train(was_training)
        if self.accelerator.is_main_process and self.config.logging.report_to == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_images("validation", images, self.state.global_step)
            writer.add_text("validation/prompts", " | ".join(v.prompts), self.state.global_step)
        return images

    def save_checkpoint(self) -> Path:
        """``accelerator.save_state`` into a temporary directory, renamed into place, then rotation."""
        acc, step = self.accelerator, self.state.global_step
        path = self.output_dir / f"checkpoint-{step}"
        if self.state.best_step == step:  # an improvement asked for this save: it is the rollback target
            self.state.best_checkpoint = str(path)
        acc.wait_for_everyone()
        tmp = checkpoints.temporary_path(self.output_dir, step)
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            checkpoints.commit(self.output_dir, step)
            keep = {Path(self.state.best_checkpoint)} if self.state.best_checkpoint else set()
            checkpoints.rotate(self.output_dir, self.config.training.checkpoints_total_limit, keep | {path})
        acc.wait_for_everyone()
        self.callbacks.call("on_save", self.state, self.control, checkpoint=path, **self._hook_kwargs())
        return path

    def restore_best(self) -> bool:
        """Roll the UNet back to ``state.best_checkpoint`` (the run's counters and curves stay as they are)."""
        best = self.state.best_checkpoint
        if not best or not Path(best).is_dir():
            return False
        acc = self.accelerator
        if acc.distributed_type.name == "DEEPSPEED":
            keep = self.state.state_dict()
            acc.load_state(best)
            self.state.load_state_dict(keep)
        else:
            self._load_unet(acc.unwrap_model(self.unet), Path(best), self.config.model.lora.enabled)
        acc.print(f"exporting the best checkpoint: {best} (step {self.state.best_step})")
        return True

    def export(self, directory: Path | None = None) -> Path:
        """The final weights (``training.export``: last, best or ema): ``final/`` with a LoRA file, or a full
        diffusers model directory."""
        acc = self.accelerator
        directory = directory or self.output_dir / "final"
        lora = self.config.model.lora.enabled
        source = self.config.training.export
        if source == "best" and not self.restore_best():
            acc.print("training.export=best but no best checkpoint was recorded: exporting the last weights")
        if source == "ema":
            if self.ema is None:
                raise ValueError("training.export=ema needs ema.enabled=true")
            with self.ema.average_parameters(acc.unwrap_model(self.unet)):
                return self._export(directory, lora)
        return self._export(directory, lora)

    def _export(self, directory: Path, lora: bool) -> Path:
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.unet)  # gathers ZeRO-3 shards (every rank must call it)
        if acc.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            unet = acc.unwrap_model(self.unet)
            if lora:
                self._export_unet(unet, directory, lora=True, state_dict=state_dict)
            else:
                parts = self.components
                SDComponents(unet, parts.noise_scheduler, parts.text_encoder, parts.tokenizer, parts.vae,
                             parts.text_max_length).save_pretrained(directory, unet_state_dict=state_dict)
        acc.wait_for_everyone()
        return directory

    # ------------------------------------------------------------------------------------------------ the loop
    def setup(self) -> None:
        """Build accelerator, model, data, optimizer, EMA; restore a checkpoint if asked. Called by :meth:`train`."""
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        cfg, t = self.config, self.config.training
        self.accelerator = acc = self._make_accelerator()
        self.state.is_world_process_zero = acc.is_main_process
        set_seed(t.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        parts = self._components_override or load_or_build(cfg.model, self.output_dir / ".build")
        if self._components_override is not None and cfg.model.lora.enabled:
            from .models import add_lora

            add_lora(parts.unet, cfg.model.lora)
        self.components = parts
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        self.prompts = PromptEncoder(lambda captions: parts.encode_prompt(captions, device=acc.device),
                                     device=acc.device, dtype=self.weight_dtype)
        parts.text_encoder.to(acc.device, dtype=self.weight_dtype)
        if parts.vae is not None:
            parts.vae.to(acc.device, dtype=self.weight_dtype)
        if cfg.model.lora.enabled and self.weight_dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            parts.unet.to(acc.device, dtype=self.weight_dtype)  # frozen base in low precision,
            cast_training_params(parts.unet, dtype=torch.float32)  # adapters in fp32

        if cfg.data.resolution != parts.image_size:
            raise ValueError(
                f"data.resolution={cfg.data.resolution} but the model makes {parts.image_size}x{parts.image_size} "
                "images (UNet sample_size x VAE scale factor); set data.resolution to match"
            )
        hf = load_dataset_source(self._dataset_override if self._dataset_override is not None else cfg.data.source)
        self.dataset = ImageCaptionDataset(hf, cfg.data, parts.image_channels)
        self.train_dataloader = make_dataloader(self.dataset, t.train_batch_size, t.seed, cfg.data.num_workers)
        self.sampler = self.train_dataloader.sampler

        params = [p for p in parts.unet.parameters() if p.requires_grad]
        lr = t.learning_rate * (t.train_batch_size * t.gradient_accumulation_steps * acc.num_processes
                                if t.scale_lr else 1)
        self.optimizer = torch.optim.AdamW(
            params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon
        )
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler, optimizer=self.optimizer, num_warmup_steps=t.lr_warmup_steps * acc.num_processes,
            num_training_steps=t.max_train_steps * acc.num_processes,
        )
        self.unet, self.optimizer, self.train_dataloader, self.lr_scheduler = acc.prepare(
            parts.unet, self.optimizer, self.train_dataloader, self.lr_scheduler
        )
        self.timestep_sampler = UniformTimestepSampler(parts.noise_scheduler.config.num_train_timesteps)
        if cfg.ema.enabled:
            e = cfg.ema
            self.ema = EMAModel(
                acc.unwrap_model(self.unet), decay=e.decay, lag=e.lag, update_after_step=e.update_after_step,
                use_ema_warmup=e.use_ema_warmup, snapshot_every=e.snapshot_every, num_snapshots=e.num_snapshots,
                device=e.device,
            )
        self._register_hooks()
        self.state.max_steps = t.max_train_steps
        self.callbacks.call("on_train_begin", self.state, self.control, **self._hook_kwargs())
        # Everything with state rides in every checkpoint (after on_train_begin: callbacks may swap the sampler).
        acc.register_for_checkpointing(self.state, self.callbacks)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        if hasattr(self.timestep_sampler, "state_dict"):
            acc.register_for_checkpointing(self.timestep_sampler)

        self.resumed_from = None
        if t.resume_from_checkpoint:
            path = checkpoints.resolve_checkpoint(self.output_dir, t.resume_from_checkpoint)
            if path is None:
                acc.print(f"resume_from_checkpoint={t.resume_from_checkpoint!r}: no checkpoint yet, starting fresh")
            else:
                acc.load_state(str(path))
                self.resumed_from = path
                acc.print(f"resumed from {path} at step {self.state.global_step}")
                if self.state.stop_reason:  # resuming is a decision to go on
                    acc.print(f"(the interrupted run had stopped: {self.state.stop_reason})")
                    self.state.stop_reason = None

        if acc.is_main_process and cfg.logging.report_to == "tensorboard":
            purge = {"purge_step": self.state.global_step + 1} if self.resumed_from else {}
            acc.init_trackers(TRACKER_PROJECT, config=_flat(cfg.to_dict()), init_kwargs={"tensorboard": purge})

    def train(self) -> TrainerState:
        """Run the whole fine-tune; returns the final :class:`TrainerState`."""
        from tqdm.auto import tqdm

        self.setup()
        acc, t, state = self.accelerator, self.config.training, self.state
        batches_per_epoch = len(self.train_dataloader)
        steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
        first_epoch = state.global_step // steps_per_epoch
        skip_batches = (state.global_step % steps_per_epoch) * t.gradient_accumulation_steps
        num_epochs = math.ceil(t.max_train_steps / steps_per_epoch)
        progress = tqdm(total=t.max_train_steps, initial=state.global_step, desc="train",
                        disable=not (acc.is_local_main_process and self.config.logging.progress_bar))
        self.unet.train()
        kw = self._hook_kwargs()
        step_loss, micro, skipped, all_dropped = 0.0, 0, 0, True
        done = state.global_step >= t.max_train_steps
        for epoch in range(first_epoch, num_epochs):
            if done:
                break
            state.epoch = epoch
            loader = self.train_dataloader
            if epoch == first_epoch and skip_batches:
                loader = acc.skip_first_batches(self.train_dataloader, skip_batches)
            # Through the prepared loader: accelerate otherwise sets the sampler's epoch from its own iteration
            # counter, which a checkpoint does not keep, and a resumed run would replay epoch 0's order.
            (loader if hasattr(loader, "set_epoch") else self.sampler).set_epoch(epoch)
            for batch in loader:
                if micro == 0:
                    self.control.reset_step_flags()
                    self.callbacks.call("on_step_begin", state, self.control, **kw)
                with acc.accumulate(self.unet):
                    loss, dropped = self._training_loss(batch)
                    all_dropped &= dropped
                    acc.backward(loss)
                    skip_step = acc.sync_gradients and self._skip_optimizer_step(all_dropped)
                    if acc.sync_gradients and t.max_grad_norm and not skip_step:
                        acc.clip_grad_norm_(self.unet.parameters(), t.max_grad_norm)
                    if not skip_step:
                        self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                state.micro_step += 1
                micro += 1
                step_loss += acc.gather(loss.detach().reshape(1)).mean().item() / t.gradient_accumulation_steps
                skipped += batch["num_skipped"]
                if not acc.sync_gradients:
                    continue
                state.global_step += 1
                micro, all_dropped = 0, True
                if self.ema is not None:
                    self.ema.step(acc.unwrap_model(self.unet))
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}")
                logs = {"train/loss": step_loss, "train/lr": self.lr_scheduler.get_last_lr()[0]}
                if skipped:
                    logs["data/skipped_samples"] = skipped
                step_loss = 0.0
                self._on_step_end(logs, kw)
                if state.global_step >= t.max_train_steps or self.control.should_training_stop:
                    done = True
                    break
        progress.close()
        self._finish(kw)
        return state

    def _on_step_end(self, logs: dict[str, float], kw: dict[str, Any]) -> None:
        acc, t, v, state = self.accelerator, self.config.training, self.config.validation, self.state
        step = state.global_step
        if step % t.log_every == 0 or step == t.max_train_steps:
            self.control.should_log = True
        if v.every_n_steps and step % v.every_n_steps == 0:
            self.control.should_evaluate = True
        if t.checkpointing_steps and step % t.checkpointing_steps == 0:
            self.control.should_save = True
        step_end_and_log(self.callbacks, state, self.control, logs, **kw)
        if self.control.should_evaluate:
            self.log_validation()
            self.callbacks.call("on_evaluate", state, self.control, **kw)
        sync_stop(state, self.control, acc)
        if self.control.should_save or self.control.should_training_stop:
            self.save_checkpoint()

    def _finish(self, kw: dict[str, Any]) -> None:
        acc = self.accelerator
        v = self.config.validation
        if v.prompts and (not v.every_n_steps or self.state.global_step % v.every_n_steps):
            self.log_validation()
        self.final_dir = self.export()
        self.callbacks.call("on_train_end", self.state, self.control, **kw)
        acc.end_training()
