"""``mnemoguard.Guard``: the training-time guard in a user's own diffusers / Accelerate training loop.

The reference :class:`~mnemoguard.trainer.Trainer` drives the guard's callbacks (:mod:`mnemoguard.callbacks`) from its
loop. :class:`Guard` is the same thing for a loop you own (diffusers' ``train_text_to_image(_lora).py`` and the
like): it builds the callbacks of a ``guard:`` section with :func:`~mnemoguard.callbacks.guard.build_guard_callbacks`,
keeps the :class:`~mnemoguard.callbacks.TrainerState` / :class:`~mnemoguard.callbacks.TrainerControl`, owns an
:class:`~mnemoguard.ema.EMAModel` when the guard needs one, and calls the hooks at the points the trainer calls
them::

    guard = Guard("guard.yaml", accelerator=accelerator, unet=unet, noise_scheduler=noise_scheduler,
                  text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, train_dataset=dataset["train"],
                  output_dir=args.output_dir)
    accelerator.register_for_checkpointing(guard)          # its state rides in save_state / load_state
    for batch in train_dataloader:
        with accelerator.accumulate(unet):
            ...                                           # latents, noise as before
            timesteps = guard.sample_timesteps(bsz, latents.device)   # noise-gap scheduling (uniform when off)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            inputs = guard.before_forward(timesteps=timesteps, noisy_model_input=noisy_latents,
                                          encoder_hidden_states=encoder_hidden_states, captions=captions)
            model_pred = unet(noisy_latents, timesteps, inputs["encoder_hidden_states"]).sample
            per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = guard.loss(per_sample, inputs, model_pred=model_pred)
            accelerator.backward(loss); optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
        if accelerator.sync_gradients:
            global_step += 1
            guard.step(global_step, logs={"train/loss": loss.item()})   # EMA, monitor, policy, early stopping
            if guard.should_stop:
                break
    guard.end()                                            # report/report.md, report/summary.json

Hook by hook this is what the trainer does (``on_train_begin`` at the first use, ``on_step_begin`` at the first
micro-batch of an optimizer step, ``on_before_forward`` / ``on_loss`` per micro-batch, ``on_step_end`` per optimizer
step, ``on_save``, ``on_train_end``), so everything the callbacks promise holds here too: the monitor measures with the
global RNG saved and restored (a guard that only monitors leaves the weights bit-identical), stops are reduced across
ranks, and the state resumes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .callbacks import Callback, CallbackList, TrainerControl, TrainerState, UniformTimestepSampler
from .callbacks.guard import GuardConfig, build_guard_callbacks
from .callbacks.monitor import MemorizationMonitor
from .callbacks.stepping import step_end_and_log, sync_stop
from .ema import EMAModel
from .prompts import PromptEncoder
from .trainer.models import SDComponents

__all__ = ["Guard", "load_guard_config"]

STATE_FORMAT = "mnemoguard.Guard/1"
#: regularizers that encode captions (the embeddings of changed captions, the empty caption)
_TEXT_REGULARIZERS = ("wen_filter", "random_caption_replacement", "random_token_addition", "caption_word_repetition",
                      "multiple_captions", "caption_dropout")
#: regularizers that edit captions: the loop must pass them
_CAPTION_REGULARIZERS = ("random_caption_replacement", "random_token_addition", "caption_word_repetition",
                         "multiple_captions", "caption_dropout")
#: regularizers that draw random tokens from the tokenizer's vocabulary
_TOKEN_REGULARIZERS = ("random_caption_replacement", "random_token_addition")
#: regularizers that need the UNet's prediction in ``on_loss``
_PREDICTION_REGULARIZERS = ("wen_filter", "baseline_preservation")
_TEXT_CACHE_BYTES = 64 * 2**20  # embeddings kept for the regularizers (the empty caption, changed captions)


def _who(names: Sequence[str], singular: str, plural: str) -> str:
    """``"a, b and c verb"`` with the verb agreeing."""
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} {singular if len(names) == 1 else plural}"


def load_guard_config(source: Any = None) -> tuple[GuardConfig, dict[str, Any] | None]:
    """``(GuardConfig, EMA settings or None)`` from a :class:`GuardConfig`, a :class:`~mnemoguard.config.RecipeConfig`,
    a mapping or a YAML path.

    A mapping (or file) is either a ``guard:`` section itself (``{monitor: ..., policy: ...}``) or a whole recipe, of
    which the ``guard:`` section and the ``ema:`` section (the EMA the guard builds) are used. ``enabled`` defaults to
    true here: handing a section to :class:`Guard` asks for a guard (``enabled: false`` still turns it off). Unknown
    keys and wrong types are errors that name the key.
    """
    from .config import EMASettings, RecipeConfig, load_dataclass, read_mapping

    if isinstance(source, GuardConfig):
        return source, None
    if isinstance(source, RecipeConfig):
        return source.guard, asdict(source.ema)
    data = dict(read_mapping(source, "guard config"))
    ema: dict[str, Any] | None = None
    recipe_keys = {f.name for f in fields(RecipeConfig)} - {f.name for f in fields(GuardConfig)}
    if recipe_keys & set(data):  # a whole recipe
        unknown = sorted(set(data) - recipe_keys)
        if unknown:
            raise ValueError(f"guard config: a recipe has the sections {sorted(recipe_keys)}; found also {unknown}")
        if data.get("ema") is not None:
            ema = asdict(load_dataclass(EMASettings, data["ema"], what="guard config (ema)"))
        data = dict(data.get("guard") or {})
    data.setdefault("enabled", True)
    return load_dataclass(GuardConfig, data, what="guard config"), ema


@dataclass
class _Components(SDComponents):
    """The model parts the callbacks read as ``components``: the reference trainer's SDComponents, plus the loop's own
    ``encode_prompt`` callable when it has one instead of a text encoder + tokenizer."""

    prompt_encoder: Callable[[list[str]], Tensor] | None = None

    @torch.no_grad()
    def encode_prompt(self, captions: list[str], device: torch.device | str | None = None) -> Tensor:
        """Per-token text embeddings ``[B, L, D]``: the loop's ``encode_prompt`` or its text encoder + tokenizer."""
        if self.prompt_encoder is None:
            return super().encode_prompt(captions, device=device)
        emb = self.prompt_encoder(list(captions))
        if not isinstance(emb, Tensor) or emb.ndim != 3 or emb.shape[0] != len(captions):
            found = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise ValueError(f"encode_prompt({len(captions)} captions) must return a [{len(captions)}, L, D] "
                             f"tensor (the UNet's encoder_hidden_states); found {found}")
        return emb if device is None else emb.to(device)


class _LoopView:
    """What the callbacks read from their ``trainer`` argument, for a loop that is not the reference Trainer.

    ``config`` is None: the callbacks fall back to their own settings (no recipe to read hyper-parameters from)."""

    config = None

    def __init__(self, guard: Guard, components: _Components, dataset: Any, output_dir: Path | None) -> None:
        self._guard = guard
        self.accelerator = guard.accelerator
        self.unet = guard.unet
        self.components = components
        self.dataset = dataset
        self.callbacks = guard.callbacks
        self.output_dir = output_dir
        self.final_dir: Path | None = None
        self.ema: EMAModel | None = None
        self.timestep_sampler: Any = UniformTimestepSampler(int(components.noise_scheduler.config.num_train_timesteps))

    def encode_captions(self, captions: list[str]) -> Tensor:
        return self._guard.encode_captions(captions)


def _as_dataset(train_dataset: Any, image_column: str, caption_column: str, resolution: int, channels: int) -> Any:
    """The user's training data as an :class:`~mnemoguard.trainer.data.ImageCaptionDataset` (the monitor's probes)."""
    import datasets

    from .config import DataConfig
    from .trainer.data import ImageCaptionDataset, load_dataset_source

    if isinstance(train_dataset, ImageCaptionDataset):
        return train_dataset
    if isinstance(train_dataset, (str, os.PathLike)):
        hf = load_dataset_source(str(train_dataset))
    elif isinstance(train_dataset, (datasets.Dataset, datasets.DatasetDict)):
        hf = load_dataset_source(train_dataset)
    elif isinstance(train_dataset, Sequence) and len(train_dataset) and not isinstance(train_dataset, str):
        images, captions = [], []
        for i, item in enumerate(train_dataset):
            if isinstance(item, Mapping) and image_column in item and caption_column in item:
                image, caption = item[image_column], item[caption_column]
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                image, caption = item
            else:
                raise TypeError(f"train_dataset[{i}]: expected an (image, caption) pair or a dict with keys "
                                f"{image_column!r} and {caption_column!r}; found {type(item).__name__}")
            images.append(image)
            captions.append(caption)
        features = datasets.Features({image_column: datasets.Image(), caption_column: datasets.Value("string")})
        hf = datasets.Dataset.from_dict({image_column: images, caption_column: captions}, features=features)
    else:
        raise TypeError("train_dataset: expected a datasets.Dataset (image and caption columns), a dataset directory "
                        f"or a list of (image, caption) pairs; found {type(train_dataset).__name__}")
    for role, name in (("image_column", image_column), ("caption_column", caption_column)):
        if name not in hf.column_names:
            raise ValueError(f"Guard: {role}={name!r} is not a column of train_dataset; its columns are "
                             f"{hf.column_names}")
    cfg = DataConfig(source="<train_dataset passed to mnemoguard.Guard>", image_column=image_column,
                     caption_column=caption_column, resolution=resolution, center_crop=True, random_flip=False)
    return ImageCaptionDataset(hf, cfg, channels)


class Guard:
    """The memorization guard for a training loop you own (see the module docstring for the loop).

    Args:
        config: the ``guard:`` section: a :class:`~mnemoguard.callbacks.guard.GuardConfig`, a mapping, a YAML path,
            or a whole recipe (see :func:`load_guard_config`; ``enabled`` defaults to true). ``None``: the defaults
            (the monitor every 100 steps with the EMA baseline, the dashboard and the report).
        accelerator: the loop's ``accelerate.Accelerator``.
        unet: the trained UNet (prepared or not; LoRA adapters included).
        noise_scheduler: the training noise scheduler (``DDPMScheduler``).
        train_dataset: the training images and captions, for the monitor's probes (rows with repeated captions
            first) and the ``multiple_captions`` regularizer: a ``datasets.Dataset`` with ``image_column`` /
            ``caption_column``, a dataset directory, or a list of ``(PIL image, caption)`` pairs. Needed when the
            monitor is on.
        encode_prompt: ``fn(list[str]) -> Tensor [B, L, D]``, the UNet's ``encoder_hidden_states`` for captions.
            Or give ``text_encoder`` and ``tokenizer`` (tokenised to ``max_length``, as diffusers' scripts do).
            Needed by the monitor and by the regularizers that change captions.
        text_encoder, tokenizer: the frozen text encoder and its tokenizer (the tokenizer also gives the random
            tokens of ``random_caption_replacement`` / ``random_token_addition``).
        vae: the VAE of a latent model (the probes are encoded with its posterior mean); None for pixel space.
        ema: an :class:`~mnemoguard.ema.EMAModel` you build and step yourself, ``True`` / ``False`` to always / never
            have the guard build one, or ``None`` (default): the guard builds and steps one when a callback needs it
            (monitor baseline ``ema`` or ``snapshot``, ``baseline_preservation`` on a full fine-tune).
        ema_kwargs: arguments of the EMA the guard builds (``lag=``, ``decay=``, ``snapshot_every=`` ...); default:
            a whole recipe's ``ema:`` section, else :class:`~mnemoguard.ema.EMAModel`'s defaults.
        output_dir: where the report goes (``<output_dir>/report/``); default: the accelerator's ``project_dir``.
        image_column, caption_column: columns of ``train_dataset``.
        resolution: the training resolution of the probes; default: the UNet's ``sample_size`` x the VAE factor.
        callbacks: more :class:`~mnemoguard.callbacks.Callback` s, run after the guard's.
        log_every: optimizer steps between ``accelerator.log`` calls of the step's logs (0: only when a callback
            asks, e.g. at the monitor's checks); the guard's metrics are always in :attr:`metrics`.
        max_steps: the planned number of optimizer steps (recorded in the state; 0 = unknown).

    Raises:
        ValueError / TypeError: naming what was expected and what was found, at construction for a missing model
            part or data, at each call for malformed inputs.
    """

    def __init__(
        self,
        config: GuardConfig | Mapping[str, Any] | str | os.PathLike | Any | None = None,
        *,
        accelerator: Any,
        unet: nn.Module,
        noise_scheduler: Any,
        train_dataset: Any = None,
        encode_prompt: Callable[[list[str]], Tensor] | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        vae: nn.Module | None = None,
        ema: EMAModel | bool | None = None,
        ema_kwargs: Mapping[str, Any] | None = None,
        output_dir: str | os.PathLike | None = None,
        image_column: str = "image",
        caption_column: str = "text",
        resolution: int | None = None,
        callbacks: Sequence[Callback] | None = None,
        log_every: int = 1,
        max_steps: int = 0,
    ) -> None:
        self.config, recipe_ema = load_guard_config(config)
        cfg = self.config
        for name, value in (("accelerator", accelerator), ("unet", unet), ("noise_scheduler", noise_scheduler)):
            if value is None:
                raise ValueError(f"Guard needs {name}=; found None")
        if not hasattr(accelerator, "unwrap_model") or not hasattr(accelerator, "sync_gradients"):
            raise TypeError(f"accelerator: expected an accelerate.Accelerator, found {type(accelerator).__name__}")
        if not hasattr(getattr(noise_scheduler, "config", None), "num_train_timesteps"):
            raise TypeError("noise_scheduler: expected a diffusers noise scheduler (with config.num_train_timesteps), "
                            f"found {type(noise_scheduler).__name__}")
        if int(log_every) < 0:
            raise ValueError(f"log_every must be >= 0 (0: only when a callback asks), found {log_every}")
        if (text_encoder is None) != (tokenizer is None) and encode_prompt is None:
            raise ValueError("text encoding needs both text_encoder= and tokenizer= (or an encode_prompt= callable); "
                             f"found text_encoder={type(text_encoder).__name__}, tokenizer={type(tokenizer).__name__}")
        if encode_prompt is not None and not callable(encode_prompt):
            raise TypeError(f"encode_prompt: expected a callable list[str] -> Tensor, found {type(encode_prompt)}")
        self.accelerator = accelerator
        self.unet = unet
        self.log_every = int(log_every)
        self.state = TrainerState(max_steps=int(max_steps))
        self.control = TrainerControl()
        self.callbacks = CallbackList([*build_guard_callbacks(cfg), *(callbacks or [])])
        self.components = _Components(unet, noise_scheduler, text_encoder, tokenizer, vae,
                                      prompt_encoder=encode_prompt)
        regs = set(cfg.regularizers) if cfg.enabled else set()
        monitoring = self.monitor is not None
        has_text = encode_prompt is not None or text_encoder is not None
        needs_text = sorted(regs & set(_TEXT_REGULARIZERS)) + (["the monitor"] if monitoring else [])
        if needs_text and not has_text:
            raise ValueError(f"{_who(needs_text, 'needs', 'need')} captions encoded: expected encode_prompt= (a "
                             "callable list[str] -> Tensor [B, L, D]) or text_encoder= and tokenizer=; found neither")
        needs_tokens = sorted(regs & set(_TOKEN_REGULARIZERS))
        if needs_tokens and tokenizer is None:
            raise ValueError(f"{_who(needs_tokens, 'draws', 'draw')} random tokens from the tokenizer: expected "
                             "tokenizer=; found None")
        self._needs_captions = sorted(regs & set(_CAPTION_REGULARIZERS))
        self._needs_prediction = sorted(regs & set(_PREDICTION_REGULARIZERS))

        dataset = None
        if train_dataset is not None:
            res = int(resolution) if resolution is not None else self.components.image_size
            dataset = _as_dataset(train_dataset, image_column, caption_column, res, self.components.image_channels)
        elif monitoring:
            raise ValueError("the memorization monitor picks its probes from the training data: expected "
                             "train_dataset= (a datasets.Dataset with image and caption columns, or a list of "
                             "(image, caption) pairs); found None. Or turn it off: monitor: {enabled: false}")
        elif "multiple_captions" in regs:
            raise ValueError("multiple_captions reads each image's captions from a column of the training data: "
                             "expected train_dataset=; found None (or add MultipleCaptions(alternatives=...) through "
                             "callbacks=)")
        out = output_dir if output_dir is not None else getattr(accelerator, "project_dir", None)
        if out is None and cfg.enabled and cfg.report.enabled:
            raise ValueError("the report is written to <output_dir>/report: expected output_dir= (or an accelerator "
                             "with a project_dir); found neither. Or turn it off: report: {enabled: false}")
        self.view = _LoopView(self, self.components, dataset, Path(out) if out is not None else None)

        if ema is not None and not isinstance(ema, (bool, EMAModel)):
            raise TypeError(f"ema: expected an EMAModel, True, False or None; found {type(ema).__name__}")
        self.ema: EMAModel | None = ema if isinstance(ema, EMAModel) else None
        self._owns_ema = False
        settings = dict(recipe_ema or {})
        recipe_on = settings.pop("enabled", True)  # a whole recipe's ema.enabled
        if isinstance(ema, EMAModel):
            self._ema_wanted = False
        elif isinstance(ema, bool):
            self._ema_wanted = ema
        else:
            self._ema_wanted = bool(recipe_on) and self._needs_ema()
        self._ema_kwargs = {**settings, **dict(ema_kwargs or {})}
        self._prompts = PromptEncoder(lambda caps: self.components.encode_prompt(caps, device=accelerator.device),
                                      device=accelerator.device, max_bytes=_TEXT_CACHE_BYTES)
        self._begun = False
        self._ended = False
        self._step_open = False
        self._last_sample: tuple[Tensor, Tensor] | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def enabled(self) -> bool:
        """Whether the ``guard:`` section is on (off: the methods keep the loop's behaviour, uniform timesteps)."""
        return bool(self.config.enabled)

    @property
    def monitor(self) -> MemorizationMonitor | None:
        """The :class:`~mnemoguard.callbacks.MemorizationMonitor` among the callbacks, if any."""
        return next((cb for cb in self.callbacks if isinstance(cb, MemorizationMonitor)), None)

    @property
    def should_stop(self) -> bool:
        """A callback (early stopping) asked to stop; the same on every rank. Sticky."""
        return self.control.should_training_stop

    @property
    def should_save(self) -> bool:
        """Early stopping found a new best at this step: save it now (:meth:`save_state`) to be able to roll back."""
        return self.control.should_save

    @property
    def stop_reason(self) -> str | None:
        return self.state.stop_reason

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def metrics(self) -> dict[str, float]:
        """The latest value of every metric (the guard's ``mem/...``, ``reg/...`` and the logs you passed)."""
        return self.state.metrics

    @property
    def timestep_sampler(self) -> Any:
        """The sampler :meth:`sample_timesteps` draws from (the noise-gap scheduler once installed)."""
        return self.view.timestep_sampler

    # ------------------------------------------------------------------------------------------------ set-up
    def _needs_ema(self) -> bool:
        cfg = self.config
        if not cfg.enabled:
            return False
        mon = self.monitor
        if mon is not None and mon.config.baseline in ("ema", "snapshot"):
            return True
        pres = cfg.regularizers.get("baseline_preservation")
        if "baseline_preservation" in cfg.regularizers:
            kind = (pres or {}).get("baseline", "auto")
            if kind == "ema" or (kind == "auto" and not getattr(self.accelerator.unwrap_model(self.unet),
                                                                "peft_config", None)):
                return True
        return False

    def _kw(self) -> dict[str, Any]:
        return {"trainer": self.view, "accelerator": self.accelerator, "unet": self.unet,
                "components": self.components, "ema": self.ema}

    def begin(self) -> None:
        """Run ``on_train_begin`` (probe choice, baselines, sampler installation); called by the first use of the
        guard, so calling it is only needed to pay that cost at a chosen moment. Idempotent."""
        if self._begun:
            return
        self._begun = True
        acc = self.accelerator
        self.state.is_world_process_zero = bool(acc.is_main_process)
        if self.ema is None and self._ema_wanted:
            self.ema = EMAModel(acc.unwrap_model(self.unet), **self._ema_kwargs)
            self._owns_ema = True
        self.view.ema = self.ema
        self.callbacks.call("on_train_begin", self.state, self.control, **self._kw())

    def _open_step(self) -> None:
        self.begin()
        if not self._step_open:
            self._step_open = True
            self.control.reset_step_flags()
            self.callbacks.call("on_step_begin", self.state, self.control, **self._kw())

    def encode_captions(self, captions: Sequence[str]) -> Tensor:
        """Text embeddings ``[B, L, D]`` on the accelerator's device, each caption encoded alone and cached
        (:class:`~mnemoguard.prompts.PromptEncoder`: an embedding never depends on the batch it came in)."""
        if self.components.prompt_encoder is None and self.components.text_encoder is None:
            raise ValueError("encoding captions needs encode_prompt= or text_encoder= and tokenizer= (given to "
                             "Guard); found neither")
        return self._prompts(list(captions))

    # ------------------------------------------------------------------------------------------------ per micro-batch
    def sample_timesteps(self, batch_size: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        """``[batch_size]`` integer timesteps from the guard's sampler: uniform (drawn exactly as
        ``torch.randint(0, T, (batch_size,))`` on the CPU) until the noise-gap scheduler biases or gaps a band. Their
        loss weights (ones unless ``noise_gap.importance > 0``) reach :meth:`before_forward` with them."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        self._open_step()
        device = device if device is not None else self.accelerator.device
        timesteps, weights = self.view.timestep_sampler(int(batch_size), device, generator=generator)
        self._last_sample = (timesteps, weights)
        return timesteps

    def before_forward(self, inputs: Mapping[str, Any] | None = None, /, **entries: Any) -> dict[str, Any]:
        """The regularizers' ``on_before_forward``: returns the micro-batch's inputs dict, possibly edited.

        Give the UNet's three inputs, ``timesteps`` ``[B]``, ``noisy_model_input`` ``[B, C, H, W]`` and
        ``encoder_hidden_states`` ``[B, L, D]`` (may be left out when ``captions`` are given: the guard encodes
        them), plus when you have them ``captions`` (list of B strings; needed by caption regularizers, and the
        per-step loss flags skip empty ones), ``indices`` (the rows in ``train_dataset``; -1 or absent: unknown),
        ``model_input`` and ``noise``. Then run the UNet on ``inputs["encoder_hidden_states"]`` (caption
        regularizers re-encode changed captions, embedding noise adds to it). ``inputs["weights"]`` are the
        per-sample loss weights :meth:`loss` applies.
        """
        data: dict[str, Any] = {**dict(inputs or {}), **entries}
        self._open_step()
        expected = ("timesteps", "noisy_model_input")
        missing = [k for k in expected if data.get(k) is None]
        if data.get("encoder_hidden_states") is None and data.get("captions") is None:
            missing.append("encoder_hidden_states (or captions)")
        if missing:
            raise ValueError(f"Guard.before_forward: missing {missing}; expected the UNet's inputs timesteps, "
                             f"noisy_model_input, encoder_hidden_states (optional: captions, indices, model_input, "
                             f"noise); found {sorted(k for k, v in data.items() if v is not None)}")
        t = data["timesteps"]
        if not isinstance(t, Tensor) or t.ndim != 1 or t.dtype.is_floating_point:
            found = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"Guard.before_forward: timesteps must be a [B] integer tensor, found {found}")
        B = t.shape[0]
        self._check_rows("noisy_model_input", data["noisy_model_input"], B)
        captions = data.get("captions")
        if captions is not None:
            if isinstance(captions, str) or len(captions) != B or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"Guard.before_forward: captions must be a list of {B} strings (one per sample), "
                                 f"found {type(captions).__name__} of length {len(captions)}")
            data["captions"] = list(captions)
        elif self._needs_captions:
            raise ValueError(f"Guard.before_forward: {_who(self._needs_captions, 'edits', 'edit')} captions: expected "
                             "captions= (a list of B strings); found none")
        if data.get("encoder_hidden_states") is None:
            data["encoder_hidden_states"] = self.components.encode_prompt(data["captions"], device=t.device)
        self._check_rows("encoder_hidden_states", data["encoder_hidden_states"], B)
        indices = data.get("indices")
        if indices is None:
            data["indices"] = torch.full((B,), -1, dtype=torch.long)
        else:
            indices = torch.as_tensor(indices).reshape(-1)
            if indices.shape[0] != B or indices.dtype.is_floating_point:
                raise ValueError(f"Guard.before_forward: indices must be {B} integer dataset rows, found "
                                 f"{indices.dtype} of shape {tuple(indices.shape)}")
            data["indices"] = indices.long().cpu()
        if data.get("weights") is None:
            data["weights"] = self._sample_weights(t)
        data.setdefault("extra_loss", torch.zeros((), device=t.device))
        self.callbacks.call("on_before_forward", self.state, self.control, inputs=data, **self._kw())
        return data

    def _sample_weights(self, t: Tensor) -> Tensor:
        """The loss weights drawn with these timesteps by :meth:`sample_timesteps` (ones for timesteps from
        elsewhere; a warning when the sampler re-weights)."""
        last = self._last_sample
        if last is not None and (last[0] is t or (last[0].shape == t.shape and torch.equal(last[0].to(t.device), t))):
            return last[1].float().to(t.device)
        sampler = self.view.timestep_sampler
        if getattr(getattr(sampler, "config", None), "importance", 0.0) and "weights" not in self._warned:
            self._warned.add("weights")
            warnings.warn("Guard.before_forward: these timesteps were not drawn by guard.sample_timesteps, so the "
                          "noise-gap importance weights are not applied (weights are ones)", RuntimeWarning,
                          stacklevel=3)
        return torch.ones(t.shape[0], device=t.device)

    @staticmethod
    def _check_rows(name: str, value: Any, batch_size: int) -> None:
        if not isinstance(value, Tensor) or value.ndim < 2 or value.shape[0] != batch_size:
            found = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"Guard.before_forward: {name} must be a tensor with one row per sample "
                             f"([{batch_size}, ...]), found {found}")

    def loss(self, loss_per_sample: Tensor, inputs: dict[str, Any], *, model_pred: Tensor | None = None,
             target: Tensor | None = None) -> Tensor:
        """The regularizers' ``on_loss``, then the micro-batch loss ``mean(weights · loss_per_sample) + extra_loss``.

        Args:
            loss_per_sample: ``[B]`` per-sample losses (``F.mse_loss(..., reduction="none").mean(dim=(1, 2, 3))``,
                Min-SNR weights folded in); ``[B, ...]`` is averaged over the non-batch dims.
            inputs: the dict :meth:`before_forward` returned.
            model_pred: the UNet's output; needed by ``wen_filter`` and ``baseline_preservation``.
            target: the training target (kept in ``inputs`` for custom callbacks).
        """
        if not isinstance(inputs, dict) or "weights" not in inputs or "extra_loss" not in inputs:
            found = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"Guard.loss: expected the dict returned by guard.before_forward(...) (with 'weights' "
                             f"and 'extra_loss'); found {found}")
        per = loss_per_sample
        B = inputs["timesteps"].shape[0]
        if not isinstance(per, Tensor) or per.ndim == 0 or per.shape[0] != B:
            found = f"shape {tuple(per.shape)}" if isinstance(per, Tensor) else type(per).__name__
            raise ValueError(f"Guard.loss: expected per-sample losses of shape [{B}] (reduction='none', then a mean "
                             f"over the non-batch dims), found {found}")
        if per.ndim > 1:
            per = per.mean(dim=tuple(range(1, per.ndim)))
        if model_pred is not None:
            inputs["model_pred"] = model_pred
        if target is not None:
            inputs["target"] = target
        if self._needs_prediction and inputs.get("model_pred") is None:
            who = _who(self._needs_prediction, "compares", "compare")
            raise ValueError(f"Guard.loss: {who} the UNet's prediction: expected model_pred=; found None")
        inputs["loss_per_sample"] = per
        self.callbacks.call("on_loss", self.state, self.control, inputs=inputs, **self._kw())
        self.state.micro_step += 1
        return (inputs["loss_per_sample"] * inputs["weights"]).mean() + inputs["extra_loss"]

    # ------------------------------------------------------------------------------------------------ per step
    def step(self, global_step: int | None = None, logs: Mapping[str, Any] | None = None, *,
             epoch: int | None = None) -> dict[str, float] | None:
        """After the optimizer step: EMA update, then ``on_step_end`` (monitor checks, policy, early stopping,
        dashboard), logging and the cross-rank stop. A no-op returning None between gradient-accumulation
        micro-batches (``accelerator.sync_gradients`` false), so it may be called after every micro-batch.

        Args:
            global_step: the optimizer step just taken (default: the last one + 1); must grow.
            logs: your scalars for this step (``{"train/loss": ...}``): the guard's metrics are added to them, the
                whole dict goes to ``accelerator.log`` every ``log_every`` steps and whenever a callback asks (a
                check), and callbacks (early stopping on ``train/loss``, a policy) see them.
            epoch: recorded in the state.

        Returns:
            the step's logs (yours and the guard's), or None on a micro-batch that was not an optimizer step.
        """
        acc = self.accelerator
        if not acc.sync_gradients:
            return None
        self._open_step()
        step = self.state.global_step + 1 if global_step is None else int(global_step)
        if step <= self.state.global_step:
            raise ValueError(f"Guard.step: global_step must grow; found {step} after {self.state.global_step}")
        state = self.state
        state.global_step = step
        if epoch is not None:
            state.epoch = int(epoch)
        if self._owns_ema:
            self.ema.step(acc.unwrap_model(self.unet))
        values: dict[str, float] = {}
        for key, value in (logs or {}).items():
            try:
                values[str(key)] = float(value.item() if isinstance(value, Tensor) else value)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"Guard.step: logs[{key!r}] must be a number (or a one-element tensor), found "
                                f"{type(value).__name__}") from None
        if (self.log_every and step % self.log_every == 0) or step == state.max_steps:
            self.control.should_log = True
        step_end_and_log(self.callbacks, state, self.control, values, **self._kw())
        sync_stop(state, self.control, acc)  # every rank must call step() at every optimizer step
        self._step_open = False
        return values

    def save_state(self, output_dir: str | os.PathLike, **kwargs: Any) -> Path:
        """``accelerator.save_state(output_dir, **kwargs)`` with the guard's bookkeeping: the directory is recorded
        as ``state.best_checkpoint`` when early stopping just found a new best (before saving, so the checkpoint
        knows it), then the callbacks' ``on_save`` run. Register the guard first
        (``accelerator.register_for_checkpointing(guard)``) for its state to be in the checkpoint."""
        path = Path(output_dir)
        if self.state.best_step is not None and self.state.best_step == self.state.global_step:
            self.state.best_checkpoint = str(path)
        self.accelerator.save_state(str(path), **kwargs)
        self.callbacks.call("on_save", self.state, self.control, checkpoint=path, **self._kw())
        return path

    def end(self, final_dir: str | os.PathLike | None = None) -> TrainerState:
        """``on_train_end``: the report (``<output_dir>/report/report.md``, ``summary.json``; with ``final_dir``, the
        exported ``*.safetensors`` there are stamped with ``mnemoguard_*`` metadata) and the dashboard's hparams.
        Call it once, after the loop (and after exporting, for the stamp). Returns the :class:`TrainerState`."""
        if self._ended:
            raise RuntimeError("Guard.end() was already called")
        if not self._begun:
            warnings.warn("Guard.end(): the guard was never used (no step taken); nothing to report",
                          RuntimeWarning, stacklevel=2)
            return self.state
        self._ended = True
        self.view.final_dir = Path(final_dir) if final_dir is not None else None
        self.callbacks.call("on_train_end", self.state, self.control, **self._kw())
        return self.state

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters and curves (:class:`TrainerState`), every callback's state, and the EMA the guard owns."""
        return {
            "format": STATE_FORMAT,
            "trainer_state": self.state.state_dict(),
            "callbacks": self.callbacks.state_dict(),
            "ema": self.ema.state_dict() if self._owns_ema and self.ema is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (``accelerator.load_state`` calls it for a registered guard). Runs
        :meth:`begin` first, as the trainer restores after ``on_train_begin``. A stop recorded in the checkpoint is
        cleared: resuming is a decision to go on."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"Guard.load_state_dict: expected a Guard.state_dict() (format {STATE_FORMAT!r}), "
                             f"found {found!r}")
        self.begin()
        self.state.load_state_dict(dict(state["trainer_state"]))
        self.callbacks.load_state_dict(dict(state["callbacks"]))
        if state.get("ema") is not None:
            if self._owns_ema:
                self.ema.load_state_dict(state["ema"])
            else:
                warnings.warn("Guard.load_state_dict: the checkpoint holds the EMA the guard built, but this guard "
                              "uses none of its own (ema= given or not needed); it is not restored", RuntimeWarning,
                              stacklevel=2)
        self.state.stop_reason = None
        self.control.should_training_stop = False
        self._step_open = False

    def __repr__(self) -> str:
        names = [type(cb).__name__ for cb in self.callbacks]
        return f"Guard(enabled={self.enabled}, step={self.state.global_step}, callbacks={names})"
