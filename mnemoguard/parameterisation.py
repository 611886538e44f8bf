"""The network parameterisations of diffusion and flow models and the conversions between them (pure functions).

Every family noises as ``x_t = α_t x_0 + σ_t ε`` (:mod:`mnemoguard.family.schedule`: DDPM's
``α = sqrt(ᾱ_t), σ = sqrt(1 − ᾱ_t)``, flow matching's ``α = 1 − σ``). The network predicts one of

- ``epsilon``: :math:`\\hat\\varepsilon`;
- ``v_prediction``: :math:`v = \\alpha_t \\varepsilon - \\sigma_t x_0` (Salimans & Ho 2022; variance-preserving
  schedules, α² + σ² = 1), so :math:`\\varepsilon = \\alpha_t v + \\sigma_t x_t` and
  :math:`x_0 = \\alpha_t x_t - \\sigma_t v`;
- ``sample``: :math:`\\hat x_0`, so :math:`\\varepsilon = (x_t - \\alpha_t \\hat x_0) / \\sigma_t`;
- ``flow_prediction``: the velocity :math:`v = \\varepsilon - x_0` of the linear interpolant (rectified flow:
  Liu et al. 2023, Lipman et al. 2023; SD3, Flux), so with α = 1 − σ:
  :math:`\\varepsilon = x_t + \\alpha_t v` and :math:`x_0 = x_t - \\sigma_t v`.

:class:`mnemoguard.denoiser.Denoiser` applies these to a network's output; :mod:`mnemoguard.denoiser` re-exports them.
"""

from __future__ import annotations

from torch import Tensor

__all__ = [
    "PREDICTION_TYPES",
    "denoising_loss",
    "eps_from_prediction",
    "training_target",
    "x0_from_prediction",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, found {prediction_type!r}")


def _expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``[B]`` (or scalar) so it broadcasts against ``x`` ``[B, ...]``."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"expected a scalar or a [B={x.shape[0]}] coefficient, found shape {tuple(coef.shape)}")
    return coef.reshape(-1, *([1] * (x.ndim - 1)))


def eps_from_prediction(
    pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str = "epsilon"
) -> Tensor:
    """Convert a network output to a noise prediction.

    .. math::

        \\varepsilon = \\begin{cases} \\text{pred} & \\text{epsilon} \\\\
        \\alpha_t\\, v + \\sigma_t x_t & \\text{v\\_prediction} \\\\
        (x_t - \\alpha_t \\hat x_0)/\\sigma_t & \\text{sample} \\\\
        x_t + \\alpha_t\\, v & \\text{flow\\_prediction} \\end{cases}

    ``alpha`` and ``sigma`` are scalars or per-sample ``[B]`` tensors.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return pred
    a, s = _expand_like(alpha, x_t), _expand_like(sigma, x_t)
    if prediction_type == "v_prediction":
        return a * pred + s * x_t
    if prediction_type == "flow_prediction":
        return x_t + a * pred
    return (x_t - a * pred) / s


def x0_from_prediction(
    pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str = "epsilon"
) -> Tensor:
    """Convert a network output to a clean-sample prediction (no clipping, no thresholding).

    .. math::

        \\hat x_0 = \\begin{cases} (x_t - \\sigma_t \\hat\\varepsilon)/\\alpha_t & \\text{epsilon} \\\\
        \\alpha_t x_t - \\sigma_t v & \\text{v\\_prediction} \\\\
        \\text{pred} & \\text{sample} \\\\
        x_t - \\sigma_t v & \\text{flow\\_prediction} \\end{cases}
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return pred
    a, s = _expand_like(alpha, x_t), _expand_like(sigma, x_t)
    if prediction_type == "v_prediction":
        return a * x_t - s * pred
    if prediction_type == "flow_prediction":
        return x_t - s * pred
    return (x_t - s * pred) / a


def training_target(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor,
                    prediction_type: str = "epsilon") -> Tensor:
    """What the network is trained to output at ``x_t = α_t x_0 + σ_t ε``.

    .. math::

        \\text{target} = \\begin{cases} \\varepsilon & \\text{epsilon} \\\\
        \\alpha_t\\, \\varepsilon - \\sigma_t x_0 & \\text{v\\_prediction (Salimans \\& Ho 2022)} \\\\
        x_0 & \\text{sample} \\\\
        \\varepsilon - x_0 & \\text{flow\\_prediction (diffusers' SD3 / Flux scripts' ``noise - model_input``)}
        \\end{cases}
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow_prediction":
        return noise - x0
    return _expand_like(alpha, x0) * noise - _expand_like(sigma, x0) * x0


def denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """The per-sample denoising loss ``mean_{CHW} (prediction − target)²`` in float32, ``[B]`` (the training loss of
    diffusers' scripts before its batch mean, and the monitor's probe loss)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction and target must have one shape, found {tuple(prediction.shape)} and "
                         f"{tuple(target.shape)}")
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
