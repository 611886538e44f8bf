"""The micro-batch inputs dict of :meth:`mnemoguard.Guard.before_forward` / :meth:`~mnemoguard.Guard.loss`: checked
once, with errors that name what was expected and what was found, and moved to the device without a host sync."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import _unwrap

__all__ = ["check_forward_inputs", "check_loss_inputs", "check_parts", "float_logs", "who"]


def who(names: Sequence[str], singular: str, plural: str) -> str:
    """``"a, b and c verb"`` with the verb agreeing."""
    names = list(names)
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} {singular if len(names) == 1 else plural}"


def _rows(name: str, value: Any, batch_size: int) -> None:
    if not isinstance(value, Tensor) or value.ndim < 2 or value.shape[0] != batch_size:
        found = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"Guard.before_forward: {name} must be a tensor with one row per sample "
                         f"([{batch_size}, ...]), found {found}")


def check_forward_inputs(data: dict[str, Any], needs_captions: Sequence[str], needs_indices: Sequence[str],
                         schedule: Any = None) -> int:
    """Check (and normalise in place) the entries given to ``before_forward``; returns the batch size."""
    missing = [k for k in ("timesteps", "noisy_model_input") if data.get(k) is None]
    if data.get("encoder_hidden_states") is None and data.get("captions") is None:
        missing.append("encoder_hidden_states (or captions)")
    if missing:
        raise ValueError(f"Guard.before_forward: missing {missing}; expected the network's inputs timesteps, "
                         "noisy_model_input, encoder_hidden_states (+ pooled_projections / added_cond_kwargs for "
                         "SDXL, SD3, Flux; optional: captions, indices, model_input, noise); "
                         f"found {sorted(k for k, v in data.items() if v is not None)}")
    t = data["timesteps"]
    kind = "integer" if schedule is None or schedule.timestep_dtype == torch.long else "float (σ·T)"
    if not isinstance(t, Tensor) or t.ndim != 1 or t.dtype == torch.bool:
        found = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"Guard.before_forward: timesteps must be a [B] {kind} tensor (what the network gets), "
                         f"found {found}")
    if schedule is not None and schedule.timestep_dtype == torch.long and t.dtype.is_floating_point:
        raise ValueError(f"Guard.before_forward: a DDPM model takes integer timesteps in [0, "
                         f"{schedule.num_train_timesteps}); found a {t.dtype} tensor")
    B = t.shape[0]
    _rows("noisy_model_input", data["noisy_model_input"], B)
    captions = data.get("captions")
    if captions is not None:
        if isinstance(captions, str) or len(captions) != B or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"Guard.before_forward: captions must be a list of {B} strings (one per sample), found "
                             f"{type(captions).__name__} of length {len(captions)}")
        data["captions"] = list(captions)
    elif needs_captions:
        raise ValueError(f"Guard.before_forward: {who(needs_captions, 'edits', 'edit')} captions: expected captions= "
                         "(a list of B strings); found none")
    indices = data.get("indices")
    if indices is None:
        if needs_indices:
            raise ValueError(f"Guard.before_forward: {who(needs_indices, 'reads', 'read')} the dataset rows: expected "
                             "indices= (B integer rows of train_dataset); found none")
        data["indices"] = torch.full((B,), -1, dtype=torch.long)
    else:
        indices = torch.as_tensor(indices).reshape(-1)
        if indices.shape[0] != B or indices.dtype.is_floating_point:
            raise ValueError(f"Guard.before_forward: indices must be {B} integer dataset rows, found {indices.dtype} "
                             f"of shape {tuple(indices.shape)}")
        data["indices"] = indices.long()
    return B


def check_loss_inputs(loss_per_sample: Any, inputs: Any, needs_prediction: Sequence[str],
                      model_pred: Tensor | None = None) -> Tensor:
    """Check ``loss``'s arguments; returns the ``[B]`` per-sample losses (``[B, ...]`` averaged over the rest)."""
    if not isinstance(inputs, dict) or "weights" not in inputs or "extra_loss" not in inputs:
        found = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
        raise ValueError(f"Guard.loss: expected the dict returned by guard.before_forward(...) (with 'weights' and "
                         f"'extra_loss'); found {found}")
    per = loss_per_sample
    B = inputs["timesteps"].shape[0]
    if not isinstance(per, Tensor) or per.ndim == 0 or per.shape[0] != B:
        found = f"shape {tuple(per.shape)}" if isinstance(per, Tensor) else type(per).__name__
        raise ValueError(f"Guard.loss: expected per-sample losses of shape [{B}] (reduction='none'; a mean over the "
                         f"non-batch dims is taken for [B, ...]), found {found}")
    if per.ndim > 1:
        per = per.mean(dim=tuple(range(1, per.ndim)))
    if needs_prediction and model_pred is None and inputs.get("model_pred") is None:
        raise ValueError(f"Guard.loss: {who(needs_prediction, 'compares', 'compare')} the network's prediction: "
                         "expected model_pred=; found None")
    return per


def float_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    values: dict[str, float] = {}
    for key, value in (logs or {}).items():
        try:
            values[str(key)] = float(value.item() if isinstance(value, Tensor) else value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"Guard.step: logs[{key!r}] must be a number (or a one-element tensor), found "
                            f"{type(value).__name__}") from None
    return values


def check_parts(accelerator: Any, model: Any, noise_scheduler: Any, text_encoder: Any, tokenizer: Any,
                encode_prompt: Any, log_every: int) -> None:
    from ..family.adapters import ModelAdapter

    for name, value in (("accelerator", accelerator), ("model", model), ("noise_scheduler", noise_scheduler)):
        if value is None:
            raise ValueError(f"Guard needs {name}= (model= the UNet or transformer you train); found None")
    if not hasattr(accelerator, "unwrap_model") or not hasattr(accelerator, "sync_gradients"):
        raise TypeError(f"accelerator: expected an accelerate.Accelerator, found {type(accelerator).__name__}")
    module = model.module if isinstance(model, ModelAdapter) else model
    if not isinstance(module, nn.Module) or not hasattr(_unwrap(module), "config"):
        raise TypeError(f"model: expected a diffusers UNet or transformer (prepared or not) or a ModelAdapter, found "
                        f"{type(model).__name__}")
    if not hasattr(getattr(noise_scheduler, "config", None), "num_train_timesteps"):
        raise TypeError("noise_scheduler: expected a diffusers noise scheduler (with config.num_train_timesteps), "
                        f"found {type(noise_scheduler).__name__}")
    if int(log_every) < 0:
        raise ValueError(f"log_every must be >= 0 (0: only when a component asks), found {log_every}")
    if encode_prompt is None and (text_encoder is None) != (tokenizer is None) and text_encoder is not None:
        raise ValueError("text encoding needs both text_encoder= and tokenizer= (or an encode_prompt= callable); "
                         f"found text_encoder={type(text_encoder).__name__}, tokenizer=None")
    if encode_prompt is not None and not callable(encode_prompt):
        raise TypeError(f"encode_prompt: expected a callable list[str] -> token embeddings (or an (embeds, pooled) "
                        f"tuple), found {type(encode_prompt)}")
