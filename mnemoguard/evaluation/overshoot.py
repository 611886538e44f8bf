r"""Overshoot-aware copy check: guidance pushes copies past the training image (Kim, Kim & Lee, Cor. 3).

With guidance :math:`w` a memorized prediction lands near :math:`\mu + w(x^* - \mu)`, past the training image, so
distances (and the nearest-neighbour ratio of :mod:`.nearest_neighbour`) grow while the direction :math:`x^* - \mu`
is kept. Images are ``[N, ...]`` tensors (numpy arrays are accepted too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import ArrayLike, as_tensor, check_finite

__all__ = ["OvershootAlignment", "overshoot_alignment", "overshoot_memorized"]


@dataclass(frozen=True)
class OvershootAlignment:
    r"""Result of :func:`overshoot_alignment`.

    Attributes:
        cosine: ``[N]`` :math:`\cos\angle(\hat x_0 - \mu,\; x^* - \mu)`.
        coefficient: ``[N]`` least-squares scale :math:`a` in :math:`\hat x_0 - \mu \approx a (x^* - \mu)`.
    """

    cosine: torch.Tensor
    coefficient: torch.Tensor


@torch.no_grad()
def overshoot_alignment(
    generated: ArrayLike, targets: ArrayLike, mean: ArrayLike, *, dtype: torch.dtype = torch.float64
) -> OvershootAlignment:
    r"""Direction and scale of each generated image relative to its paired training image, about the data mean.

    With :math:`u = \hat x_0 - \mu` and :math:`v = x^* - \mu` (flattened),

    .. math::
        \cos = \frac{\langle u, v\rangle}{\lVert u\rVert\,\lVert v\rVert}, \qquad
        a = \frac{\langle u, v\rangle}{\lVert v\rVert^2}.

    Kim, Kim & Lee ("How Diffusion Models Memorize", Cor. 3) show that for a memorized pair the guided
    prediction tends to :math:`\mu + w(x^* - \mu)` with guidance :math:`w`: the copy overshoots the training
    image by :math:`w`, so :math:`a \approx w` and :math:`\cos \approx 1` while :math:`\lVert \hat x_0 - x^*\rVert`
    (and the nearest-neighbour ratio) can be large. Clipping to the pixel range shrinks :math:`a` but keeps the
    direction roughly. Their guidance-overshoot coefficient is this :math:`a` averaged over seeds.

    Args:
        generated: ``[N, ...]`` generated images (or first-step :math:`\hat x_0` predictions).
        targets: ``[N, ...]`` the training image paired with each generation's caption.
        mean: the data mean :math:`\mu`, shape ``[...]`` (one image) or ``[N, ...]``.

    Raises:
        ValueError: shape mismatches, or a zero vector (:math:`x^* = \mu` or :math:`\hat x_0 = \mu`), for which
            the direction is undefined.
    """
    g = as_tensor(generated, "generated")
    x = as_tensor(targets, "targets")
    mu = as_tensor(mean, "mean")
    for name, tns in (("generated", g), ("targets", x), ("mean", mu)):
        if tns.dtype == torch.bool:
            raise TypeError(f"{name} must hold pixel values, not booleans")
        check_finite(tns, name)
    if g.ndim < 2 or g.shape != x.shape:
        raise ValueError(
            f"generated and targets must both be [N, ...] with the same shape; got {tuple(g.shape)} and "
            f"{tuple(x.shape)}"
        )
    if mu.shape != g.shape[1:] and mu.shape != g.shape:
        raise ValueError(
            f"mean must have shape {tuple(g.shape[1:])} (one image) or {tuple(g.shape)}; got {tuple(mu.shape)}"
        )
    device = g.device
    u = (g.to(dtype) - mu.to(device=device, dtype=dtype)).reshape(g.shape[0], -1)
    v = (x.to(device=device, dtype=dtype) - mu.to(device=device, dtype=dtype)).reshape(g.shape[0], -1)
    nu, nv = u.norm(dim=1), v.norm(dim=1)
    if bool((nv == 0).any()):
        bad = torch.nonzero(nv == 0).flatten().tolist()
        raise ValueError(f"targets {bad[:10]} equal the mean: the direction x* - mu is undefined")
    if bool((nu == 0).any()):
        bad = torch.nonzero(nu == 0).flatten().tolist()
        raise ValueError(f"generated {bad[:10]} equal the mean: the direction x0 - mu is undefined")
    dot = (u * v).sum(1)
    return OvershootAlignment(cosine=dot / (nu * nv), coefficient=dot / (nv * nv))


def overshoot_memorized(
    generated: ArrayLike,
    targets: ArrayLike,
    mean: ArrayLike,
    *,
    cosine_threshold: float = 0.9,
    min_coefficient: float | None = None,
) -> torch.Tensor:
    r"""Overshoot-aware copy check: :math:`\cos\angle(\hat x_0-\mu, x^*-\mu) \ge c` (and :math:`a \ge a_\min`).

    A complement to the nearest-neighbour ratio at guidance :math:`w > 1`, where copies overshoot the training
    image (see :func:`overshoot_alignment`). The default :math:`c = 0.9` is this project's choice, not a value
    from the literature: calibrate it against
    :func:`~mnemoguard.evaluation.nearest_neighbour.nearest_neighbour_ratio` at :math:`w = 1` on your data.
    ``min_coefficient`` (off by default) additionally requires a scale :math:`a \ge a_\min`, which rejects faint
    images that merely point the same way.

    Returns:
        ``[N]`` bool.
    """
    if not -1.0 <= cosine_threshold <= 1.0:
        raise ValueError(f"cosine_threshold must be in [-1, 1]; got {cosine_threshold!r}")
    res = overshoot_alignment(generated, targets, mean)
    flags = res.cosine >= cosine_threshold
    if min_coefficient is not None:
        flags = flags & (res.coefficient >= min_coefficient)
    return flags
