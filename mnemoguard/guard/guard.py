"""``mnemoguard.Guard``: the training-time guard, the one driver of its components, in any Accelerate loop.

A user's diffusers script and the reference trainer call the same five methods (README, "Plug into an existing
diffusers training script"; SD 1.x/2.x, SDXL, SD3/3.5, Flux)::

    guard = Guard(cfg, accelerator=accelerator, model=unet, noise_scheduler=noise_scheduler, optimizer=optimizer,
                  text_encoder=text_encoder, tokenizer=tokenizer, train_dataset=dataset["train"], ...)
    # per micro-batch
    timesteps = guard.sample_timesteps(bsz, latents.device)
    inputs = guard.before_forward(timesteps=timesteps, noisy_model_input=noisy, encoder_hidden_states=ehs, ...)
    loss = guard.loss(per_sample_mse, inputs, model_pred=model_pred)
    # per optimizer step
    guard.step(global_step)
    # after the loop (and the export)
    guard.end(final_dir=...)

Hook by hook (:mod:`mnemoguard.callbacks.base`): ``on_train_begin`` at the first use, ``on_step_begin`` at the first
micro-batch of an optimizer step, ``on_before_forward`` / ``on_loss`` per micro-batch, ``on_step_end`` per optimizer
step, ``on_save`` inside ``accelerator.save_state``, ``on_train_end`` in :meth:`Guard.end`. The guard's state (the
run's counters and curves, every component's state, its EMA) rides in ``accelerator.save_state`` / ``load_state``
through accelerate's state hooks, as JSON + safetensors (:mod:`mnemoguard.guard.run_state`).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..callbacks.bands import resolve_bands
from ..callbacks.base import Callback, CallbackList, TrainerControl, TrainerState
from ..callbacks.timesteps import DensitySampler, TimestepSlot
from ..denoiser import Denoiser, _unwrap
from ..devices import to_device
from ..ema import as_ema_weights
from ..family.adapters import ModelAdapter, model_adapter
from ..family.conditioning import Conditioning
from ..family.density import TimestepDensity
from ..family.latents import LatentCodec
from .build import (
    adapter_kwargs,
    build_components,
    check_needs,
    check_not_resumed,
    hparams_of,
    load_guard_config,
    make_dataset,
    make_ema,
    make_prompts,
)
from .context import GuardContext
from .ending import every_rank, exported_weights
from .inputs import check_forward_inputs, check_loss_inputs, check_parts, float_logs, who
from .run_state import RunStateHooks
from .stopping import nonfinite_step, sync_stop
from .totals import StepTotals
from .veto import register_step_veto

logger = logging.getLogger("mnemoguard")

__all__ = ["Guard"]

class Guard:
    """The memorization guard for an Accelerate training loop (module docstring; README for the whole snippet).

    Build it after ``accelerator.prepare(...)`` and the dataset, and before ``accelerator.load_state`` (it registers
    accelerate state hooks, so its state is saved and restored with every checkpoint; built after a
    ``load_state`` it raises).

    Args:
        config: the ``guard:`` section: a :class:`~mnemoguard.config.GuardConfig`, a mapping, a YAML path, or a whole
            recipe (its ``guard:`` and ``ema:`` sections); ``enabled`` defaults to true. ``None``: the defaults.
        accelerator, noise_scheduler: the loop's (a DDPM-family scheduler or ``FlowMatchEulerDiscreteScheduler``: for
            flow matching the copy the loop draws its training timesteps from).
        model: the trained network, prepared or not, LoRA adapters included: ``UNet2DConditionModel`` (SD 1.x/2.x,
            SDXL), ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, or a
            :class:`~mnemoguard.family.adapters.ModelAdapter` for anything else (or a Flux guidance value other than
            3.5: ``FluxAdapter(transformer, guidance_scale=...)``). ``unet=`` is its older name.
        optimizer: the loop's optimizer: a step where a filter dropped every sample (on every rank) is then skipped
            (weights and Adam's moments untouched). Recommended whenever a regularizer drops samples.
        train_dataset: the training data (probes, caption columns): a ``datasets.Dataset`` with ``image_column`` /
            ``caption_column`` (a transform set with ``with_transform`` is fine), a dataset directory, or a list of
            ``(image, caption)`` pairs. Needed by the monitor.
        text_encoder, tokenizer: the frozen text encoder and its tokenizer, for one-encoder models; or
            ``encode_prompt=fn(list[str])`` returning token embeddings ``[B, L, D]`` or ``(prompt_embeds,
            pooled_prompt_embeds[, text_ids])`` (diffusers' SDXL / SD3 / Flux ``encode_prompt`` with its encoders
            bound); needed by the monitor and by regularizers that change captions.
        vae: the VAE of a latent model (None in pixel space); its ``scaling_factor`` and ``shift_factor`` are used.
        ema: the EMA baseline: your EMA (a diffusers ``EMAModel`` from ``--use_ema``, or
            :class:`~mnemoguard.ema.EMAModel`; you step and save it), ``True`` / ``False`` (the guard builds, steps
            and saves one / never), or ``None``: the guard builds one when a component needs it.
        ema_kwargs: arguments of the EMA the guard builds (``lag=``, ``decay=``, ``snapshot_every=`` ...).
        output_dir: where the report goes; default: the accelerator's ``project_dir``.
        heldout: held-out samples for the monitor (instead of ``monitor.heldout_data``).
        resolution: the training resolution in pixels; default: the model's ``sample_size`` x the VAE factor (Flux's
            config has none: give ``args.resolution``).
        weighting_scheme, logit_mean, logit_std, mode_scale: how a flow-matching loop draws its timesteps
            (diffusers' ``compute_density_for_timestep_sampling`` arguments; default ``none``: uniform). The guard
            draws exactly as the loop would, and the noise gap is applied on top of this density.
        callbacks: more :class:`~mnemoguard.callbacks.Callback` s (run after the monitor, before the policy, early
            stopping, dashboard and report: they see the monitor's values and feed the consumers).
        log_every: optimizer steps between ``accelerator.log`` calls (0: only when a component asks, at checks).
        max_steps: the planned number of optimizer steps (the report's "N / max_steps").
        hparams: the run's settings for the dashboard's hparams (e.g. ``vars(args)``).

    Raises:
        ValueError / TypeError / :class:`~mnemoguard.config.ConfigError`: naming what was expected and what was found,
        at construction for a missing model part or data, at each call for malformed inputs.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        accelerator: Any,
        model: nn.Module | ModelAdapter | None = None,
        unet: nn.Module | None = None,
        noise_scheduler: Any,
        optimizer: Any = None,
        train_dataset: Any = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        encode_prompt: Callable[[list[str]], Any] | None = None,
        vae: nn.Module | None = None,
        ema: Any = None,
        ema_kwargs: Mapping[str, Any] | None = None,
        output_dir: str | os.PathLike | None = None,
        heldout: Any = None,
        image_column: str = "image",
        caption_column: str = "text",
        resolution: int | None = None,
        weighting_scheme: str | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        callbacks: Sequence[Callback] | None = None,
        log_every: int = 1,
        max_steps: int = 0,
        hparams: Mapping[str, Any] | None = None,
    ) -> None:
        if model is not None and unet is not None:
            raise ValueError("Guard: give the trained network once, as model= (unet= is its older name); found both")
        model = model if model is not None else unet
        self.config, recipe_ema = load_guard_config(config, heldout_given=heldout is not None)
        check_parts(accelerator, model, noise_scheduler, text_encoder, tokenizer, encode_prompt, log_every)
        check_not_resumed(accelerator)
        self.accelerator, self.log_every = accelerator, int(log_every)
        self.state = TrainerState(max_steps=int(max_steps))
        self.control = TrainerControl()
        self.components = build_components(self.config, callbacks or [], heldout=heldout)
        self.callbacks = CallbackList(self.components.ordered())
        codec = LatentCodec(vae)
        adapter = model_adapter(model, **adapter_kwargs(model, resolution, codec))
        self.model = adapter.module  # as the loop holds it
        module = _unwrap(self.model)
        denoiser = Denoiser(adapter.with_module(module), noise_scheduler)
        density = TimestepDensity(weighting_scheme or "none", logit_mean, logit_std, mode_scale)
        density.check(denoiser.schedule)
        prompts = make_prompts(accelerator, text_encoder, tokenizer, encode_prompt)
        dataset = None
        if train_dataset is not None:
            dataset = make_dataset(train_dataset, denoiser.adapter, codec, image_column, caption_column, resolution)
        out = output_dir if output_dir is not None else getattr(accelerator, "project_dir", None)
        self.context = GuardContext(
            accelerator=accelerator, model=self.model, denoiser=denoiser,
            timesteps=TimestepSlot(DensitySampler(denoiser.schedule, density)),
            bands=resolve_bands(self.config.monitor, denoiser.schedule), codec=codec, density=density,
            prompts=prompts, tokenizer=tokenizer, dataset=dataset,
            output_dir=Path(out) if out is not None else None, hparams=hparams_of(hparams),
        )
        self.ema, self._owns_ema = make_ema(ema, ema_kwargs, recipe_ema, module, self.callbacks)
        self.context.ema = None if self.ema is None else as_ema_weights(self.ema, module)
        self._per_call = check_needs(self.callbacks, self.context)
        if self.config.enabled and self.config.report.enabled and self.context.output_dir is None:
            raise ValueError("the report is written to <output_dir>/report: expected output_dir= (or an accelerator "
                             "with a project_dir); found neither. Or turn it off: report: {enabled: false}")
        self._drops = [cb.state_key for cb in self.callbacks if getattr(cb, "drops_samples", False)]
        self.totals = StepTotals(accelerator, count_kept=bool(self._drops))
        self._nonfinite_run = 0
        self._optimizer_hook = register_step_veto(optimizer, self.totals.veto) if optimizer else None
        if self._drops and optimizer is None:
            warnings.warn(f"Guard: {who(self._drops, 'drops', 'drop')} samples; pass optimizer= so that a step where "
                          "every sample was dropped is skipped (otherwise Adam's momentum still moves the weights)",
                          RuntimeWarning, stacklevel=2)
        self.run_state = RunStateHooks(self)
        self.seconds = 0.0  # wall time inside the guard's methods
        self._begun = self._ended = self._step_open = False
        self._last_sample: tuple[Tensor, Tensor] | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def enabled(self) -> bool:
        """Whether the ``guard:`` section is on (off: the methods keep the loop's behaviour, uniform timesteps)."""
        return bool(self.config.enabled)

    @property
    def monitor(self) -> Any:
        return self.components.monitor

    @property
    def policy(self) -> Any:
        return self.components.policy

    @property
    def should_stop(self) -> bool:
        """A component asked to stop (the same on every rank; sticky): leave the inner *and* the outer loop."""
        return self.control.should_training_stop

    @property
    def should_save(self) -> bool:
        """Save a checkpoint now: early stopping found a new best (the rollback target), or the run stops here."""
        return self.control.should_save

    @property
    def stop_reason(self) -> str | None:
        return self.state.stop_reason

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def metrics(self) -> dict[str, float]:
        """The latest value of every metric (the guard's ``mem/...``, ``reg/...``, ``train/loss`` and yours)."""
        return self.state.metrics

    def _kw(self) -> dict[str, Any]:
        return {"context": self.context}

    def begin(self) -> None:
        """``on_train_begin`` (probe choice, baselines, sampler installation); runs at the first use, so calling it
        is only needed to pay that cost at a chosen moment. Idempotent."""
        if self._begun:
            return
        self._begun = True
        self.state.is_world_process_zero = bool(self.accelerator.is_main_process)
        self.callbacks.call("on_train_begin", self.state, self.control, **self._kw())

    def _open_step(self) -> None:
        self.begin()
        if not self._step_open:
            self._step_open = True
            self.control.reset_step_flags()
            self.callbacks.call("on_step_begin", self.state, self.control, **self._kw())

    def encode_captions(self, captions: Sequence[str]) -> Conditioning:
        """The captions' conditioning (token and pooled embeddings) from the guard's prompt encoder (each caption
        encoded alone, cached)."""
        if self.context.prompts is None:
            raise ValueError("encoding captions needs encode_prompt= or text_encoder= and tokenizer= (given to "
                             "Guard); found neither")
        return self.context.prompts(list(captions))

    # ------------------------------------------------------------------------------------------------ per micro-batch
    def sample_timesteps(self, batch_size: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        """``[batch_size]`` timesteps as the network takes them, from the run's sampler: the loop's own draw (DDPM:
        exactly ``torch.randint(0, T, (batch_size,))`` on the CPU; flow matching: diffusers' ``weighting_scheme``
        draw and ``noise_scheduler.timesteps[i]``) until the noise gap biases or gaps a band. Their loss weights
        (ones unless ``noise_gap.importance > 0``) reach :meth:`before_forward` with them."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        self._open_step()
        device = device if device is not None else self.accelerator.device
        timesteps, weights = self.context.timesteps.sampler(int(batch_size), device, generator=generator)
        self._last_sample = (timesteps, weights)
        return timesteps

    def before_forward(self, inputs: Mapping[str, Any] | None = None, /, **entries: Any) -> dict[str, Any]:
        """The regularizers' ``on_before_forward``: returns the micro-batch's inputs dict, possibly edited.

        Give the network's inputs ``timesteps`` ``[B]``, ``noisy_model_input`` ``[B, C, H, W]`` (Flux: before
        packing), ``encoder_hidden_states`` ``[B, L, D]`` and the family's pooled embeddings (``pooled_projections``
        for SD3 / Flux, ``added_cond_kwargs`` for SDXL); the conditioning may be left out when ``captions`` are given
        (the guard encodes them). Plus, when you have them, ``captions`` (B strings: needed by caption regularizers;
        the loss flags leave out empty ones), ``indices`` (the rows of ``train_dataset``: the report then names
        flagged samples), ``model_input`` and ``noise``. Call the network with the returned
        ``inputs["encoder_hidden_states"]`` (and ``pooled_projections`` / ``added_cond_kwargs``).
        """
        start = time.perf_counter()
        data: dict[str, Any] = {**dict(inputs or {}), **entries}
        self._open_step()
        adapter, schedule = self.context.denoiser.adapter, self.context.schedule
        check_forward_inputs(data, self._per_call["captions"], self._per_call["indices"], schedule)
        t = data["timesteps"]
        if data.get("encoder_hidden_states") is None:
            adapter.conditioning_into(data, self.encode_captions(data["captions"]).to(t.device))
        try:
            cond = adapter.conditioning_from(data)
        except ValueError as err:
            raise ValueError(f"Guard.before_forward: {err}") from None
        if len(cond) != t.shape[0]:
            raise ValueError(f"Guard.before_forward: encoder_hidden_states must have {t.shape[0]} rows, found shape "
                             f"{tuple(cond.embeds.shape)}")
        data["conditioning"] = cond
        data["levels"] = schedule.levels_of(t)
        data["indices"] = to_device(data["indices"], t.device)
        if data.get("weights") is None:
            data["weights"] = self._sample_weights(t)
        data.setdefault("extra_loss", torch.zeros((), device=t.device))
        self.callbacks.call("on_before_forward", self.state, self.control, inputs=data, **self._kw())
        if data["conditioning"] is not cond:  # a regularizer edited it: the loop's keywords carry the edit
            adapter.conditioning_into(data, data["conditioning"])
        self.seconds += time.perf_counter() - start
        return data

    def _sample_weights(self, t: Tensor) -> Tensor:
        """The loss weights drawn with these timesteps by :meth:`sample_timesteps` (ones for timesteps drawn
        elsewhere; a warning when the sampler re-weights)."""
        last = self._last_sample
        if last is not None and last[0] is t:
            return last[1].float()
        importance = getattr(getattr(self.context.timesteps.sampler, "config", None), "importance", 0.0)
        if importance and "weights" not in self._warned:
            self._warned.add("weights")
            warnings.warn("Guard.before_forward: these timesteps were not drawn by guard.sample_timesteps, so the "
                          "noise-gap importance weights are not applied (weights are ones)", RuntimeWarning,
                          stacklevel=3)
        return torch.ones(t.shape[0], device=t.device)

    def loss(self, loss_per_sample: Tensor, inputs: dict[str, Any], *, model_pred: Tensor | None = None,
             target: Tensor | None = None, prediction_type: str | None = None) -> Tensor:
        """The components' ``on_loss`` (low-loss flags, sample filters, preservation term), then the micro-batch loss
        ``mean(weights · loss_per_sample) + extra_loss`` to backpropagate.

        Args:
            loss_per_sample: ``[B]`` per-sample losses (``F.mse_loss(..., reduction="none")``, Min-SNR or the flow
                weighting folded in); ``[B, ...]`` is averaged over the non-batch dims.
            inputs: the dict :meth:`before_forward` returned.
            model_pred: the network's output in the layout of ``noisy_model_input`` (Flux: unpacked), needed by
                ``wen_filter`` and ``baseline_preservation``.
            target: the training target (kept in ``inputs`` for your callbacks).
            prediction_type: what ``model_pred`` is when it is not the network's own output: ``"sample"`` for SD3's
                ``--precondition_outputs`` (``model_pred * (-sigmas) + noisy_model_input``, an x̂₀).
        """
        start = time.perf_counter()
        per = check_loss_inputs(loss_per_sample, inputs, self._per_call["prediction"], model_pred)
        if prediction_type is not None:
            from ..parameterisation import _check_prediction_type

            _check_prediction_type(prediction_type)
            inputs["model_pred_type"] = prediction_type
        if model_pred is not None:
            inputs["model_pred"] = model_pred
        if target is not None:
            inputs["target"] = target
        inputs["loss_per_sample"] = per
        self.callbacks.call("on_loss", self.state, self.control, inputs=inputs, **self._kw())
        self.state.micro_step += 1
        loss = (inputs["loss_per_sample"] * inputs["weights"]).mean() + inputs["extra_loss"]
        self.totals.add(loss, inputs["weights"])
        self.seconds += time.perf_counter() - start
        return loss

    # ------------------------------------------------------------------------------------------------ per step
    def step(self, global_step: int | None = None, logs: Mapping[str, Any] | None = None, *,
             epoch: int | None = None) -> dict[str, float] | None:
        """After the optimizer step: EMA update, ``on_step_end`` (checks, policy, early stopping, dashboard), logging
        (``train/loss``: the mean of this step's :meth:`loss` values over micro-batches and ranks, plus your
        ``logs``) and the cross-rank stop. A no-op returning None between accumulation micro-batches
        (``accelerator.sync_gradients`` false), so it may be called after every micro-batch.

        Args:
            global_step: the optimizer step just taken (default: the last one + 1); must grow.
            logs: your scalars for this step (``{"train/lr": ...}``), logged with the guard's every ``log_every``
                steps and whenever a component asks (a check).
            epoch: recorded in the state.

        Returns:
            the step's logs, or None on a micro-batch that was not an optimizer step.
        """
        acc = self.accelerator
        if not acc.sync_gradients:
            return None
        start = time.perf_counter()
        self._open_step()
        state = self.state
        step = state.global_step + 1 if global_step is None else int(global_step)
        if step <= state.global_step:
            raise ValueError(f"Guard.step: global_step must grow; found {step} after {state.global_step}")
        state.global_step = step
        if epoch is not None:
            state.epoch = int(epoch)
        nonfinite = self.totals.step_nonfinite()
        self._nonfinite_run = self._nonfinite_run + 1 if nonfinite else 0
        if nonfinite:
            nonfinite_step(state, self.control, step, self._nonfinite_run, self.config.non_finite.max_skipped_steps,
                           skipped=self._optimizer_hook is not None)
        if self._owns_ema and not nonfinite:
            self.ema.step(_unwrap(self.model))
        values = float_logs(logs)
        if (self.log_every and step % self.log_every == 0) or step == state.max_steps or nonfinite:
            self.control.should_log = True
            values.update(self.totals.train_loss())
        state.update_metrics(values)
        self.callbacks.call("on_step_end", state, self.control, logs=values, **self._kw())
        if self.control.should_log and values:
            if "train/loss" not in values:
                values.update(self.totals.train_loss())
                state.update_metrics(values)
            state.log(values)
            acc.log({k: float(v) for k, v in values.items()}, step=step)
        sync_stop(acc, state, self.control)
        self.totals.reset()
        self._step_open = False
        self.seconds += time.perf_counter() - start
        return values

    def note_checkpoint(self, path: str | os.PathLike) -> None:
        """Tell the guard where the checkpoint being saved next will finally live (when the loop writes it to a
        temporary folder first, as the reference trainer does); the best checkpoint is recorded under that name."""
        self.run_state.pending_path = Path(path)

    def end(self, final_dir: str | os.PathLike | None = None, exported: str | Mapping[str, Any] | None = None,
            error: BaseException | str | None = None) -> TrainerState:
        """``on_train_end``: a last monitor check of the exported weights, the report (``<output_dir>/report/``; with
        ``final_dir``, the exported ``*.safetensors`` there get the ``mnemoguard_*`` metadata) and the dashboard's
        hparams. Call it once, after the loop and the export, **on every process** (the last check is split across
        them).

        Args:
            final_dir: where the exported weights are.
            exported: what was exported: ``"last"`` (default: the weights the model holds now), ``"ema"`` (the EMA's:
                diffusers' ``--use_ema`` export; measured from the EMA itself on every rank, whatever the model
                holds) or ``"best"`` (the model holds the best checkpoint's weights), or ``{"source": ..., "step":
                N}``.
            error: the run failed (the report says so).
        """
        if self._ended:
            raise RuntimeError("Guard.end() was already called")
        if not self._begun:
            warnings.warn("Guard.end(): the guard was never used (no step taken); nothing to report", RuntimeWarning,
                          stacklevel=2)
            return self.state
        self._ended = True
        self.context.final_dir = Path(final_dir) if final_dir is not None else None
        self.context.exported = exported_weights(exported, self.state.global_step, self.context.ema)
        self.context.error = None if error is None else f"{type(error).__name__}: {error}" \
            if isinstance(error, BaseException) else str(error)
        logs: dict[str, float] = {}
        with every_rank("Guard.end()", self.context.num_processes):
            self.callbacks.call("on_train_end", self.state, self.control, logs=logs, **self._kw())
        if logs:
            self.state.log(logs)
            self.accelerator.log({k: float(v) for k, v in logs.items()}, step=self.state.global_step)
        return self.state

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The run state (counters and curves, every component's state, the guard's own EMA); see
        :mod:`mnemoguard.guard.run_state`."""
        return self.run_state.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; components added since start fresh, removed ones are reported (the log)."""
        self.run_state.load_state_dict(state)

    def __repr__(self) -> str:
        names = [cb.state_key for cb in self.callbacks]
        return f"Guard(enabled={self.enabled}, step={self.state.global_step}, components={names})"
