"""The reference trainer: an Accelerate loop for full or LoRA fine-tuning of a text-to-image model of any family
(SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1: :mod:`mnemoguard.family`).

It is the diffusers ``train_text_to_image(_lora[_sdxl]).py`` / ``train_dreambooth_lora_{sd3,flux}.py`` loop with their
usual flags (gradient accumulation, mixed precision, clipping, LR schedulers, Min-SNR, noise offset, caption dropout,
``epsilon`` / ``v_prediction`` / the flow velocity with a ``weighting_scheme``, checkpoints with rotation and resume,
validation images), and it owns a :class:`mnemoguard.Guard` that it drives with
exactly the calls a user's script makes (``sample_timesteps``, ``before_forward``, ``loss``, ``step``, ``end``): the
recipe's ``guard:`` section, the EMA of the trainable weights (the less-trained baseline), the run's counters and
curves, all come from the Guard. DeepSpeed ZeRO-2/3 comes from the Accelerate config
(``accelerate launch --config_file recipes/accelerate/...``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..callbacks import Callback, TrainerState
from ..config import RecipeConfig
from ..data import ImageCaptionDataset, load_dataset_source
from ..denoiser import denoising_loss
from ..family.adapters import model_adapter
from ..guard import Guard
from ..prompts import PromptEncoder
from ..sampling import generate
from . import checkpoints
from .loader import make_dataloader
from .models import ModelParts, load_or_build
from .weights import load_model, register_model_hooks, save_model

logger = logging.getLogger("mnemoguard")

TRACKER_PROJECT = "mnemoguard"


def _finite(module: Any) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class Trainer:
    """Fine-tune the recipe's model on the recipe's data, with the recipe's guard.

    Args:
        config: the recipe.
        callbacks: more :class:`~mnemoguard.callbacks.Callback` s for the Guard (run after the guard's own).
        dataset: a ``datasets.Dataset`` to train on instead of ``config.data.source``.
        components: already-built model parts instead of ``config.model`` (LoRA is still added if enabled).
    """

    def __init__(self, config: RecipeConfig, callbacks: list[Callback] | None = None, dataset: Any = None,
                 components: ModelParts | None = None) -> None:
        self.config = config
        self.user_callbacks = list(callbacks or [])
        self._dataset_override = dataset
        self._components_override = components
        self.output_dir = Path(config.training.output_dir)
        self.guard: Guard | None = None
        self.resumed_from: Path | None = None
        self.final_dir: Path | None = None

    @property
    def state(self) -> TrainerState:
        return self.guard.state

    @property
    def ema(self) -> Any:
        return self.guard.ema

    @property
    def unet(self) -> Any:
        """:attr:`model` (its name when only UNets were supported)."""
        return self.model

    # ------------------------------------------------------------------------------------------------ set-up
    def _make_accelerator(self) -> Any:
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

    def setup(self) -> None:
        """Accelerator, model, data, optimizer, the Guard; restore a checkpoint if asked. Called by :meth:`train`."""
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        cfg, t = self.config, self.config.training
        checkpoints.claim_output_dir(self.output_dir, resume=bool(t.resume_from_checkpoint),
                                     overwrite=t.overwrite_output_dir)
        self.accelerator = acc = self._make_accelerator()
        set_seed(t.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        parts = self._components_override or load_or_build(cfg.model, self.output_dir / ".build")
        if self._components_override is not None and cfg.model.lora.enabled:
            from .models import add_lora

            add_lora(parts.model, cfg.model.lora)
        self.components = parts
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        self.prompts = PromptEncoder(lambda captions: parts.encode_prompt(captions, device=acc.device),
                                     device=acc.device, dtype=self.weight_dtype)
        parts.text.to(acc.device, dtype=self.weight_dtype)
        if parts.vae is not None:
            parts.vae.to(acc.device, dtype=self.weight_dtype)
        if cfg.model.lora.enabled and self.weight_dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            parts.model.to(acc.device, dtype=self.weight_dtype)  # frozen base in low precision,
            cast_training_params(parts.model, dtype=torch.float32)  # adapters in fp32
        if parts.family in ("sd", "sdxl") and cfg.data.resolution != parts.image_size:
            raise ValueError(
                f"data.resolution={cfg.data.resolution} but the model makes {parts.image_size}x{parts.image_size} "
                "images (UNet sample_size x VAE scale factor); set data.resolution to match"
            )
        hf = load_dataset_source(self._dataset_override if self._dataset_override is not None else cfg.data.source)
        self.dataset = ImageCaptionDataset(hf, cfg.data, parts.image_channels)
        bad = self.dataset.check_rows()  # every caption and image header, before step 1
        if bad:
            acc.print(f"data: {len(bad)} unreadable row(s) will be skipped (data.skip_bad_samples), e.g. rows "
                      f"{bad[:5]}")
        self.train_dataloader = make_dataloader(self.dataset, t.train_batch_size, t.seed, cfg.data.num_workers)
        self.sampler = self.train_dataloader.sampler
        params = [p for p in parts.model.parameters() if p.requires_grad]
        lr = t.learning_rate * (t.train_batch_size * t.gradient_accumulation_steps * acc.num_processes
                                if t.scale_lr else 1)
        self.optimizer = torch.optim.AdamW(
            params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon
        )
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler, optimizer=self.optimizer, num_warmup_steps=t.lr_warmup_steps * acc.num_processes,
            num_training_steps=t.max_train_steps * acc.num_processes,
        )
        self.model, self.optimizer, self.train_dataloader, self.lr_scheduler = acc.prepare(
            parts.model, self.optimizer, self.train_dataloader, self.lr_scheduler
        )
        register_model_hooks(acc, cfg.model.lora.enabled, parts.family)
        ema = {k: v for k, v in vars(cfg.ema).items() if k != "enabled"}
        flow = parts.family in ("sd3", "flux")
        self.guard = Guard(
            cfg, accelerator=acc, model=model_adapter(self.model, guidance_scale=cfg.model.guidance_scale),
            noise_scheduler=parts.noise_scheduler, optimizer=self.optimizer,
            train_dataset=self.dataset, encode_prompt=lambda caps: parts.encode_prompt(caps, device=acc.device),
            tokenizer=parts.tokenizer, vae=parts.vae, ema=cfg.ema.enabled, ema_kwargs=ema,
            output_dir=self.output_dir, callbacks=self.user_callbacks, log_every=t.log_every,
            max_steps=t.max_train_steps, hparams=self._hparams(), resolution=cfg.data.resolution,
            weighting_scheme=t.weighting_scheme if flow else None, logit_mean=t.logit_mean, logit_std=t.logit_std,
            mode_scale=t.mode_scale,
        )
        # the loop's own forward: the family's call on the prepared (DDP / DeepSpeed) model
        self.adapter = self.guard.context.denoiser.adapter.with_module(self.model)
        if t.resume_from_checkpoint:
            path = checkpoints.resolve_checkpoint(self.output_dir, t.resume_from_checkpoint)
            if path is None:
                acc.print(f"resume_from_checkpoint={t.resume_from_checkpoint!r}: no checkpoint yet, starting fresh")
            else:
                acc.load_state(str(path))
                self.resumed_from = path
                acc.print(f"resumed from {path} at step {self.state.global_step}")
        if acc.is_main_process and cfg.logging.report_to == "tensorboard":
            purge = {"purge_step": self.state.global_step + 1} if self.resumed_from else {}
            # No config=: accelerate would write it as hparams into a new timestamped run at every launch; the
            # guard's dashboard writes the hparams into the training run itself.
            acc.init_trackers(TRACKER_PROJECT, init_kwargs={"tensorboard": purge})

    def _hparams(self) -> dict[str, Any]:
        cfg = self.config
        t = cfg.training
        return {"training/learning_rate": t.learning_rate, "training/max_train_steps": t.max_train_steps,
                "training/train_batch_size": t.train_batch_size, "training/seed": t.seed,
                "model/lora": cfg.model.lora.enabled, "model/lora_rank": cfg.model.lora.rank,
                "model/family": self.components.family}

    # ------------------------------------------------------------------------------------------------ one micro-batch
    def _training_loss(self, batch: dict[str, Any]) -> Tensor:
        """Noise, timesteps, conditioning, the network's forward, per-sample loss: what a diffusers script does, with
        the Guard's three per-micro-batch calls."""
        t, parts, guard = self.config.training, self.components, self.guard
        den, device = guard.context.denoiser, self.accelerator.device
        model_input = parts.encode_images(batch["pixel_values"].to(device, self.weight_dtype)).float()
        bsz = model_input.shape[0]
        noise = torch.randn_like(model_input)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn(bsz, model_input.shape[1], 1, 1, device=device)
        timesteps = guard.sample_timesteps(bsz, device)
        captions = list(batch["captions"])
        if t.caption_dropout > 0:
            drop = torch.rand(bsz) < t.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        entries: dict[str, Any] = {}
        self.adapter.conditioning_into(entries, self.prompts(captions))
        inputs = guard.before_forward(
            timesteps=timesteps, noisy_model_input=den.schedule.add_noise(model_input, noise, timesteps),
            captions=captions, indices=batch["indices"], model_input=model_input, noise=noise, **entries,
        )
        pred = self.adapter(inputs["noisy_model_input"], inputs["timesteps"], inputs["conditioning"])
        target = den.target(model_input, noise, timesteps)
        per_sample = denoising_loss(pred, target) * self._loss_weights(timesteps)
        return guard.loss(per_sample, inputs, model_pred=pred, target=target)

    def _loss_weights(self, timesteps: Tensor) -> Tensor | float:
        """Min-SNR for the DDPM families (``min(SNR, γ)/SNR``, ``/(SNR + 1)`` for v-prediction); for flow matching
        the ``weighting_scheme``'s loss weight (``sigma_sqrt``: σ⁻², ``cosmap``; diffusers'
        ``compute_loss_weighting_for_sd3``). 1 otherwise."""
        t, den = self.config.training, self.guard.context.denoiser
        if den.schedule.kind == "flow_matching":
            if t.weighting_scheme not in ("sigma_sqrt", "cosmap"):
                return 1.0
            from diffusers.training_utils import compute_loss_weighting_for_sd3

            return compute_loss_weighting_for_sd3(t.weighting_scheme, den.sigma(timesteps)).float()
        if t.snr_gamma is None:
            return 1.0
        snr = den.schedule.snr(timesteps)
        clipped = torch.clamp(snr, max=t.snr_gamma)
        return clipped / (snr + 1 if den.prediction_type == "v_prediction" else snr)

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> TrainerState:
        """Run the whole fine-tune; returns the final :class:`~mnemoguard.callbacks.TrainerState`."""
        from tqdm.auto import tqdm

        self.setup()
        acc, t, guard = self.accelerator, self.config.training, self.guard
        steps_per_epoch = math.ceil(len(self.train_dataloader) / t.gradient_accumulation_steps)
        global_step = guard.global_step
        first_epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * t.gradient_accumulation_steps
        num_epochs = math.ceil(t.max_train_steps / steps_per_epoch)
        progress = tqdm(total=t.max_train_steps, initial=global_step, desc="train",
                        disable=not (acc.is_local_main_process and self.config.logging.progress_bar))
        try:
            self._loop(progress, first_epoch, num_epochs, skip_batches)
        except BaseException as err:  # the report says the run failed, and where; the error goes on
            progress.close()
            if guard._begun and not guard._ended:
                guard.end(error=err)
            raise
        progress.close()
        self._finish()
        return self.state

    def _loop(self, progress: Any, first_epoch: int, num_epochs: int, skip_batches: int) -> None:
        acc, t, guard = self.accelerator, self.config.training, self.guard
        global_step = guard.global_step
        skipped = int(guard.metrics.get("data/skipped_samples", 0))  # cumulative, kept across a resume
        self.model.train()
        done = global_step >= t.max_train_steps
        for epoch in range(first_epoch, num_epochs):
            if done:
                break
            loader = self.train_dataloader
            if epoch == first_epoch and skip_batches:
                loader = acc.skip_first_batches(self.train_dataloader, skip_batches)
            # Through the prepared loader: accelerate otherwise sets the sampler's epoch from its own iteration
            # counter, which a checkpoint does not keep, and a resumed run would replay epoch 0's order.
            (loader if hasattr(loader, "set_epoch") else self.sampler).set_epoch(epoch)
            for batch in loader:
                with acc.accumulate(self.model):
                    loss = self._training_loss(batch)
                    acc.backward(loss)
                    if acc.sync_gradients and t.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                skipped += batch["num_skipped"]
                if not acc.sync_gradients:
                    continue
                global_step += 1
                logs = {"train/lr": self.lr_scheduler.get_last_lr()[0]}
                if skipped:
                    logs["data/skipped_samples"] = skipped
                logs = guard.step(global_step, logs=logs, epoch=epoch)
                progress.update(1)
                if "train/loss" in logs:
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                self._after_step(global_step)
                if global_step >= t.max_train_steps or guard.should_stop:
                    done = True
                    break

    def _after_step(self, step: int) -> None:
        t, v = self.config.training, self.config.validation
        if v.every_n_steps and step % v.every_n_steps == 0:
            self.log_validation()
        if (t.checkpointing_steps and step % t.checkpointing_steps == 0) or self.guard.should_save:
            self.save_checkpoint()

    def _finish(self) -> None:
        v = self.config.validation
        if v.prompts and (not v.every_n_steps or self.state.global_step % v.every_n_steps):
            self.log_validation()
        with self.exported_weights() as exported:  # the guard's last check and report describe these weights
            self.final_dir = self._write(self.output_dir / "final", self.config.model.lora.enabled)
            self.guard.end(final_dir=self.final_dir, exported=exported)
        self.accelerator.end_training()

    # ------------------------------------------------------------------------------------------------ side work
    @torch.no_grad()
    def log_validation(self) -> Tensor | None:
        """Images for the validation prompts on a fixed seed (no global RNG use) -> TensorBoard ``validation``."""
        from ..isolation import eval_mode

        v = self.config.validation
        if not v.prompts:
            return None
        den = self.guard.context.denoiser
        prompts = [p for p in v.prompts for _ in range(v.num_images_per_prompt)]
        with eval_mode(den.model):
            images = generate(den, self.prompts(prompts), self.prompts([""]), v.guidance_scale,
                              v.num_inference_steps, torch.Generator().manual_seed(v.seed),
                              decode=self.components.decode if self.components.latent else None)
        if self.accelerator.is_main_process and self.config.logging.report_to == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_images("validation", images, self.state.global_step)
            writer.add_text("validation/prompts", " | ".join(v.prompts), self.state.global_step)
        return images

    def save_checkpoint(self) -> Path:
        """``accelerator.save_state`` into a temporary directory, renamed into place, then rotation (the best
        checkpoint, the rollback target, is never rotated away)."""
        acc, step = self.accelerator, self.state.global_step
        path = self.output_dir / f"checkpoint-{step}"
        self.guard.note_checkpoint(path)
        acc.wait_for_everyone()
        acc.save_state(str(checkpoints.temporary_path(self.output_dir, step)))
        acc.wait_for_everyone()
        if acc.is_main_process:
            checkpoints.commit(self.output_dir, step)
            keep = {Path(p) for p in (self.state.best_checkpoint, self.state.finite_checkpoint) if p}
            checkpoints.rotate(self.output_dir, self.config.training.checkpoints_total_limit, keep | {path})
        acc.wait_for_everyone()
        return path

    def _load_weights(self, checkpoint: str | None, what: str) -> bool:
        """Put a checkpoint's weights into the live model (the run's counters and curves stay as they are)."""
        if not checkpoint or not Path(checkpoint).is_dir():
            return False
        acc = self.accelerator
        if acc.distributed_type.name == "DEEPSPEED":
            with self.guard.run_state.paused():
                acc.load_state(checkpoint)
        else:
            load_model(acc.unwrap_model(self.model), Path(checkpoint), self.config.model.lora.enabled,
                       self.components.family)
        acc.print(f"exporting {what}: {checkpoint}")
        return True

    @contextlib.contextmanager
    def exported_weights(self) -> Iterator[dict[str, Any]]:
        """The model holds the weights to export for the block (``training.export``: the last, the best checkpoint's,
        or the EMA's; after a divergence with non-finite weights, the last finite checkpoint's); yields what they are
        (``{"source", "step"}``)."""
        state, source = self.state, self.config.training.export
        if state.diverged_step is not None and not _finite(self.accelerator.unwrap_model(self.model)):
            step = checkpoints.checkpoint_step(state.finite_checkpoint) if state.finite_checkpoint else None
            if self._load_weights(state.finite_checkpoint, "the last checkpoint before the divergence"):
                yield {"source": "last finite checkpoint", "step": step}
                return
            self.accelerator.print("the weights are not finite and no checkpoint before the divergence exists: "
                                   "exporting them as they are")
        if source == "best":
            if self._load_weights(state.best_checkpoint, f"the best checkpoint (step {state.best_step})"):
                yield {"source": "best", "step": state.best_step}
                return
            self.accelerator.print("training.export=best but no best checkpoint was recorded: exporting the last "
                                   "weights")
        if source == "ema":
            if self.ema is None:
                raise ValueError("training.export=ema needs ema.enabled=true")
            with self.ema.average_parameters(self.accelerator.unwrap_model(self.model)):
                yield {"source": "ema", "step": state.global_step}
            return
        yield {"source": "last", "step": state.global_step}

    def _write(self, directory: Path, lora: bool) -> Path:
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)  # gathers ZeRO-3 shards (every rank must call it)
        if acc.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            model = acc.unwrap_model(self.model)
            if lora:
                save_model(model, directory, True, self.components.family, state_dict=state_dict)
            else:
                self.components.with_model(model).save_pretrained(directory, model_state_dict=state_dict)
        acc.wait_for_everyone()
        return directory
