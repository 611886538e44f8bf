"""Baseline-output preservation: pull the live prediction towards a less-trained baseline's prediction on flagged
samples (ai-toolkit's "differential output preservation", DOP, with the base model; here any
:mod:`mnemoguard.baselines` baseline: the EMA of the weights or, for a LoRA, the base model with adapters off)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ...baselines import AdapterDisabledBaseline, Baseline, ema_baseline
from ..base import TrainerControl, TrainerState
from .base import Regularizer, RegularizerConfig, live_eps

__all__ = ["BaselinePreservation", "BaselinePreservationConfig", "preservation_loss"]


def preservation_loss(eps_live: Tensor, eps_base: Tensor, mask: Tensor, weight: float,
                      batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The preservation term added to the loss.

    .. math:: L_\\text{pres} = \\frac{\\lambda}{B} \\sum_{b:\\,\\text{mask}_b}
        \\text{mean}_{CHW}\\big(\\hat\\varepsilon_\\text{live}(x_b) - \\hat\\varepsilon_\\text{base}(x_b)\\big)^2

    ``eps_live`` / ``eps_base`` hold the masked samples only (``[n, ...]``, n = ``mask.sum()``) and ``B`` is the full
    micro-batch (default ``mask.numel()``), so a flagged sample weighs as much as in the trainer's ``mean_b`` loss and,
    with every sample flagged, this is ``λ·mse(live, base)``, ai-toolkit's DOP term. The baseline is a fixed target
    (pass it detached). Returns ``(term, per-sample MSE [n])``.
    """
    if eps_live.shape != eps_base.shape:
        raise ValueError(f"live and baseline predictions must have one shape, found {tuple(eps_live.shape)} and "
                         f"{tuple(eps_base.shape)}")
    n = int(mask.sum())
    if eps_live.shape[0] != n:
        raise ValueError(f"expected the {n} masked samples, found {eps_live.shape[0]}")
    B = int(batch_size if batch_size is not None else mask.numel())
    per = (eps_live.float() - eps_base.float()).pow(2).flatten(1).mean(dim=1)
    return weight * per.sum() / B, per.detach()


@dataclass
class BaselinePreservationConfig(RegularizerConfig):
    """Output preservation. ``strength`` multiplies ``weight``."""

    weight: float = 1.0  # λ of the preservation MSE (ai-toolkit's diff_output_preservation_multiplier default 1.0)
    baseline: Literal["auto", "ema", "adapters_disabled"] = "auto"  # auto: adapters_disabled for a LoRA, else ema
    forward_all: bool = False  # run the baseline on the whole micro-batch (ZeRO-3: every rank must run equal forwards)


class BaselinePreservation(Regularizer):
    """Adds :func:`preservation_loss` to ``inputs["extra_loss"]`` (``on_loss``).

    The baseline prediction is one extra forward under ``no_grad`` on the flagged samples, at the training inputs
    (noisy input, timestep and the text embeddings the live forward used): the EMA weights through
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

    def validate_config(self) -> None:
        c = self.config
        if not c.weight >= 0:
            raise ValueError(f"baseline_preservation: weight must be >= 0, found {c.weight}")
        if c.baseline not in ("auto", "ema", "adapters_disabled"):
            raise ValueError(f"baseline_preservation: baseline must be 'auto', 'ema' or 'adapters_disabled', found "
                             f"{c.baseline!r}")

    def set_flagged(self, indices: Iterable[int] | None) -> None:
        """Restrict the term to these dataset indices (``None``: every sample)."""
        self.flagged = None if indices is None else {int(i) for i in indices}

    def flag(self, indices: Iterable[int]) -> None:
        """Add dataset indices to the flagged set (starting one if every sample was in scope)."""
        self.flagged = (self.flagged or set()) | {int(i) for i in indices}

    def _resolve(self, unet: Any, components: Any, ema: Any) -> Baseline:
        if self.baseline is not None:
            return self.baseline
        den = self._denoiser(unet, components)
        kind = self.config.baseline
        is_lora = bool(_lora_layers(den.unet))
        if kind == "auto":
            kind = "adapters_disabled" if is_lora else "ema"
        if kind == "adapters_disabled":
            if not is_lora:
                raise ValueError("baseline_preservation: baseline='adapters_disabled' needs a LoRA-adapted UNet "
                                 "(model.lora.enabled=true); found a UNet without adapters")
            self.baseline = AdapterDisabledBaseline(den)
        else:
            if ema is None:
                raise ValueError("baseline_preservation: baseline='ema' needs the trainer's EMA (ema.enabled=true); "
                                 "found none (or use a LoRA and baseline='adapters_disabled')")
            self.baseline = ema_baseline(den, ema)
        return self.baseline

    def on_train_begin(self, state: TrainerState, control: TrainerControl, unet: Any = None, components: Any = None,
                       ema: Any = None, **kwargs: Any) -> None:
        super().on_train_begin(state, control, **kwargs)
        if unet is not None and components is not None:
            self._resolve(unet, components, ema)  # fail at the start, not when a policy switches it on

    def on_loss(self, state: TrainerState, control: TrainerControl, inputs: dict, unet: Any = None,
                components: Any = None, ema: Any = None, **kwargs: Any) -> None:
        if not self.active:
            return
        self._begin_micro_batch()
        baseline = self._resolve(unet, components, ema)
        den = self._denoiser(unet, components)
        x_t, t, ehs = inputs["noisy_model_input"], inputs["timesteps"], inputs["encoder_hidden_states"]
        mask = self.eligible(t)
        if self.flagged is not None:
            flagged = torch.tensor([int(i) in self.flagged for i in inputs["indices"].tolist()], dtype=torch.bool)
            mask = mask & flagged.to(mask.device)
        n = int(mask.sum())
        mse_sum = 0.0
        if n > 0 or self.config.forward_all:
            rows = torch.arange(mask.numel(), device=x_t.device) if self.config.forward_all else mask.nonzero()[:, 0]
            with torch.no_grad():
                eps_base = baseline.eps(x_t[rows], t[rows], ehs[rows]).float()
            if self.config.forward_all:
                eps_base = eps_base[mask.to(eps_base.device)]
            if n > 0:
                sel = mask.nonzero()[:, 0].to(x_t.device)
                eps_live = live_eps(den, inputs["model_pred"][sel], x_t[sel], t[sel])
                term, per = preservation_loss(eps_live, eps_base, mask, self.strength * self.config.weight)
                inputs["extra_loss"] = inputs["extra_loss"] + term
                mse_sum = float(per.sum())
        # The same keys on every rank and micro-batch (the step's sums are reduced across ranks).
        self._count(flagged=n, samples=mask.numel(), mse_sum=mse_sum)

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
