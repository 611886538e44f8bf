r"""Template-verbatim copies: a squared distance restricted to a template mask (Webster 2023; Kim & Lee, ICML 2026).

A generation reproduces a template when the masked squared distance :math:`D(g, t, m)` to it falls below
:math:`\tau` (Kim & Lee's ground-truth pipeline, ``gather_groundtruth_labels.py``). Images are ``[N, C, H, W]``
tensors (numpy arrays are accepted too).
"""

from __future__ import annotations

import torch

from ._checks import ArrayLike, as_tensor, check_finite, check_range

__all__ = ["KIM_LEE_TV_THRESHOLD", "masked_sq_distance", "template_verbatim"]

#: Kim & Lee / Webster template-verbatim threshold on the masked distance (pixels in [0, 1], 256x256x3).
KIM_LEE_TV_THRESHOLD: float = 2.5e3


def _as_images(x: ArrayLike, name: str) -> torch.Tensor:
    t = as_tensor(x, name)
    if t.dtype == torch.bool:
        raise TypeError(f"{name} must hold pixel values, not booleans")
    if t.ndim != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W]; got {tuple(t.shape)}")
    check_finite(t, name)
    return t


@torch.no_grad()
def masked_sq_distance(
    generated: ArrayLike,
    templates: ArrayLike,
    masks: ArrayLike,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    r"""Masked squared distance of every generated image to every template (Webster 2023; Kim & Lee 2026).

    For a generated image :math:`g`, a template :math:`t` and its mask :math:`m` (1 on the template's fixed
    region, 0 on its variable region), over all :math:`D = CHW` pixel entries,

    .. math::
        D(g, t, m) = \frac{\sum_{p} \left(m_p t_p - m_p g_p\right)^2}{\tfrac{1}{D}\sum_p m_p}
                   = D \cdot \frac{\sum_p m_p^2 (t_p - g_p)^2}{\sum_p m_p},

    i.e. the squared distance restricted to the mask, scaled up to the whole image (for a binary mask it is
    :math:`D` times the mean squared error inside the mask). This is the template-verbatim test of Kim & Lee's
    ground-truth pipeline (``gather_groundtruth_labels.py``): generated images and templates resized to
    256x256, pixels in [0, 1], match when :math:`D < 2.5\cdot 10^3`.

    Computed by the same expansion as
    :func:`~mnemoguard.evaluation.nearest_neighbour.nearest_neighbour_distances` (memory :math:`O((N + M) D)`).

    Args:
        generated: ``[N, C, H, W]``.
        templates: ``[M, C, H, W]``.
        masks: ``[M, H, W]``, ``[M, 1, H, W]`` or ``[M, C, H, W]``, values in [0, 1] (bool allowed). A mask is
            broadcast over channels when it has one; the mean in the denominator is over the broadcast mask.

    Returns:
        ``[N, M]`` distances.

    Raises:
        ValueError: shape mismatches, mask values outside [0, 1], or an all-zero mask (the distance would divide
            by zero: there is no region to compare).
    """
    g = _as_images(generated, "generated")
    t = _as_images(templates, "templates")
    m = as_tensor(masks, "masks")
    if g.shape[1:] != t.shape[1:]:
        raise ValueError(
            f"generated and templates must share [C, H, W]; got {tuple(g.shape[1:])} and {tuple(t.shape[1:])}"
        )
    c, h, w = t.shape[1:]
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[0] != t.shape[0] or m.shape[2:] != (h, w) or m.shape[1] not in (1, c):
        raise ValueError(
            f"masks must have shape [M, H, W], [M, 1, H, W] or [M, C, H, W] with M={t.shape[0]}, C={c}, "
            f"H={h}, W={w}; got {tuple(as_tensor(masks, 'masks').shape)}"
        )
    m = m.to(dtype)
    check_finite(m, "masks")
    check_range(m, "masks", 0.0, 1.0)
    m = m.expand(-1, c, -1, -1).reshape(t.shape[0], -1)
    mask_mean = m.mean(1)
    if bool((mask_mean == 0).any()):
        empty = torch.nonzero(mask_mean == 0).flatten().tolist()
        raise ValueError(f"masks {empty[:10]} are all zero: the masked distance has no region to compare")
    device = g.device
    gf = g.reshape(g.shape[0], -1).to(dtype)
    tf = t.reshape(t.shape[0], -1).to(device=device, dtype=dtype)
    w2 = (m * m).to(device)
    # sum_p w_p (t_p - g_p)^2 = sum w t^2 - 2 g . (w t) + (g^2) . w
    sq = (w2 * tf * tf).sum(1)[None, :] - 2.0 * gf @ (w2 * tf).T + (gf * gf) @ w2.T
    sq = sq.clamp_min(0.0)
    return sq / mask_mean.to(device)[None, :]


def template_verbatim(
    generated: ArrayLike,
    templates: ArrayLike,
    masks: ArrayLike,
    threshold: float = KIM_LEE_TV_THRESHOLD,
) -> torch.Tensor:
    r"""Template-verbatim matches: :math:`D(g, t, m) < \tau` (Kim & Lee 2026, after Webster 2023).

    :math:`D` is :func:`masked_sq_distance`; :math:`\tau = 2.5\cdot 10^3` is calibrated for 256x256x3 images in
    [0, 1] (it equals a masked mean squared error of :math:`2500/196608 \approx 0.0127`). At another resolution
    keep the masked MSE fixed: :math:`\tau' = \tau\,C'H'W'/196608`. Pixels must lie in [0, 1]; nothing is rescaled.

    Returns:
        ``[N, M]`` bool: generated image ``i`` reproduces template ``j`` on its mask.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive; got {threshold!r}")
    g = _as_images(generated, "generated")
    t = _as_images(templates, "templates")
    check_range(g, "generated", 0.0, 1.0)
    check_range(t, "templates", 0.0, 1.0)
    return masked_sq_distance(g, t, masks) < threshold
