"""One-step self-return: does one denoising step from a noised training image land on that image?

For a training image :math:`x_i` (latents as the network sees them), fixed noise :math:`\\varepsilon` and a noise
level :math:`t` with :math:`x_t = \\alpha_t x_i + \\sigma_t \\varepsilon`, the model's clean-sample estimate
:math:`\\hat x_0 = \\hat x_0(x_t, t, c_i)` under the image's own caption is compared with the training set
:math:`\\{x_k\\}`:

.. math::

    \\rho_i(t) = \\frac{\\lVert \\hat x_0 - x_i \\rVert}{\\min_{k:\\, x_k \\neq x_i} \\lVert \\hat x_0 - x_k \\rVert},
    \\qquad s_i = \\operatorname{mean}_t\\, \\big(-\\log \\rho_i(t)\\big).

A memorized image comes back as itself (:math:`\\rho \\ll 1`, large :math:`s`); a generalizing model returns a
blurred posterior mean, as near its neighbours as the image itself (:math:`\\rho \\approx 1`, :math:`s \\approx 0`).
This is Gu et al.'s nearest-neighbour ratio (TMLR 2025) read on a one-step denoiser output instead of a finished
generation, at the noise levels of Dodson et al.'s danger zone (2026), where the posterior is still concentrated
and a memorizing denoiser snaps onto its training point: one network call per image and level, what makes it
affordable for every training image (the multi-step return test of :mod:`mnemoguard.callbacks.danger_zone` costs a
sampler pass per start). Copies of :math:`x_i` in the set are not its neighbours (``identical``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["self_return_ratio", "self_return_score"]


def self_return_ratio(x0_hat: Tensor, reference: Tensor, own: Tensor, identical: Tensor | None = None,
                      chunk_size: int = 1024) -> Tensor:
    """``ρ`` per row (module docstring): ``x0_hat`` ``[N, ...]``, ``reference`` ``[M, ...]`` (the training
    images), ``own`` ``[N]`` the row of each image in ``reference``; ``identical`` ``[N, M]`` bool marks further
    references equal to row ``n``'s own image (excluded from the neighbours, like ``own`` itself). Float64."""
    q = x0_hat.reshape(x0_hat.shape[0], -1).double()
    ref = reference.reshape(reference.shape[0], -1).double().to(q.device)
    if ref.shape[0] < 2:
        raise ValueError(f"self_return_ratio needs at least 2 reference images, found {ref.shape[0]}")
    own = torch.as_tensor(own, dtype=torch.long, device=q.device)
    out = torch.empty(q.shape[0], dtype=torch.float64, device=q.device)
    for lo in range(0, q.shape[0], chunk_size):
        rows = slice(lo, lo + chunk_size)
        d = torch.cdist(q[rows], ref)
        d_own = d.gather(1, own[rows, None])[:, 0]
        mask = torch.zeros_like(d, dtype=torch.bool)
        mask.scatter_(1, own[rows, None], True)
        if identical is not None:
            mask |= identical[rows].to(mask.device)
        d_other = d.masked_fill(mask, float("inf")).min(dim=1).values
        out[rows] = d_own / d_other.clamp_min(1e-300)
    return out


def self_return_score(ratios: Tensor) -> Tensor:
    """``s = mean_t(−log ρ(t))`` over the levels along dim 0 of ``ratios`` ``[L, N]`` (larger: memorized)."""
    return (-ratios.clamp_min(1e-12).log()).mean(dim=0)
