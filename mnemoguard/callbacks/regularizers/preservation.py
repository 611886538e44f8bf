"""Baseline-output preservation: pull the live prediction towards a less-trained baseline's prediction on flagged
samples (ai-toolkit's "differential output preservation", DOP, with the base model; here any
:mod:`mnemoguard.baselines` baseline: the EMA of the weights or, for a LoRA, the base model with adapters off)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ...baselines import AdapterDisabledBaseline, Baseline, ema_baseline
from ...config.regularizers import BaselinePreservationConfig
from ..base import TrainerControl, TrainerState
from .base import Regularizer, live_eps

__all__ = ["BaselinePreservation", "BaselinePreservationConfig", "preservation_loss"]


def preservation_loss(eps_live: Tensor, eps_base: Tensor, mask: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """The preservation term added to the loss.

    .. math:: L_\\text{pres} = \\frac{\\lambda}{B} \\sum_{b:\\,\\text{mask}_b}
        \\text{mean}_{CHW}\\big(\\hat\\varepsilon_\\text{live}(x_b) - \\hat\\varepsilon_\\text{base}(x_b)\\big)^2

    over a micro-batch of ``B`` samples (``eps_*``: ``[B, ...]``, ``mask``: ``[B]`` bool), so a masked sample weighs as
    much as in the loop's ``mean_b`` loss and, with every sample masked, this is ``λ·mse(live, base)``, ai-toolkit's
    DOP term. The baseline is a fixed target (pass it detached). Returns ``(term, per-sample MSE [B])``.
    """
    if eps_live.shape != eps_base.shape:
        raise ValueError(f"live and baseline predictions must have one shape, found {tuple(eps_live.shape)} and "
                         f"{tuple(eps_base.shape)}")
    if mask.shape != eps_live.shape[:1]:
        raise ValueError(f"mask must have one entry per sample ({eps_live.shape[0]}), found shape {tuple(mask.shape)}")
    per = (eps_live.float() - eps_base.float()).pow(2).flatten(1).mean(dim=1)
    m = mask.to(device=per.device, dtype=per.dtype)
    return weight * (per * m).sum() / mask.numel(), per.detach()


class BaselinePreservation(Regularizer):
    """Adds :func:`preservation_loss` to ``inputs["extra_loss"]`` (``on_loss``).

    The baseline prediction is one extra forward under ``no_grad`` on the micro-batch, at the training inputs
    (noisy input, timestep and the conditioning the live forward used): the EMA weights through
    ``functional_call`` (:func:`mnemoguard.baselines.ema_baseline`, needs ``ema.enabled``), or the LoRA's base model
    (:class:`mnemoguard.baselines.AdapterDisabledBaseline`), or any :class:`~mnemoguard.baselines.Baseline` passed as
    ``baseline=``. Both sides are compared as noise predictions (the raw outputs for ε models, ai-toolkit's case).

    Flags: :meth:`set_flagged` (dataset indices, e.g. from a monitor) restricts the term to those training samples;
    ``None`` (default) means every sample. Metrics per step: ``reg/baseline_preservation/mse`` (mean per-sample MSE
    over the samples it ran on) and ``flagged_fraction``.
    """

    name = "baseline_preservation"
    config_class = BaselinePreservationConfig
    config: BaselinePreservationConfig

    def __init__(self, config: BaselinePreservationConfig | None = None, baseline: Baseline | str | None = None,
                 flagged: Iterable[int] | None = None, **overrides: Any) -> None:
        if isinstance(baseline, str):  # the kind ("auto" | "ema" | "adapters_disabled"): a config field
            overrides["baseline"], baseline = baseline, None
        super().__init__(config, **overrides)
        self.baseline = baseline
        self.flagged: set[int] | None = None
        self.set_flagged(flagged)

    def set_flagged(self, indices: Iterable[int] | None) -> None:
        """Restrict the term to these dataset indices (``None``: every sample)."""
        self.flagged = None if indices is None else {int(i) for i in indices}

    def flag(self, indices: Iterable[int]) -> None:
        """Add dataset indices to the flagged set (starting one if every sample was in scope)."""
        self.flagged = (self.flagged or set()) | {int(i) for i in indices}

    needs = frozenset({"prediction"})

    def _resolve(self, context: Any) -> Baseline:
        if self.baseline is not None:
            return self.baseline
        kind = self.config.baseline
        if kind == "auto":
            kind = "adapters_disabled" if context.is_lora else "ema"
        if kind == "adapters_disabled":
            if not context.is_lora:
                raise ValueError("baseline_preservation: baseline='adapters_disabled' needs a LoRA-adapted model "
                                 "(model.lora.enabled=true); found a model without adapters")
            self.baseline = AdapterDisabledBaseline(context.denoiser)
        else:
            if context.ema is None:
                raise ValueError("baseline_preservation: baseline='ema' needs an EMA of the trained weights "
                                 "(ema.enabled in a recipe, Guard(ema=...)); found none (or use a LoRA and "
                                 "baseline='adapters_disabled')")
            self.baseline = ema_baseline(context.denoiser, context.ema)
        return self.baseline

    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        super().on_train_begin(state, control, context=context, **kwargs)
        self._resolve(context)  # fail at the start, not when a policy switches it on

    def on_loss(self, state: TrainerState, control: TrainerControl, context: Any = None, inputs: dict | None = None,
                **kwargs: Any) -> None:
        if not self.active:
            return
        baseline = self._resolve(context)
        den = context.denoiser
        x_t, t, cond = inputs["noisy_model_input"], inputs["timesteps"], inputs["conditioning"]
        mask = self.eligible(inputs["levels"])
        if self.flagged is not None:
            flagged = torch.tensor([int(i) in self.flagged for i in inputs["indices"].tolist()], dtype=torch.bool)
            mask = mask & flagged.to(mask.device)
        # The baseline runs on the whole micro-batch (equal forwards on every rank, no host sync); the term keeps the
        # masked rows.
        with torch.no_grad():
            eps_base = baseline.eps(x_t, t, cond).float()
        term, per = preservation_loss(live_eps(den, inputs), eps_base, mask,
                                      self.strength * self.config.weight)
        inputs["extra_loss"] = inputs["extra_loss"] + term
        self._count(flagged=mask.sum(), samples=mask.numel(), mse_sum=(per * mask.to(per.dtype)).sum())

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        return {"mse": sums["mse_sum"] / sums["flagged"] if sums.get("flagged") else 0.0,
                "flagged_fraction": sums["flagged"] / max(sums["samples"], 1.0)}

    def extra_state(self) -> dict[str, Any]:
        return {"flagged": None if self.flagged is None else sorted(self.flagged)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.set_flagged(state.get("flagged"))


def _lora_layers(module: Any) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
