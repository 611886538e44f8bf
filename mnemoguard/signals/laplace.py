"""p-Laplace family of ``log p_t`` from a learned score (Brokman et al., SSVM 2025 and NeurReps 2025).

With ``f = log p_t`` and the score ``s = ∇f ≈ −ε_θ(x, t)/σ_t`` (``σ_t`` the noise scale of
``x_t = α_t x0 + σ_t ε``: ``sqrt(1 − ᾱ_t)`` for DDPM, the interpolant's σ for flow matching, whose ε̂ is
``x_t + α_t v``; :mod:`mnemoguard.parameterisation`):

* p-Laplacian ``Δ_p f = div(‖s‖^{p−2} s) = ‖s‖^{p−2} [tr J_s + (p − 2) sᵀJ_s s / ‖s‖²]``;
* ``p = 2``: ``Δf = tr J_s``, the Laplacian of log p_t (very negative at a sharp, memorized mode);
* ``p = 1``: ``div(s/‖s‖)``, the divergence of the *normalised* score field (minus the mean curvature of the level
  sets of p_t; magnitude-free — the "direction of the normalised score field" criterion);
* ``p = ∞`` (normalised ∞-Laplacian): ``Δ_∞ f = sᵀ J_s s / ‖s‖²``, the curvature along the score direction.

In terms of the eps field ``e`` (``J_e`` its Jacobian): ``tr J_s = −tr J_e/σ``, ``sᵀJ_s s/‖s‖² = −eᵀJ_e e/(σ‖e‖²)``,
``‖s‖ = ‖e‖/σ``; so ``Δ_1 f = −(tr J_e − eᵀJ_e e/‖e‖²)/‖e‖`` does not depend on σ.

Two estimators:

1. **Hutchinson** (:func:`p_laplacian_hutchinson`): ``tr J_e`` from
   :func:`mnemoguard.signals.hutchinson.hutchinson_trace` (K Rademacher probes, batched JVP / VJP / finite
   differences), plus one exact Jacobian product along ``e`` for the ``eᵀJ_e e`` term when ``p ≠ 2``.
   Cost: K + 1 JVPs (K for p = 2). :func:`infinity_laplacian` needs the directional term only: 1 JVP.
2. **Sphere flux** (:func:`sphere_flux`), the estimator of both official repositories
   (``JonathanBrok/Identifying-Memorization-of-Diffusion-Models-through-p-Laplace-Analysis``,
   ``p_laplace_core.py``; ``JonathanBrok/Tracking-Memorization-Geometry-throughout-the-Diffusion-Model-Generative-
   Process``, ``core/p_laplace.py``, ``compute_p_laplace_boundary_torch``): K points ``y_k = c + r n_k`` on a sphere
   of radius ``r = radius_factor·sqrt(d)`` around ``c`` (``n_k`` uniform unit normals), one batched field call, and
   ``flux = mean_k ‖F(y_k)‖^{p−2} <F(y_k), n_k>``. By the divergence theorem
   ``E[flux] = (r/d)·(mean of div(‖F‖^{p−2}F) over the ball)``, so ``(d/r)·flux → Δ_p`` as r → 0
   (:func:`p_laplacian_sphere`). No autograd; K forward passes.

   Where the two codes differ we follow the later (NeurReps) one: there the flux is ``‖F‖^{p−2}<F, n>`` for every
   p (its ``p != 2`` branch), the textbook p-Laplace flux. The SSVM code first divides ``<F, n>`` by ``‖F‖`` and
   then, for ``p != 1``, multiplies by ``‖F‖^{p−2}`` — i.e. ``‖F‖^{p−3}<F, n>``, off by ``1/‖F‖`` — but both
   agree at p = 1, the only value either paper's experiments use. Both codes cast F and n to float16 before the
   dot products; we compute them in ``dot_dtype`` (float32 by default, float64 for float64 inputs). Both draw the
   normals from the global RNG; we take a ``torch.Generator``. ``antithetic=True`` (ours, off by default) pairs
   every normal with its opposite, which cancels the zeroth-order term ``<F(c), n>`` and reduces the variance of
   ``(d/r)·flux`` at small r by orders of magnitude; the expectation is unchanged.

   In Stable Diffusion their code uses ``c = sqrt(ᾱ_t)·z0``, ``radius_factor = sqrt(1 − ᾱ_t)``, so
   ``y_k = sqrt(ᾱ_t) z0 + sqrt(1 − ᾱ_t)·(sqrt(d) n_k)``: a forward-noised copy of z0 with noise of typical norm
   (for any schedule ``y_k = α_t z0 + σ_t·(sqrt(d) n_k)``), and, with ``p = 1`` and the field ``ε_θ``, the
   criterion ``k = mean_k cos(ε_θ(y_k), n_k)``
   (:func:`noise_recovery_flux`): how well the model recovers the injected noise direction. Memorized (sharp)
   modes give *higher* k (≈ 1 for a perfect denoiser around a training point). SSVM: field = conditional ε,
   t = 10, K = 128; NeurReps ``k_δ``: field = ``ε_c − ε_u``, K = 16, along the generation trajectory. Since
   ``ε = −σ s``, ``flux(ε) = −σ^{p−1} flux(s)``: k is minus a scaled ``Δ_1 log p_t``.

Every function takes ``eps_fn``: ``x [B, ...] ↦ ε [B, ...]`` acting on each sample independently (e.g.
:meth:`mnemoguard.denoiser.Denoiser.eps_fn`, or a guidance difference). For a diffusers UNet on CPU, forward-mode AD
needs :func:`mnemoguard.denoiser.ad_safe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .hutchinson import Method, hutchinson_trace, jacobian_products, make_generator

__all__ = [
    "SpherePoints",
    "infinity_laplacian",
    "noise_recovery_flux",
    "p_laplacian_from_parts",
    "p_laplacian_hutchinson",
    "p_laplacian_sphere",
    "sphere_flux",
    "sphere_points",
]

EpsFn = Callable[[Tensor], Tensor]


def _check_p(p: float, *, allow_inf: bool) -> float:
    p = float(p)
    if math.isnan(p) or p < 1 or (math.isinf(p) and not allow_inf):
        allowed = "p >= 1 or math.inf" if allow_inf else "finite p >= 1 (the ∞-Laplacian is not a divergence)"
        raise ValueError(f"expected {allowed}; found p={p}")
    return p


def _check_batch(x: Tensor) -> None:
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"expected a non-empty batch [B, ...] with a coordinate axis; found {tuple(x.shape)}")


def _sigma_vec(sigma: float | Tensor, x: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if s.numel() not in (1, x.shape[0]) or (s <= 0).any():
        raise ValueError(f"sigma must be > 0, a scalar or one per sample ({x.shape[0]}); found {s.tolist()}")
    return s.expand(x.shape[0])


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.reshape(a.shape[0], -1) * b.reshape(b.shape[0], -1)).sum(1)


# ---------------------------------------------------------------------------------------------------- Hutchinson
def p_laplacian_from_parts(
    trace: Tensor, directional: Tensor, eps_norm: Tensor, sigma: float | Tensor, p: float
) -> Tensor:
    """Combine eps-space parts into ``Δ_p log p_t`` per sample.

    ``trace = tr J_e``, ``directional = eᵀJ_e e/‖e‖²``, ``eps_norm = ‖e‖``, all (B,). Returns
    ``‖s‖^{p−2}[tr J_s + (p − 2)·sᵀJ_s s/‖s‖²]`` with ``‖s‖ = ‖e‖/σ``, ``tr J_s = −trace/σ`` and
    ``sᵀJ_s s/‖s‖² = −directional/σ``; ``p = inf`` returns ``−directional/σ``.
    """
    p = _check_p(p, allow_inf=True)
    sigma = torch.as_tensor(sigma, dtype=trace.dtype, device=trace.device)
    if math.isinf(p):
        return -directional / sigma
    lap = -trace / sigma
    if p == 2:
        return lap
    return (eps_norm / sigma) ** (p - 2) * (lap - (p - 2) * directional / sigma)


def _directional(eps_fn: EpsFn, x: Tensor, e: Tensor, method: Method, fd_step: float) -> tuple[Tensor, Tensor]:
    """``eᵀJ_e e/‖e‖²`` (one Jacobian product along the unit eps direction) and ``‖e‖``, both (B,)."""
    norm = e.reshape(e.shape[0], -1).norm(dim=1)
    if (norm == 0).any():
        raise ValueError("eps is exactly zero for some sample: the score direction (p != 2) is undefined there")
    u = e / norm.reshape(-1, *([1] * (e.ndim - 1)))
    ju = jacobian_products(eps_fn, x, u[None], method=method, fd_step=fd_step)[0]
    return _flat_dot(u, ju), norm


def p_laplacian_hutchinson(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    sigma: float | Tensor,
    p: float = 2.0,
    num_probes: int = 16,
    generator: torch.Generator | int | None = None,
    method: Method = "jvp",
    fd_step: float = 1e-3,
    probe_batch: int | None = None,
) -> Tensor:
    """Hutchinson estimate of ``Δ_p log p_t(x) = div(‖s‖^{p−2} s)``, ``s = −eps_fn(x)/σ``, per sample (B,).

    ``tr J_e`` by :func:`~mnemoguard.signals.hutchinson.hutchinson_trace` (unbiased; std ∝ 1/sqrt(K)), the
    ``eᵀJ_e e`` term exactly by one extra Jacobian product along ``e`` (not needed for ``p = 2``); ``p = inf`` gives
    :func:`infinity_laplacian` (no probes). For p ≠ 2 the estimate is unbiased given the exact prefactor
    ``‖s‖^{p−2}``, which is computed once at x. ``sigma``: σ_t of the eps parameterisation, scalar or (B,).
    Cost: one forward, K JVPs (batched), +1 JVP when p ≠ 2. Brokman et al. (SSVM 2025) define the family; their code
    estimates it by sphere flux (:func:`p_laplacian_sphere`), not by Hutchinson.
    """
    p = _check_p(p, allow_inf=True)
    _check_batch(x)
    sig = _sigma_vec(sigma, x)
    if math.isinf(p):
        return infinity_laplacian(eps_fn, x, sigma=sigma, method=method, fd_step=fd_step)
    trace = hutchinson_trace(
        eps_fn, x, num_probes=num_probes, generator=generator, method=method, fd_step=fd_step, probe_batch=probe_batch
    )
    if p == 2:
        return -trace / sig
    with torch.no_grad():
        e = eps_fn(x.detach())
    directional, norm = _directional(eps_fn, x.detach(), e, method, fd_step)
    return p_laplacian_from_parts(trace.to(directional.dtype), directional, norm, sig, p)


def infinity_laplacian(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    sigma: float | Tensor,
    method: Method = "jvp",
    fd_step: float = 1e-3,
) -> Tensor:
    """Normalised ∞-Laplacian ``Δ_∞ log p_t = sᵀJ_s s/‖s‖² = −eᵀJ_e e/(σ‖e‖²)``, per sample (B,).

    The curvature of log p_t along the score direction: very negative when the density falls off sharply around the
    flow line (a narrow mode). Exact up to the Jacobian product: one forward and one JVP (or VJP, or two forwards for
    finite differences).
    """
    _check_batch(x)
    sig = _sigma_vec(sigma, x)
    with torch.no_grad():
        e = eps_fn(x.detach())
    directional, _ = _directional(eps_fn, x.detach(), e, method, fd_step)
    return -directional / sig


# ---------------------------------------------------------------------------------------------------- sphere flux
class SpherePoints(NamedTuple):
    """Points ``center + radius·normals`` and the unit normals, both ``[K, B, ...]``."""

    points: Tensor
    normals: Tensor


def sphere_points(
    center: Tensor,
    radius: float | Tensor,
    num_points: int,
    *,
    generator: torch.Generator | int | None = None,
    antithetic: bool = False,
) -> SpherePoints:
    """K uniform points on the sphere of radius ``radius`` around each sample of ``center`` ``[B, ...]``.

    Normals ``n = g/‖g‖``, ``g ~ N(0, I_d)`` per (k, b), drawn on the generator's device in float32 (as the authors'
    code) or float64 for float64 centers, then moved. ``antithetic`` uses ``n_1..n_{K/2}`` and their opposites
    (K must be even). ``radius``: scalar or one per sample.
    """
    _check_batch(center)
    if num_points < 1 or (antithetic and num_points % 2):
        raise ValueError(f"num_points must be >= 1 (and even when antithetic); found {num_points}")
    g = make_generator(generator)
    draw_dtype = torch.float64 if center.dtype == torch.float64 else torch.float32
    k = num_points // 2 if antithetic else num_points
    gauss = torch.randn((k, *center.shape), generator=g, device=g.device, dtype=draw_dtype)
    flat = gauss.reshape(k, center.shape[0], -1)
    normals = (flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(gauss.shape)
    if antithetic:
        normals = torch.cat([normals, -normals])
    normals = normals.to(device=center.device, dtype=center.dtype)
    r = torch.as_tensor(radius, dtype=center.dtype, device=center.device).reshape(-1)
    if r.numel() not in (1, center.shape[0]) or (r <= 0).any():
        raise ValueError(f"radius must be > 0, a scalar or one per sample ({center.shape[0]}); found {r.tolist()}")
    r = r.reshape(1, -1, *([1] * (center.ndim - 1)))
    return SpherePoints(center[None] + r * normals, normals)


def sphere_flux(
    field_fn: EpsFn,
    center: Tensor,
    *,
    radius: float | Tensor,
    p: float = 1.0,
    num_points: int = 128,
    generator: torch.Generator | int | None = None,
    antithetic: bool = False,
    point_batch: int | None = None,
    dot_dtype: torch.dtype | None = None,
) -> Tensor:
    """Brokman et al.'s boundary flux ``mean_k ‖F(y_k)‖^{p−2} <F(y_k), n_k>`` on a sphere of radius r, (B,).

    ``y_k = center + r n_k`` (see :func:`sphere_points`); ``F = field_fn`` is called on the ``[K·B, ...]`` stack
    (probe-major: row ``k·B + b``, the layout :meth:`~mnemoguard.denoiser.Denoiser.eps_fn` tiles conditioning for),
    in chunks of ``point_batch`` points per sample. The authors' code passes ``radius = radius_factor·sqrt(d)``.
    Divergence theorem: ``E[flux] = (r/d)·mean_{ball}(div ‖F‖^{p−2}F)``. No autograd (runs under ``no_grad``).
    """
    p = _check_p(p, allow_inf=False)
    pts = sphere_points(center, radius, num_points, generator=generator, antithetic=antithetic)
    k_total, b = pts.points.shape[:2]
    chunk = k_total if point_batch is None else int(point_batch)
    if chunk < 1:
        raise ValueError(f"point_batch must be >= 1 or None; found {point_batch}")
    if dot_dtype is None:
        dot_dtype = torch.float64 if center.dtype == torch.float64 else torch.float32
    total = torch.zeros(b, dtype=dot_dtype, device=center.device)
    with torch.no_grad():
        for start in range(0, k_total, chunk):
            y = pts.points[start : start + chunk]
            k = y.shape[0]
            f = field_fn(y.reshape(k * b, *center.shape[1:]))
            if f.shape != (k * b, *center.shape[1:]):
                raise ValueError(
                    f"field_fn must map [N, ...] to the same shape; input {(k * b, *center.shape[1:])}, "
                    f"output {tuple(f.shape)}"
                )
            f = f.reshape(k, b, -1).to(dot_dtype)
            n = pts.normals[start : start + chunk].reshape(k, b, -1).to(dot_dtype)
            dots = (f * n).sum(-1)
            if p != 2:
                dots = dots * f.norm(dim=-1).clamp_min(1e-30) ** (p - 2)
            total += dots.sum(0)
    return total / k_total


def p_laplacian_sphere(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    sigma: float | Tensor,
    radius: float | Tensor,
    p: float = 1.0,
    num_points: int = 128,
    generator: torch.Generator | int | None = None,
    antithetic: bool = True,
    point_batch: int | None = None,
) -> Tensor:
    """Sphere-flux estimate of ``Δ_p log p_t(x)`` (B,): ``(d/r)·flux`` of the score field ``s = −eps_fn/σ``.

    ``= −(d/r)·σ^{1−p}·flux(eps_fn)``; a ball average of ``Δ_p`` of radius r (bias O(r²)), not a point value.
    Antithetic normals by default here (unlike :func:`sphere_flux`) because at small r the plain estimator's
    variance grows like ``d‖F‖²/(r²K)``. K forward passes, no autograd.
    """
    _check_batch(x)
    sig = _sigma_vec(sigma, x)
    r = torch.as_tensor(radius, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
    d = x[0].numel()
    flux = sphere_flux(
        eps_fn,
        x,
        radius=radius,
        p=p,
        num_points=num_points,
        generator=generator,
        antithetic=antithetic,
        point_batch=point_batch,
    )
    return -(d / r.to(flux.dtype)) * sig.to(flux.dtype) ** (1 - p) * flux


def noise_recovery_flux(
    eps_fn: EpsFn,
    z0: Tensor,
    alpha_bar: float | Tensor | None = None,
    *,
    alpha: float | Tensor | None = None,
    sigma: float | Tensor | None = None,
    p: float = 1.0,
    num_points: int = 128,
    generator: torch.Generator | int | None = None,
    point_batch: int | None = None,
    dot_dtype: torch.dtype | None = None,
) -> Tensor:
    """Brokman et al.'s SD criterion k (SSVM 2025) / ``k_δ`` (NeurReps 2025), per sample (B,).

    ``k = mean_k ‖ε̂(y_k)‖^{p−2} <ε̂(y_k), n_k>`` at ``y_k = α_t z0 + σ_t·sqrt(d)·n_k`` — for p = 1 the mean cosine
    between the predicted and the injected noise. Higher = sharper mode = memorized. ``α_t = sqrt(ᾱ)``,
    ``σ_t = sqrt(1 − ᾱ)`` from ``alpha_bar`` (their SD setting); or, with ``alpha_bar=None``, the keyword-only
    ``alpha`` (>= 0) and ``sigma`` (> 0) of any schedule ``x_t = α_t x0 + σ_t ε`` (flow matching: ``α = 1 − σ``), a
    scalar or one per sample each. Their settings: SSVM ``eps_fn`` = conditional ε, ᾱ at t = 10, K = 128; NeurReps
    ``eps_fn`` = ``ε_c − ε_u``, K = 16, at each saved step of a generation (z0 = the decoded and re-encoded latent).
    ``z0``: clean latents [B, ...] (VAE-scaled).
    """
    _check_batch(z0)
    d = z0[0].numel()
    if alpha_bar is not None:
        if alpha is not None or sigma is not None:
            raise ValueError("pass either alpha_bar (DDPM) or alpha= and sigma=, not both")
        a = torch.as_tensor(alpha_bar, dtype=z0.dtype, device=z0.device).reshape(-1)
        if (a <= 0).any() or (a >= 1).any():
            raise ValueError(f"alpha_bar must lie strictly inside (0, 1); found {a.tolist()}")
        scale, noise = a.sqrt(), (1 - a).sqrt()
    elif alpha is None or sigma is None:
        raise ValueError("pass alpha_bar (DDPM's ᾱ_t) or both alpha= and sigma= (x_t = α x0 + σ ε, any schedule)")
    else:
        scale = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(-1)
        noise = torch.as_tensor(sigma, dtype=z0.dtype, device=z0.device).reshape(-1)
        if (scale < 0).any() or (noise <= 0).any():
            raise ValueError(f"need alpha >= 0 and sigma > 0; found alpha {scale.tolist()}, sigma {noise.tolist()}")
    for name, v in (("alpha", scale), ("sigma", noise)):
        if v.numel() not in (1, z0.shape[0]):
            raise ValueError(f"{name} must be a scalar or one per sample ({z0.shape[0]}); found {v.numel()} values")
    center = scale.reshape(-1, *([1] * (z0.ndim - 1))) * z0
    radius = noise * math.sqrt(d)
    return sphere_flux(
        eps_fn,
        center,
        radius=radius,
        p=p,
        num_points=num_points,
        generator=generator,
        point_batch=point_batch,
        dot_dtype=dot_dtype,
    )
