"""Hutchinson estimators of a Jacobian's diagonal and trace, with the Rademacher probes batched.

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

References: Hutchinson (1989); Bekas, Kokiopoulou & Saad (2007); Kim & Lee, "Localizing Memorized Regions in
Diffusion Models via Coordinate-Wise Curvature Differences", ICML 2026 (code: github.com/Gwangho99/mem-curv-diff,
``utils/metric_utils.py``), whose maps (:mod:`.curvature`) are built on these estimators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Method",
    "hutchinson_diagonal",
    "hutchinson_samples",
    "hutchinson_trace",
    "jacobian_products",
    "make_generator",
    "rademacher_probes",
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
