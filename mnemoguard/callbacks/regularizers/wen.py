"""Wen et al.'s training-time filter (ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion
Models", ``train_text_to_image.py --hard_threshold``): drop the samples whose text-conditional gap is large."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...signals.score_gap import wen_training_filter
from ..base import TrainerControl, TrainerState
from .base import Regularizer, RegularizerConfig, drop_samples, live_eps, skip_if_nothing_kept

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


@dataclass
class WenFilterConfig(RegularizerConfig):
    """Wen et al.'s filter. ``strength`` divides the threshold (2 = twice as strict)."""

    threshold: float = 2.0  # τ on ||eps_c - eps_u||_2 per sample (--hard_threshold, SD 1.4 at 512 px); 0 drops all
    reference_dim: int | None = None  # None: τ as given; D0: τ·sqrt(D/D0) for D values per sample (16384 = SD 1.4)
    renormalize: bool = True  # loss = mean over the kept samples (the authors' code); False: kept weights unchanged


class WenFilter(Regularizer):
    """Wen et al.'s training-time filter as a switchable callback (``on_loss``).

    Per micro-batch, one extra *unconditional* forward of the live UNet under ``no_grad``, batched over the whole
    micro-batch (the empty-caption embedding from ``trainer.encode_captions([""])``), at the training noisy inputs and
    timesteps; the gap between the training prediction (as ε, so v-prediction models are compared in ε space; for
    ε models this is the authors' ``model_pred − eps_u``) and that unconditional ε. Samples with gap ≥ τ/strength get
    weight 0 (:func:`wen_filter_weights`). Min-SNR weights are part of ``loss_per_sample`` in the trainer, so they are
    masked with the sample (the authors' script forgets this). A micro-batch where nothing is kept is made a no-op
    by :func:`~mnemoguard.callbacks.regularizers.base.skip_if_nothing_kept` (the authors skip the step).

    Metrics per step: ``reg/wen_filter/kept_fraction`` (kept / eligible samples), ``gap_mean``, ``skipped``
    (micro-batches with nothing kept) and the cumulative ``skipped_total``.
    """

    name = "wen_filter"
    config_class = WenFilterConfig
    config: WenFilterConfig

    def validate_config(self) -> None:
        c = self.config
        if not c.threshold >= 0:
            raise ValueError(f"wen_filter: threshold must be >= 0, found {c.threshold}")
        if c.reference_dim is not None and c.reference_dim <= 0:
            raise ValueError(f"wen_filter: reference_dim must be a positive number of values, found {c.reference_dim}")

    def on_loss(self, state: TrainerState, control: TrainerControl, inputs: dict, trainer: Any = None,
                unet: Any = None, components: Any = None, accelerator: Any = None, **kwargs: Any) -> None:
        if not self.active:
            return
        self._begin_micro_batch()
        den = self._denoiser(unet, components)
        x_t, t = inputs["noisy_model_input"], inputs["timesteps"]
        if trainer is None:
            raise ValueError("wen_filter needs the `trainer` hook argument (for the empty-caption embedding)")
        uncond = trainer.encode_captions([""])
        with torch.no_grad():
            eps_u = den.eps(x_t, t, uncond).float()
            eps_c = live_eps(den, inputs["model_pred"].detach(), x_t, t)
        tau = wen_threshold(self.config.threshold, self.strength, x_t[0].numel(), self.config.reference_dim)
        eligible = self.eligible(t)
        weights, keep, gap = wen_filter_weights(inputs["weights"], eps_c, eps_u, tau, eligible,
                                                self.config.renormalize)
        inputs["weights"] = weights
        inputs["wen_gap"] = gap
        skipped = skip_if_nothing_kept(inputs, accelerator)
        n_eligible = int(eligible.sum())
        self._count(kept=int((keep & eligible.to(keep.device)).sum()), eligible=n_eligible,
                    gap_sum=float(gap.sum()), samples=gap.numel(), skipped=float(skipped))

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        return {
            "kept_fraction": sums["kept"] / sums["eligible"] if sums.get("eligible") else 1.0,
            "gap_mean": sums["gap_sum"] / max(sums["samples"], 1.0),
            "skipped": sums["skipped"],
            "skipped_total": self.totals.get("skipped", 0.0),
        }
