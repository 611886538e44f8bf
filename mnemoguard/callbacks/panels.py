"""Probe panels: per generated probe, ``generation | nearest training image | curvature-difference map``, labelled.

One rendering for the TensorBoard images tab and the report's ``generations.png`` (matplotlib's Agg canvas, no
pyplot state). Small images are enlarged with nearest-neighbour interpolation so a 16-pixel generation is readable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["colorize", "probe_figure", "probe_panels", "figure_to_array"]


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in [0, 1] -> 3 channels (grey repeated; extra channels dropped)."""
    if images.shape[1] == 1:
        return images.repeat(1, 3, 1, 1)
    return images[:, :3]


def colorize(maps: torch.Tensor, colormap: str = "inferno") -> torch.Tensor:
    """``[N, H, W]`` non-negative maps -> ``[N, 3, H, W]`` colours: ``log1p``, then one min-max over all maps (as
    Kim & Lee normalise a whole evaluated set, so the panels are comparable), then a matplotlib colormap."""
    import matplotlib

    m = torch.log1p(maps.float().clamp_min(0))
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    rgba = matplotlib.colormaps[colormap](m.numpy())
    return torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(0, 3, 1, 2).float()


def probe_panels(vis: dict[str, Any], min_size: int = 96, colormap: str = "inferno") -> torch.Tensor | None:
    """``[G, 3, H, 3W]``: generation | nearest training image | curvature-difference map, per generated probe,
    enlarged (nearest neighbour) to at least ``min_size`` pixels high; None without generations."""
    from ..signals import upsample_map

    gen = vis.get("generations")
    if gen is None or gen.numel() == 0:
        return None
    gen = _rgb(gen.float().clamp(0, 1))
    H, W = gen.shape[-2:]
    nearest = vis.get("nearest")
    nearest = _rgb(nearest.float().clamp(0, 1)) if nearest is not None else torch.zeros_like(gen)
    maps = vis.get("maps")
    if maps is not None:
        maps = maps.float()
        heat = colorize(upsample_map(maps, (H, W)) if tuple(maps.shape[-2:]) != (H, W) else maps, colormap)
    else:
        heat = torch.zeros_like(gen)
    panel = torch.cat([gen, nearest, heat], dim=-1)
    scale = max(1, -(-min_size // max(H, 1)))
    if scale > 1:
        panel = F.interpolate(panel, scale_factor=scale, mode="nearest")
    return panel.clamp(0, 1)


def _label(vis: dict[str, Any], i: int, copy_ratio: float) -> str:
    ratio = vis["nn_ratio"][i] if i < len(vis.get("nn_ratio", [])) else float("nan")
    own = vis["nearest_is_own"][i] if i < len(vis.get("nearest_is_own", [])) else None
    caption = str(vis["captions"][i])
    caption = caption if len(caption) <= 60 else caption[:57] + "..."
    verdict = "COPY" if np.isfinite(ratio) and ratio < copy_ratio else "not a copy"
    own_text = "" if own is None else ("; nearest = its own image" if own else "; nearest = another image")
    return f'"{caption}"\nd1/d2 = {ratio:.3f} ({verdict}, < {copy_ratio:.2f} = copy){own_text}'


def probe_figure(vis: dict[str, Any], step: int | None = None, copy_ratio: float = 1.0 / 3.0,
                 colormap: str = "inferno", label: str | None = None) -> Any:
    """A labelled matplotlib ``Figure`` of the probe panels (None without generations): one row per generated probe
    with its caption, its nearest-neighbour ratio d1/d2 and whether it is a copy (Gu et al.: d1/d2 below
    ``copy_ratio``), the three columns named, the step (or ``label``) in the title."""
    from matplotlib.figure import Figure

    panels = probe_panels(vis, min_size=64, colormap=colormap)
    if panels is None:
        return None
    G = panels.shape[0]
    fig = Figure(figsize=(6.4, 0.6 + 2.3 * G), dpi=100, layout="constrained")
    axes = fig.subplots(G, 1, squeeze=False)[:, 0]
    for i, ax in enumerate(axes):
        ax.imshow(panels[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(_label(vis, i, copy_ratio), fontsize=8, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    width = panels.shape[-1] / 3
    axes[-1].set_xticks([width * (k + 0.5) for k in range(3)])
    axes[-1].set_xticklabels(["generation", "nearest training image", "curvature difference Δh"], fontsize=8)
    when = label if label is not None else (f"step {step}" if step is not None else "")
    fig.suptitle(f"Probe generations {when}".strip(), fontsize=10)
    return fig


def figure_to_array(fig: Any) -> np.ndarray:
    """A matplotlib ``Figure`` -> ``[H, W, 3]`` uint8 RGB (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
