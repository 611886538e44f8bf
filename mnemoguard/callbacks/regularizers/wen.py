"""Wen et al.'s training-time filter (ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion
Models", ``train_text_to_image.py --hard_threshold``): drop the samples whose text-conditional gap is large."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...config.regularizers import WenFilterConfig
from ...signals.score_gap import wen_training_filter
from ..base import TrainerControl, TrainerState
from .base import Regularizer, drop_samples, live_eps

__all__ = ["WenFilter", "WenFilterConfig", "wen_filter_weights", "wen_threshold"]


def wen_threshold(threshold: float, strength: float = 1.0, numel: int | None = None,
                  reference_dim: int | None = None) -> float:
    """The effective threshold: ``τ / strength``, times ``√(numel / reference_dim)`` when a reference size is given
    (``inf`` for strength 0: nothing is dropped)."""
    if strength <= 0:
        return math.inf
    tau = threshold / strength
    if reference_dim is not None:
        if numel is None:
            raise ValueError("reference_dim needs numel (values per sample)")
        tau *= math.sqrt(numel / reference_dim)
    return tau


def wen_filter_weights(
    weights: Tensor, eps_cond: Tensor, eps_uncond: Tensor, threshold: float, eligible: Tensor | None = None,
    renormalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Wen et al.'s keep rule applied to per-sample loss weights.

    .. math::

        m_b = \\lVert \\varepsilon_\\theta(x_{t_b}, t_b, c_b) - \\varepsilon_\\theta(x_{t_b}, t_b, \\varnothing)
        \\rVert_2, \\qquad k_b = m_b < \\tau, \\qquad w'_b = \\text{drop\\_samples}(w, k)_b

    at the training noisy input and training timestep of each sample (the L2 over the whole sample; τ = 2 for
    SD 1.4's 4×64×64 latents). Samples outside ``eligible`` are kept whatever their gap. With ``renormalize`` the
    trainer's loss is the mean over the kept samples, as ``mse(model_pred[keep], target[keep])`` in the authors' code.
    Returns ``(weights', keep [B] bool, gap [B])``.
    """
    gap, keep = wen_training_filter(eps_cond, eps_uncond, threshold)
    if eligible is not None:
        keep = keep | ~eligible.to(keep.device)
    return drop_samples(weights, keep.to(weights.device), renormalize), keep, gap


class WenFilter(Regularizer):
    """Wen et al.'s training-time filter as a switchable callback (``on_loss``).

    Per micro-batch, one extra *unconditional* forward of the live network under ``no_grad``, batched over the whole
    micro-batch (the empty caption's conditioning from the guard's prompt encoder), at the training noisy inputs and
    timesteps; the gap between the training prediction (as ε, so v-prediction and flow models are compared in ε space;
    for ε models this is the authors' ``model_pred − eps_u``) and that unconditional ε. Samples with gap ≥ τ/strength
    get weight 0 (:func:`wen_filter_weights`). Min-SNR weights are part of ``loss_per_sample``, so they are masked with
    the sample (the authors' script forgets this). An optimizer step where nothing was kept is skipped by the Guard
    (the authors skip the step).

    Metrics (since the last log): ``reg/wen_filter/kept_fraction`` (kept / eligible samples) and ``gap_mean``.
    """

    name = "wen_filter"
    config_class = WenFilterConfig
    config: WenFilterConfig

    needs = frozenset({"prompts", "prediction"})
    drops_samples = True

    def on_loss(self, state: TrainerState, control: TrainerControl, context: Any = None, inputs: dict | None = None,
                **kwargs: Any) -> None:
        if not self.active:
            return
        den = context.denoiser
        x_t, t = inputs["noisy_model_input"], inputs["timesteps"]
        uncond = context.prompts([""])
        with torch.no_grad():
            eps_u = den.eps(x_t, t, uncond).float()
            eps_c = live_eps(den, inputs, detach=True)
        tau = wen_threshold(self.config.threshold, self.strength, x_t[0].numel(), self.config.reference_dim)
        eligible = self.eligible(inputs["levels"])
        weights, keep, gap = wen_filter_weights(inputs["weights"], eps_c, eps_u, tau, eligible,
                                                self.config.renormalize)
        inputs["weights"] = weights
        inputs["wen_gap"] = gap
        eligible = eligible.to(keep.device)
        self._count(kept=(keep & eligible).sum(), eligible=eligible.sum(), gap_sum=gap.sum(), samples=gap.numel())

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        return {
            "kept_fraction": sums["kept"] / sums["eligible"] if sums.get("eligible") else 1.0,
            "gap_mean": sums["gap_sum"] / max(sums["samples"], 1.0),
        }
