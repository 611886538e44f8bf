"""Early-denoising overestimation and trajectory decomposition (Kim, Kim & Lee, "How Diffusion Models Memorize",
arXiv 2509.25705; formal results of the revised manuscript as documented in the authors' repository
``yupeeee/How-Diffusion-Models-Memorize``, ``docs/theory/``).

Notation: ``x_t = α_t x0 + σ_t ε``, ``SNR_t = α_t² / σ_t²``. The paper works in the VP / DDPM form
``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 − ᾱ_t)`` (so ``SNR_t = ᾱ_t / (1 − ᾱ_t)``); every formula below holds for any
``(α_t, σ_t)`` — e.g. flow matching's linear interpolant ``α_t = 1 − σ_t``
(:mod:`mnemoguard.family.schedule`) — and the functions take either ``alpha_bar`` (DDPM) or keyword-only ``alpha=`` and
``sigma=``. For a memorized pair (caption c, training latent x*) and guidance scale g:

* clean estimates ``x̂_t(c) = (x_t − σ_t ε_c) / α_t``, ``x̂_t(∅)`` likewise with ``ε_u``; guided
  ``x̂_t(c; g) = x̂_t(∅) + g (x̂_t(c) − x̂_t(∅))`` (the x0-prediction of the CFG noise ``ε_u + g(ε_c − ε_u)``);
* Cor. 3 (CFG amplification, "overestimation"): at the first step ``x̂_T(c; g) → μ + g (x* − μ)``, μ the mean of
  the training latents: the guided prediction overshoots the training image by the factor g. The
  *overshoot coefficient* ``a = argmin_a Σ_seeds ‖(x̂_T(c; g) − μ) − a (x* − μ)‖²`` is ≈ g for memorized pairs;
* Thm 1: the normalised first-step loss ``A_c = sqrt(L_T(c) / (d · SNR_T))``, with
  ``L_T(c) = E_ε ‖ε − ε_θ(α_T x* + σ_T ε, c)‖²``, controls the error of the first conditional x0-prediction:
  since ``x̂_T(c) − x* = (σ_T/α_T)(ε − ε_c)``, ``L_T/SNR_T = E ‖x̂_T(c) − x*‖²`` and A_c is its per-coordinate RMS.
  Small A_c ⇒ the model recovers x* from pure noise (memorization).

The decomposition of intermediate latents (arXiv v1 wording, "deviation from the theoretical denoising schedule") is
our reconstruction (research notes §5.2): regress each ``x_t`` on the two pure components ``[x_T, x*]`` by least
squares over the latent coordinates, ``x_t ≈ a_t x_T + b_t x* + r_t``. A generalising deterministic sampler (DDIM;
the Euler step of flow matching) keeps ``b_t ≈ α_t`` and ``a_t ≈ σ_t`` (DDPM: ``sqrt(ᾱ_t)``, ``sqrt(1 − ᾱ_t)``);
memorization shows up as ``b_t`` well above ``α_t`` in the first steps (the noise share is suppressed and replaced by
the training image).

All functions are pure; every per-sample reduction runs over the trailing ``event_ndim`` dimensions (default 3:
a latent ``C×H×W``), the leading dimensions are batch dimensions and broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "LatentDecomposition",
    "Projection",
    "decompose_latents",
    "guided_x0_prediction",
    "normalized_first_step_loss",
    "overshoot_coefficient",
    "project_onto",
    "sample_forward_noise",
    "schedule_deviation",
    "theoretical_schedule",
]


def _alpha_bar(alpha_bar: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(alpha_bar, dtype=ref.dtype, device=ref.device)
    if (a <= 0).any() or (a >= 1).any():
        raise ValueError(f"alpha_bar must lie strictly inside (0, 1); found {a.flatten()[:4].tolist()}")
    return a


def _coefs(
    alpha_bar: float | torch.Tensor | None,
    alpha: float | torch.Tensor | None,
    sigma: float | torch.Tensor | None,
    ref: torch.Tensor,
    *,
    alpha_positive: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(α, σ)`` in ``ref``'s dtype and device: ``(sqrt(ᾱ), sqrt(1 − ᾱ))`` from ``alpha_bar``, else ``alpha`` and
    ``sigma`` as given (σ > 0; α > 0, or α >= 0 where nothing divides by it)."""
    if alpha_bar is not None:
        if alpha is not None or sigma is not None:
            raise ValueError("pass either alpha_bar (DDPM) or alpha= and sigma=, not both")
        a = _alpha_bar(alpha_bar, ref)
        return a.sqrt(), (1 - a).sqrt()
    if alpha is None or sigma is None:
        raise ValueError("pass alpha_bar (DDPM's ᾱ_t) or both alpha= and sigma= (x_t = α x0 + σ ε, any schedule)")
    al = torch.as_tensor(alpha, dtype=ref.dtype, device=ref.device)
    si = torch.as_tensor(sigma, dtype=ref.dtype, device=ref.device)
    if (si <= 0).any() or (al <= 0 if alpha_positive else al < 0).any():
        need = "alpha > 0" if alpha_positive else "alpha >= 0"
        raise ValueError(f"need {need} and sigma > 0; found alpha {al.flatten()[:4].tolist()}, "
                         f"sigma {si.flatten()[:4].tolist()}")
    return al, si


def _event_dims(x: torch.Tensor, event_ndim: int) -> tuple[int, ...]:
    if event_ndim < 1 or x.ndim < event_ndim:
        raise ValueError(
            f"expected tensors with at least event_ndim={event_ndim} trailing coordinate dimensions; "
            f"found shape {tuple(x.shape)}"
        )
    return tuple(range(x.ndim - event_ndim, x.ndim))


def _dot(a: torch.Tensor, b: torch.Tensor, event_ndim: int) -> torch.Tensor:
    a, b = torch.broadcast_tensors(a, b)
    return (a * b).sum(_event_dims(a, event_ndim))


def guided_x0_prediction(
    x_t: torch.Tensor,
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    alpha_bar: float | torch.Tensor | None = None,
    guidance_scale: float | None = None,
    *,
    alpha: float | torch.Tensor | None = None,
    sigma: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``x̂_t(c; g) = (x_t − σ_t ε_g) / α_t`` with ``ε_g = ε_u + g (ε_c − ε_u)`` (noise predictions).

    ``alpha_bar``: DDPM's ᾱ_t (``α = sqrt(ᾱ)``, ``σ = sqrt(1 − ᾱ)``); or, with ``alpha_bar=None``, the keyword-only
    ``alpha`` and ``sigma`` of any schedule ``x_t = α x0 + σ ε`` (flow matching: ``α = 1 − σ``). Each is a scalar or
    broadcasts against ``x_t`` (e.g. shape (B, 1, 1, 1)). ``guidance_scale`` (g) is required.
    """
    if guidance_scale is None:
        raise TypeError("guided_x0_prediction() needs guidance_scale")
    al, si = _coefs(alpha_bar, alpha, sigma, x_t)
    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    return (x_t - si * eps) / al


class Projection(NamedTuple):
    """``vec ≈ coefficient · direction``; ``off_target = ‖vec − coefficient · direction‖ / ‖direction‖``."""

    coefficient: torch.Tensor
    off_target: torch.Tensor


def project_onto(vec: torch.Tensor, direction: torch.Tensor, *, event_ndim: int = 3) -> Projection:
    """Least-squares scalar ``<vec, v>/‖v‖²`` and the relative orthogonal remainder, per sample.

    With ``vec = g Δ_T`` and ``v = x* − μ`` this is the repository's ``a_parallel`` / ``off_target`` pair
    (research notes §13.2).
    """
    vv = _dot(direction, direction, event_ndim)
    if (vv <= 0).any():
        raise ValueError("the direction has zero norm for some sample (x* equal to the reference mean?)")
    coef = _dot(vec, direction, event_ndim) / vv
    shape = coef.shape + (1,) * event_ndim
    resid = vec - coef.reshape(shape) * direction
    off = _dot(resid, resid, event_ndim).sqrt() / vv.sqrt()
    return Projection(coef, off)


def overshoot_coefficient(
    x0_pred: torch.Tensor,
    x_star: torch.Tensor,
    mean: torch.Tensor,
    *,
    seed_dim: int | None = None,
    event_ndim: int = 3,
) -> torch.Tensor:
    """Guidance overshoot coefficient ``a`` of Cor. 3: ``x̂_T(c; g) − μ ≈ a (x* − μ)``.

    Per sample ``a = <x̂ − μ, x* − μ> / ‖x* − μ‖²``. With ``seed_dim`` the least-squares fit is pooled over that
    dimension (several seeds of one pair share x*): ``argmin_a Σ_s ‖(x̂_s − μ) − a v‖² = mean_s <x̂_s − μ, v>/‖v‖²``,
    which is the mean of the per-seed coefficients. ≈ g (the guidance scale) for a memorized pair, ≈ 0 when the
    prediction carries nothing of x*. ``mean``: the mean of the training latents (or of unconditional first-step
    predictions, Lemma 2). Cost: one CFG call (batch 2) per seed to get ``x̂_T(c; g)``.
    """
    coef = project_onto(x0_pred - mean, x_star - mean, event_ndim=event_ndim).coefficient
    return coef if seed_dim is None else coef.mean(seed_dim)


def normalized_first_step_loss(
    eps_pred: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: float | torch.Tensor | None = None,
    *,
    draw_dim: int | None = 0,
    event_ndim: int = 3,
    alpha: float | torch.Tensor | None = None,
    sigma: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``A_c = sqrt(L̂_T(c) / (d · SNR_T))``, ``L̂_T(c) = mean_draws ‖ε − ε_θ(α_T x* + σ_T ε, c)‖²`` (Thm 1), with
    ``SNR_T = α_T² / σ_T²`` (``ᾱ_T / (1 − ᾱ_T)`` from ``alpha_bar``; or keyword-only ``alpha`` / ``sigma`` of any
    schedule, broadcasting against the per-sample losses).

    ``eps_pred`` / ``eps``: predictions and the true noises, with the forward-noise draws along ``draw_dim``
    (``None``: a single draw per sample). Equals the RMS per-coordinate error of the conditional first-step
    x0-prediction ``(x_t − σ_T ε_θ)/α_T`` against x*. The authors use 64 draws at t = T (64 conditional forwards per
    pair); during fine-tuning the training step's own (ε, ε_θ) at large t is a one-draw estimate for free.
    """
    if eps_pred.shape != eps.shape:
        raise ValueError(
            f"eps_pred and eps must have the same shape; found {tuple(eps_pred.shape)} and {tuple(eps.shape)}"
        )
    dims = _event_dims(eps, event_ndim)
    d = math.prod(eps.shape[i] for i in dims)
    sq = ((eps - eps_pred) ** 2).sum(dims)
    loss = sq if draw_dim is None else sq.mean(draw_dim)
    if alpha_bar is not None and alpha is None and sigma is None:  # DDPM: ᾱ / (1 − ᾱ), as before
        a = _alpha_bar(alpha_bar, loss)
        snr = a / (1 - a)
    else:
        al, si = _coefs(alpha_bar, alpha, sigma, loss)
        snr = al**2 / si**2
    return (loss / (d * snr)).sqrt()


def sample_forward_noise(
    x0: torch.Tensor,
    alpha_bar: float | None = None,
    num_draws: int | None = None,
    *,
    generator: torch.Generator,
    alpha: float | torch.Tensor | None = None,
    sigma: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_draws`` forward-noised copies ``x_t = α x0 + σ ε`` along a new dim 0: ``(x_t, ε)``.

    ``α = sqrt(ᾱ)``, ``σ = sqrt(1 − ᾱ)`` from ``alpha_bar``; or keyword-only ``alpha`` (>= 0) and ``sigma`` (> 0) of
    any schedule (flow matching: ``α = 1 − σ``), broadcasting against ``x0``. ``num_draws`` is required.
    """
    if num_draws is None:
        raise TypeError("sample_forward_noise() needs num_draws")
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1; found {num_draws}")
    al, si = _coefs(alpha_bar, alpha, sigma, x0, alpha_positive=False)
    eps = torch.randn((num_draws, *x0.shape), generator=generator, device=generator.device, dtype=x0.dtype)
    eps = eps.to(x0.device)
    return al * x0 + si * eps, eps


class LatentDecomposition(NamedTuple):
    """``x_t ≈ noise_coef · x_T + image_coef · x* + residual``; ``residual_ratio = ‖residual‖ / ‖x_t‖``."""

    noise_coef: torch.Tensor
    image_coef: torch.Tensor
    residual_ratio: torch.Tensor


def decompose_latents(
    latents: torch.Tensor,
    initial_noise: torch.Tensor,
    x_star: torch.Tensor,
    *,
    event_ndim: int = 3,
    rcond: float = 1e-10,
) -> LatentDecomposition:
    """Least squares of each latent onto the pure components ``[x_T, x*]`` over its ``d`` coordinates.

    Solves the 2×2 normal equations per sample (``G [a, b]ᵀ = [<x_t, x_T>, <x_t, x*>]ᵀ``, ``G`` the Gram matrix of
    ``x_T`` and ``x*``). ``latents`` may carry extra leading dims (e.g. steps × batch): everything broadcasts.
    Raises if ``x_T`` and ``x*`` are (nearly) collinear for some sample (relative Gram determinant below
    ``rcond``), where the split is not identifiable.
    """
    g_tt = _dot(initial_noise, initial_noise, event_ndim)
    g_ss = _dot(x_star, x_star, event_ndim)
    g_ts = _dot(initial_noise, x_star, event_ndim)
    det = g_tt * g_ss - g_ts**2
    if (det <= rcond * g_tt * g_ss).any():
        raise ValueError("x_T and x* are (nearly) collinear for some sample: the decomposition is not identifiable")
    r_t = _dot(latents, initial_noise, event_ndim)
    r_s = _dot(latents, x_star, event_ndim)
    a = (g_ss * r_t - g_ts * r_s) / det
    b = (g_tt * r_s - g_ts * r_t) / det
    shape = a.shape + (1,) * event_ndim
    resid = latents - a.reshape(shape) * initial_noise - b.reshape(shape) * x_star
    ratio = _dot(resid, resid, event_ndim).sqrt() / _dot(latents, latents, event_ndim).sqrt().clamp_min(1e-30)
    return LatentDecomposition(a, b, ratio)


def theoretical_schedule(
    alpha_bars: torch.Tensor | Sequence[float] | None = None,
    *,
    alpha: torch.Tensor | Sequence[float] | None = None,
    sigma: torch.Tensor | Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalising sampler's shares ``(noise, image) = (σ_t, α_t)`` for each step, float64.

    From ``alpha_bars`` (DDPM): ``(sqrt(1 − ᾱ_t), sqrt(ᾱ_t))``; or, with ``alpha_bars=None``, the keyword-only
    ``alpha`` and ``sigma`` of each step (any schedule ``x_t = α_t x0 + σ_t ε``; flow matching: ``(σ_t, 1 − σ_t)``).
    """
    if alpha_bars is not None:
        if alpha is not None or sigma is not None:
            raise ValueError("pass either alpha_bars (DDPM) or alpha= and sigma=, not both")
        a = torch.as_tensor(alpha_bars, dtype=torch.float64)
        if (a < 0).any() or (a > 1).any():
            raise ValueError("alpha_bars must lie in [0, 1]")
        return (1 - a).sqrt(), a.sqrt()
    if alpha is None or sigma is None:
        raise ValueError("pass alpha_bars (DDPM's ᾱ of each step) or both alpha= and sigma= (one value per step)")
    al = torch.as_tensor(alpha, dtype=torch.float64)
    si = torch.as_tensor(sigma, dtype=torch.float64)
    if al.shape != si.shape:
        raise ValueError(f"alpha and sigma must have one value per step each; found shapes {tuple(al.shape)} and "
                         f"{tuple(si.shape)}")
    if (al < 0).any() or (si < 0).any() or not (torch.isfinite(al).all() and torch.isfinite(si).all()):
        raise ValueError("alpha and sigma must be finite and >= 0")
    return si, al


def schedule_deviation(
    image_coef: torch.Tensor,
    alpha_bars: torch.Tensor | Sequence[float] | None = None,
    *,
    step_dim: int = 0,
    num_steps: int | None = None,
    alpha: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Overestimation of the image share, ``Σ_t (b_t − α_t)_+`` over the first ``num_steps`` steps.

    ``image_coef``: ``b_t`` from :func:`decompose_latents` with the steps along ``step_dim``; ``alpha_bars``: ᾱ of
    each step in the same order (``α_t = sqrt(ᾱ_t)``), or, with ``alpha_bars=None``, the keyword-only ``alpha``:
    ``α_t`` of each step of any schedule (flow matching: ``1 − σ_t``). 0 for a sampler on the theoretical schedule;
    grows with memorization severity (the paper reports a near-perfect correlation of schedule deviation with SSCD).
    Our reconstruction.
    """
    b = image_coef.movedim(step_dim, 0)
    if alpha_bars is not None:
        if alpha is not None:
            raise ValueError("pass either alpha_bars (DDPM) or alpha=, not both")
        _, ideal = theoretical_schedule(alpha_bars)
    elif alpha is None:
        raise ValueError("pass alpha_bars (DDPM's ᾱ of each step) or alpha= (α_t of each step)")
    else:
        ideal = torch.as_tensor(alpha, dtype=torch.float64)
        _, ideal = theoretical_schedule(alpha=ideal, sigma=torch.zeros_like(ideal))
    if ideal.numel() != b.shape[0]:
        what = "alpha_bars" if alpha_bars is not None else "alpha values"
        raise ValueError(f"got {ideal.numel()} {what} for {b.shape[0]} steps along dim {step_dim}")
    ideal = ideal.to(b).reshape((-1,) + (1,) * (b.ndim - 1))
    excess = (b - ideal).clamp_min(0)
    if num_steps is not None:
        excess = excess[:num_steps]
    return excess.sum(0)
