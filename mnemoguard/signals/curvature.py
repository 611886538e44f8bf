"""Coordinate-wise curvature of the learned log-density: Hutchinson estimators and Kim & Lee's maps.

Every estimator takes ``fn: Callable[[Tensor], Tensor]``, a map from a batch ``x`` ``[B, ...]`` to a batch of the
same shape (an eps-prediction at a fixed timestep and conditioning, or a difference of two), and shares one
signature (k-diffusion style)::

    estimator(fn, x, *, num_probes=16, generator=None, method="vjp" | "jvp" | "fd", fd_step=1e-3, probe_batch=None)

so the same code runs on analytic Gaussian mixtures and on a diffusers UNet
(:meth:`mnemoguard.denoiser.Denoiser.eps_fn`, :meth:`~mnemoguard.denoiser.Denoiser.guidance_fn`).

The K Rademacher probes are BATCHED instead of looped over as in the papers' code:

- ``vjp`` (default): one forward pass with a graph on the K stacked copies, one backward pass with the K probes as
  cotangents. Same probes, same numbers as Kim & Lee's loop of K ``retain_graph`` backward calls; works with the
  default SDPA attention (first-order backward only).
- ``jvp``: one ``torch.func.jvp`` on the K stacked copies (forward mode, no graph kept: the least memory). Needs
  :func:`mnemoguard.denoiser.ad_safe` around a diffusers UNet (fused SDPA kernels have no forward derivative).
- ``fd``: one no-grad forward pass on the 2K points ``x +- h v_k`` (central differences, no AD at all).

Stacking assumes ``fn`` treats each sample independently (true for a UNet in eval mode, not for train-mode
BatchNorm). ``probe_batch`` bounds how many probes go into one call (memory). Gradients are taken with respect to
``x`` only: the parameters' ``.grad`` is never touched.

Why stack copies rather than keep one forward and vmap the backward (``autograd.grad(is_grads_batched=True)``): on
the diffusers UNet, PyTorch runs the vmapped convolution and attention backward as a per-probe loop (561
``convolution_backward`` calls for 35 convolutions x 16 probes in a profile), so it is no faster than the sequential
loop, whereas stacked copies give every kernel a K-times larger batch.

Reference: Kim & Lee, "Localizing Memorized Regions in Diffusion Models via Coordinate-Wise Curvature
Differences", ICML 2026 (code: github.com/Gwangho99/mem-curv-diff, ``utils/metric_utils.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

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

Method = Literal["jvp", "vjp", "fd"]
_METHODS = ("jvp", "vjp", "fd")


# ---------------------------------------------------------------------------------------------------- probes
def make_generator(generator: torch.Generator | int | None = None) -> torch.Generator:
    """A ``torch.Generator`` from a generator (returned as is), an int seed, or ``None`` (seed 0).

    The global RNG is never used: with ``None`` the probes are the same on every call.
    """
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = 0
    if not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, found {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


def rademacher_probes(
    x: Tensor, num_probes: int, generator: torch.Generator | int | None = None
) -> Tensor:
    """K Rademacher (+-1, equiprobable) probes shaped like ``x``: ``[K, *x.shape]`` on ``x``'s device and dtype.

    Drawn on the generator's device and moved, so a CPU generator gives the same probes on every device.
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, found {num_probes}")
    g = make_generator(generator)
    bits = torch.randint(0, 2, (num_probes, *x.shape), generator=g, device=g.device, dtype=torch.int8)
    return (bits.to(device=x.device, dtype=x.dtype) * 2 - 1).contiguous()


# ---------------------------------------------------------------------------------------------------- products
def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, *t.shape[2:])


def _check_output(y: Tensor, x: Tensor) -> None:
    if y.shape != x.shape:
        raise ValueError(
            f"fn must map a batch to a batch of the same shape (a square Jacobian); input {tuple(x.shape)}, "
            f"output {tuple(y.shape)}"
        )


def _jvp(fn: Callable[[Tensor], Tensor], x_rep: Tensor, v: Tensor) -> Tensor:
    try:
        y, jv = torch.func.jvp(fn, (x_rep,), (v,))
    except (NotImplementedError, RuntimeError) as err:
        msg = str(err)
        if "forward AD" in msg or "scaled_dot_product" in msg or "not implemented" in msg:
            raise RuntimeError(
                "forward-mode AD failed inside fn; for a diffusers UNet wrap the call in "
                "`with mnemoguard.denoiser.ad_safe(unet):` (or Denoiser.ad_safe()), or use method='vjp' / 'fd'. "
                f"Original error: {msg}"
            ) from err
        raise
    _check_output(y, x_rep)
    return jv


def _vjp(fn: Callable[[Tensor], Tensor], x_rep: Tensor, v: Tensor) -> Tensor:
    with torch.enable_grad():
        xg = x_rep.detach().requires_grad_(True)
        y = fn(xg)
        _check_output(y, xg)
        if not y.requires_grad:
            raise ValueError("fn's output does not depend on x through autograd; method='vjp' needs a differentiable "
                             "fn (or use method='fd')")
        (g,) = torch.autograd.grad(y, xg, grad_outputs=v)
    return g


def _fd(fn: Callable[[Tensor], Tensor], x_rep: Tensor, v: Tensor, step: float) -> Tensor:
    with torch.no_grad():
        y = fn(torch.cat([x_rep + step * v, x_rep - step * v]))
        if y.shape[0] != 2 * x_rep.shape[0] or y.shape[1:] != x_rep.shape[1:]:
            _check_output(y, torch.cat([x_rep, x_rep]))
        y_plus, y_minus = y.chunk(2)
        return (y_plus - y_minus) / (2 * step)


def jacobian_products(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    probes: Tensor,
    *,
    method: Method = "vjp",
    fd_step: float = 1e-3,
    probe_batch: int | None = None,
) -> Tensor:
    """Per-sample Jacobian products with K probes, batched: ``[K, *x.shape]``.

    ``vjp``: :math:`J^\\top v_k`, one forward + one backward on K stacked copies of ``x`` (exact); ``jvp``:
    :math:`J v_k` by ``torch.func.jvp`` on the stacked copies (forward mode, exact); ``fd``:
    :math:`(f(x + h v_k) - f(x - h v_k)) / 2h`, central differences, error :math:`O(h^2)` plus round-off
    :math:`O(\\epsilon_{mach}/h)` (one no-grad forward on 2K copies). Here J is the per-sample Jacobian
    :math:`\\partial\\, \\text{fn}(x)_b / \\partial x_b`. ``probes`` is ``[K, *x.shape]``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, found {method!r}")
    if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape [K, *x.shape] = [K, {', '.join(map(str, x.shape))}], "
                         f"found {tuple(probes.shape)}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a non-empty batch [B, ...], found shape {tuple(x.shape)}")
    if method == "fd" and not fd_step > 0:
        raise ValueError(f"fd_step must be > 0, found {fd_step}")
    K = probes.shape[0]
    chunk = K if probe_batch is None else int(probe_batch)
    if chunk < 1:
        raise ValueError(f"probe_batch must be >= 1 or None, found {probe_batch}")
    x = x.detach()
    out = []
    for start in range(0, K, chunk):
        v = probes[start : start + chunk]
        k = v.shape[0]
        x_rep = x.repeat(k, *([1] * (x.ndim - 1)))
        v_flat = _flat(v)
        if method == "jvp":
            prod = _jvp(fn, x_rep, v_flat)
        elif method == "vjp":
            prod = _vjp(fn, x_rep, v_flat)
        else:
            prod = _fd(fn, x_rep, v_flat, fd_step)
        out.append(prod.detach().reshape(k, *x.shape))
    return torch.cat(out)


def hutchinson_samples(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    num_probes: int = 16,
    generator: torch.Generator | int | None = None,
    method: Method = "vjp",
    fd_step: float = 1e-3,
    probe_batch: int | None = None,
) -> Tensor:
    """The K single-probe Hutchinson terms :math:`v_k \\odot J v_k` (or :math:`v_k \\odot J^\\top v_k`),
    ``[K, *x.shape]``; their mean is :func:`hutchinson_diagonal`. Useful for standard errors."""
    probes = rademacher_probes(x, num_probes, generator)
    prods = jacobian_products(fn, x, probes, method=method, fd_step=fd_step, probe_batch=probe_batch)
    return probes * prods


def hutchinson_diagonal(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    num_probes: int = 16,
    generator: torch.Generator | int | None = None,
    method: Method = "vjp",
    fd_step: float = 1e-3,
    probe_batch: int | None = None,
) -> Tensor:
    """Hutchinson estimate of the Jacobian diagonal of ``fn`` at ``x`` (Bekas, Kokiopoulou & Saad 2007).

    .. math::

        \\widehat{\\operatorname{diag}}(J) = \\frac{1}{K} \\sum_{k=1}^{K} v_k \\odot J v_k, \\qquad
        v_k \\sim \\text{Rademacher}, \\quad \\mathbb{E}[v \\odot J v] = \\operatorname{diag}(J)

    (``vjp`` uses :math:`J^\\top v_k`, same expectation, as Kim & Lee's code). Unbiased, standard error
    :math:`\\propto 1/\\sqrt{K}`; for Rademacher probes the variance of coordinate i is
    :math:`\\sum_{j \\ne i} J_{ij}^2 / K`. Returns a tensor shaped like ``x``.
    """
    s = hutchinson_samples(
        fn, x, num_probes=num_probes, generator=generator, method=method, fd_step=fd_step, probe_batch=probe_batch
    )
    # accumulate in at least float32 (fp16 / bf16 inputs), keep float64 inputs in float64
    return s.to(torch.promote_types(s.dtype, torch.float32)).mean(dim=0).to(x.dtype)


def hutchinson_trace(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    num_probes: int = 16,
    generator: torch.Generator | int | None = None,
    method: Method = "vjp",
    fd_step: float = 1e-3,
    probe_batch: int | None = None,
) -> Tensor:
    """Hutchinson estimate of the per-sample Jacobian trace (divergence) of ``fn`` at ``x``, ``[B]``.

    .. math::

        \\widehat{\\operatorname{tr}}(J) = \\frac{1}{K} \\sum_{k} v_k^\\top J v_k, \\qquad
        \\operatorname{Var} = \\frac{2}{K} \\sum_{i \\ne j} \\Big(\\frac{J_{ij} + J_{ji}}{2}\\Big)^2

    (Hutchinson 1989). With the same probes the JVP and VJP estimates are identical, since
    :math:`v^\\top J v = v^\\top J^\\top v`. For the score ``-eps/sigma`` this is the Laplacian of log p_t.
    """
    d = hutchinson_diagonal(
        fn, x, num_probes=num_probes, generator=generator, method=method, fd_step=fd_step, probe_batch=probe_batch
    )
    return d.to(torch.promote_types(d.dtype, torch.float32)).reshape(d.shape[0], -1).sum(dim=1).to(x.dtype)


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
