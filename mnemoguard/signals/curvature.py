"""Coordinate-wise curvature of the learned log-density: Kim & Lee's curvature-difference and score-difference maps.

The maps are channel sums of a Hutchinson estimate of the Jacobian diagonal of an eps-prediction (or of a difference
of two), computed with the batched estimators of :mod:`.hutchinson` (same ``fn`` / ``num_probes`` / ``method``
signature, re-exported here), or of squared eps differences (no probes).

Reference: Kim & Lee, "Localizing Memorized Regions in Diffusion Models via Coordinate-Wise Curvature
Differences", ICML 2026 (code: github.com/Gwangho99/mem-curv-diff, ``utils/metric_utils.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .hutchinson import (
    Method,
    hutchinson_diagonal,
    hutchinson_samples,
    hutchinson_trace,
    jacobian_products,
    make_generator,
    rademacher_probes,
)

__all__ = [
    "Method",
    "conditional_curvature_map",
    "curvature_diff_map",
    "curvature_map",
    "hutchinson_diagonal",
    "hutchinson_samples",
    "hutchinson_trace",
    "jacobian_products",
    "make_generator",
    "rademacher_probes",
    "score_diff_map",
    "upsample_map",
]


# ---------------------------------------------------------------------------------------------------- Kim & Lee maps
def _sigma_like(sigma: Tensor | float, m: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, dtype=m.dtype, device=m.device)
    if s.ndim == 1:
        s = s.reshape(-1, *([1] * (m.ndim - 1)))
    return s


def curvature_map(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    num_probes: int = 16,
    generator: torch.Generator | int | None = None,
    method: Method = "vjp",
    fd_step: float = 1e-3,
    probe_batch: int | None = None,
    sigma: Tensor | float | None = None,
    positive_part: bool = True,
    channel_dim: int = 1,
) -> Tensor:
    """Per-position negative curvature of the field ``s = -fn / sigma``, summed over channels: ``[B, H, W]``.

    .. math::

        M(x)_{hw} = \\Big[ -\\sum_{c} \\widehat{\\operatorname{diag}}\\big(\\partial s / \\partial x\\big)_{c,h,w}
        \\Big]_+ = \\frac{1}{\\sigma_t}\\Big[ \\sum_c \\widehat{\\operatorname{diag}}
        \\big(\\partial\\, \\text{fn} / \\partial x\\big)_{c,h,w} \\Big]_+

    Kim & Lee's computation (``compute_diag_h_diff_only``): with ``fn`` = eps, :math:`s \\approx \\nabla \\log p_t`
    and :math:`\\partial s/\\partial x` is the Hessian of log p_t, so large values mark coordinates where the density
    is sharp. Their code drops the 1/sigma_t ("to avoid numerical instability"), which is ``sigma=None`` here;
    ``positive_part=False`` keeps the signed channel sum.
    """
    diag = hutchinson_diagonal(
        fn, x, num_probes=num_probes, generator=generator, method=method, fd_step=fd_step, probe_batch=probe_batch
    )
    if diag.ndim < 2:
        raise ValueError(f"expected x with a channel axis [B, C, ...], found shape {tuple(x.shape)}")
    m = diag.sum(dim=channel_dim)
    if sigma is not None:
        m = m / _sigma_like(sigma, m)
    return m.clamp_min(0) if positive_part else m


def curvature_diff_map(
    eps_fn: Callable[[Tensor], Tensor],
    baseline_eps_fn: Callable[[Tensor], Tensor] | None,
    x: Tensor,
    *,
    num_probes: int = 16,
    generator: torch.Generator | int | None = None,
    method: Method = "vjp",
    fd_step: float = 1e-3,
    probe_batch: int | None = None,
    sigma: Tensor | float | None = None,
    positive_part: bool = True,
    channel_dim: int = 1,
) -> Tensor:
    """Kim & Lee's coordinate-wise curvature difference map (ICML 2026, Eq. 1 and Eq. 2), ``[B, H, W]``.

    .. math::

        \\Delta h(x)_{hw} = \\Big[ \\sum_c \\widehat{\\operatorname{diag}}\\Big(
        \\frac{\\partial(\\varepsilon(x) - \\varepsilon_{\\text{base}}(x))}{\\partial x}\\Big)_{c,h,w} \\Big]_+
        \\;(\\times 1/\\sigma_t)

    i.e. :math:`-(\\partial^2_i \\log p - \\partial^2_i \\log p_{\\text{base}})` per coordinate, summed over
    channels, positive part: positive where the model's density is sharper than the baseline's.

    - :math:`\\Delta h_\\varnothing`: ``eps_fn`` conditional, ``baseline_eps_fn`` unconditional (same network,
      empty prompt; code metric ``cov``).
    - :math:`\\Delta h_{\\tilde\\theta}`: ``baseline_eps_fn`` = the conditional prediction of a less-trained model
      (``cov_bad``; in fine-tuning, the pre-fine-tuning model).
    - ``baseline_eps_fn=None``: ``eps_fn`` already returns the difference (e.g. ``Denoiser.guidance_fn``, one
      batched UNet call for both branches).

    As in their code the probes act on the difference field (one Hutchinson estimate of the difference), 1/sigma_t
    is dropped unless ``sigma`` is given, and the map is taken at the last DDIM step (t=1) of a CFG trajectory,
    K = 16 (the trajectory is the caller's business). Their code loops over 16 VJPs; here probes are batched, and
    ``method="vjp"`` with the same probes reproduces their numbers.
    """
    fn = eps_fn if baseline_eps_fn is None else (lambda z: eps_fn(z) - baseline_eps_fn(z))
    return curvature_map(
        fn, x, num_probes=num_probes, generator=generator, method=method, fd_step=fd_step, probe_batch=probe_batch,
        sigma=sigma, positive_part=positive_part, channel_dim=channel_dim,
    )


def conditional_curvature_map(
    eps_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    num_probes: int = 16,
    generator: torch.Generator | int | None = None,
    method: Method = "vjp",
    fd_step: float = 1e-3,
    probe_batch: int | None = None,
    sigma: Tensor | float | None = None,
    positive_part: bool = True,
    channel_dim: int = 1,
) -> Tensor:
    """Raw conditional curvature, no baseline: Kim & Lee's ablation (code ``compute_diag_h_cond_only``).

    .. math:: M_{hw} = \\Big[ \\sum_c \\widehat{\\operatorname{diag}}(\\partial \\varepsilon_c/\\partial x)_{c,h,w}
        \\Big]_+

    Intrinsic data constraints (flat backgrounds, edges) also collapse variance, which is why the paper subtracts a
    baseline; this map shows them. ``[B, H, W]``.
    """
    return curvature_map(
        eps_fn, x, num_probes=num_probes, generator=generator, method=method, fd_step=fd_step,
        probe_batch=probe_batch, sigma=sigma, positive_part=positive_part, channel_dim=channel_dim,
    )


def score_diff_map(
    eps: Tensor | Sequence[Tensor],
    eps_base: Tensor | Sequence[Tensor],
    *,
    sigma: Tensor | float | Sequence[Tensor | float] | None = None,
    channel_dim: int = 1,
) -> Tensor:
    """Kim & Lee's score-difference proxy map (Eq. 5 / Eq. 6; code ``compute_score_diffs_only``), ``[B, H, W]``.

    .. math::

        \\Delta s(x)_{hw} = \\frac{1}{|S|} \\sum_{i \\in S} \\sum_c
        \\Big( \\frac{\\varepsilon(x_{t_i}) - \\varepsilon_{\\text{base}}(x_{t_i})}{\\sigma_{t_i}} \\Big)^2_{c,h,w}

    :math:`\\Delta s_\\varnothing`: base = unconditional prediction; :math:`\\Delta s_{\\tilde\\theta}`: base =
    a less-trained model's conditional prediction. Their default averages over the last DDIM step only (t=1) and
    divides by sigma_t (``sigma=None`` here is their ``--no_score``, eps space). Pass one tensor per step (or a
    single tensor) and the matching sigma(s). No gradients, no probes: 1 CFG call per step.
    """
    eps_l = [eps] if isinstance(eps, Tensor) else list(eps)
    base_l = [eps_base] if isinstance(eps_base, Tensor) else list(eps_base)
    if not eps_l or len(eps_l) != len(base_l):
        raise ValueError(f"need the same non-zero number of steps, found {len(eps_l)} and {len(base_l)}")
    if sigma is None or isinstance(sigma, (float, int)) or (isinstance(sigma, Tensor) and len(eps_l) == 1):
        sig_l = [sigma] * len(eps_l)
    else:
        sig_l = list(sigma)
        if len(sig_l) != len(eps_l):
            raise ValueError(f"got {len(eps_l)} steps but {len(sig_l)} sigmas")
    acc = None
    for e, b, s in zip(eps_l, base_l, sig_l):
        if e.shape != b.shape:
            raise ValueError(f"eps and eps_base must have the same shape, found {tuple(e.shape)} and {tuple(b.shape)}")
        d = e - b
        if s is not None:
            d = d / _sigma_like(s, d)
        term = d.pow(2).sum(dim=channel_dim)
        acc = term if acc is None else acc + term
    return acc / len(eps_l)


def upsample_map(m: Tensor, size: int | tuple[int, int] = 256, *, mode: str = "bilinear") -> Tensor:
    """Resize ``[H, W]`` or ``[B, H, W]`` maps to image resolution (Kim & Lee evaluate 64x64 latent maps at
    256x256 with PIL's bilinear filter; for up-sampling that equals half-pixel bilinear interpolation,
    ``align_corners=False``, which is what this does; down-sampling is anti-aliased). No normalisation here:
    their evaluation applies ``log1p`` and a min-max over the whole evaluated set afterwards."""
    if m.ndim not in (2, 3):
        raise ValueError(f"expected a map [H, W] or [B, H, W], found shape {tuple(m.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = m.reshape(-1, 1, *m.shape[-2:])
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    kwargs = {"align_corners": False, "antialias": down} if mode in ("bilinear", "bicubic") else {}
    y = F.interpolate(x.float(), size=size, mode=mode, **kwargs).to(m.dtype)
    return y.reshape(*m.shape[:-2], *size)
