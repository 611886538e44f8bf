"""Prompt-level detection signals and localisation maps of the benchmark, with their costs.

Costs are counted in network forward passes at batch 1 ("passes", as in ``docs/signals.md``): a CFG call is 2 passes,
a VJP is counted as 2 passes (a backward costs about two forwards), a signal read along a sampling trajectory is
charged the trajectory steps it needs. Wall times are measured for the calls a signal adds and pro-rated for the
trajectory share it reads (the trajectories are recorded once and shared).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..evaluation import localization_sweep, pixel_auroc, roc_auc
from ..signals import (
    anisotropy_cosine,
    conditional_curvature_map,
    curvature_diff_map,
    hutchinson_trace,
    live_baseline_gap,
    score_diff_map,
    wen_norm,
)
from .probes import ProbeModel, Trajectory

__all__ = [
    "MAP_NAMES",
    "SignalScores",
    "cross_attention_maps",
    "detection_signals",
    "localization_maps",
    "localization_metrics",
    "nearest_step",
]

MAP_NAMES = {
    "dh_uncond": "Δh_∅ (curvature diff, uncond)",
    "dh_ema": "Δh_θ̃ (curvature diff, EMA)",
    "ds_uncond": "Δs_∅ (score diff, uncond)",
    "ds_ema": "Δs_θ̃ (score diff, EMA)",
    "raw_curvature": "raw curvature (no baseline)",
    "cross_attention": "cross-attention (phrase tokens)",
}


@dataclass
class SignalScores:
    """Per-caption scores (higher = memorized) of every signal, with cost per caption and wall time for all."""

    scores: dict[str, Tensor] = field(default_factory=dict)
    passes: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, scores: Tensor, passes: float, seconds: float, note: str) -> None:
        """Record one signal: ``[P]`` scores, passes per caption, wall seconds for all captions, a short note."""
        self.scores[name] = scores.detach().float().cpu()
        self.passes[name] = float(passes)
        self.seconds[name] = float(seconds)
        self.notes[name] = note


def nearest_step(timesteps: Sequence[int], t: float) -> int:
    """Index of the sampling step whose timestep is nearest to ``t``."""
    return min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - t))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def detection_signals(
    model: ProbeModel,
    cond: Tensor,
    latents: Tensor,
    plain: Trajectory,
    guided: Trajectory,
    *,
    bands: Sequence[Sequence[int]],
    asthana_gamma: Sequence[float] = (1.0, 2.0),
    asthana_lo_index: int = -3,
    curvature_step: int = 12,
    curvature_probes: int = 8,
    curvature_method: str = "fd",
    seed: int = 0,
    trajectory_share: float = 1.0,
    batch_size: int = 32,
) -> SignalScores:
    """Every prompt-level signal for the captions of ``cond`` (one generation each, initial noise ``latents``).

    Args:
        plain: the guidance-1 trajectory of these rows (live-vs-EMA gap and curvature read x_t along it).
        guided: the CFG trajectory at the users' guidance (Wen's all-steps gap is free along it).
        bands: bands of levels of the live-vs-EMA gap; each is read at the step nearest the band centre.
        trajectory_share: fraction of the recorded trajectories' wall time that these rows account for.
        batch_size: captions per curvature call (each call holds 4 x probes x batch_size images with ``fd``).
    """
    out = SignalScores()
    den, uncond = model.denoiser, model.uncond
    ts = guided.timesteps
    n_steps = len(ts)
    # the first step where the signal scale α > 0 (flow matching starts at σ = 1, where ε̂ = x_t carries nothing)
    first = next(i for i, t in enumerate(ts) if float(den.alpha(torch.tensor(t))) > 0)
    t_hi, t_lo = ts[first], ts[asthana_lo_index]
    x_hi = latents if first == 0 else guided.x[first].to(latents)
    (eps_c_hi, eps_u_hi), s_hi = _timed(lambda: den.eps_cond_uncond(x_hi, t_hi, cond, uncond))
    wen_first = wen_norm(eps_c_hi, eps_u_hi)
    out.add("wen_first", wen_first, 2, s_hi, f"‖ε_c − ε_∅‖ at x_T, t={t_hi}")
    gaps = torch.stack([wen_norm(guided.eps_cond[i], guided.eps_uncond[i]) for i in range(n_steps)]).mean(0)
    out.add("wen_all", gaps, 2 * n_steps, guided.seconds * trajectory_share,
            f"mean gap over the {n_steps} CFG steps (free during sampling)")
    (eps_c_lo, eps_u_lo), s_lo = _timed(lambda: den.eps_cond_uncond(latents, t_lo, cond, uncond))
    cos = anisotropy_cosine(eps_c_lo, eps_u_lo)
    g1, g2 = asthana_gamma
    out.add("asthana", g1 * wen_first + g2 * cos, 4, s_hi + s_lo,
            f"γ=({g1:g}, {g2:g}); norm at t={t_hi}, cos at {t_lo}")
    out.add("anisotropy", cos, 2, s_lo, f"cos(ε_∅, ε_c − ε_∅) at x_T, t={t_lo}")
    step_share = plain.seconds * trajectory_share / max(1, len(plain.timesteps))
    plain_levels = [int(den.schedule.levels_of(torch.tensor(t))) for t in plain.timesteps]
    if model.ema is not None:
        for lo, hi in bands:
            i = nearest_step(plain_levels, (lo + hi) / 2)
            t = plain.timesteps[i]
            eps_ema, s = _timed(lambda i=i, t=t: model.ema.eps(plain.x[i], t, cond))
            gap = live_baseline_gap(plain.eps_cond[i], eps_ema)
            out.add(f"ema_gap[{lo},{hi})", gap, i + 2, s + step_share * (i + 1),
                    f"‖ε_live − ε_EMA‖ at x_t of the w=1 trajectory, t={t}")
    i = min(curvature_step, len(plain.timesteps) - 1)
    t = plain.timesteps[i]

    def traces() -> Tensor:
        parts = []
        for lo in range(0, len(cond), batch_size):
            fn = den.guidance_fn(t, cond[lo : lo + batch_size], uncond)
            parts.append(hutchinson_trace(fn, plain.x[i][lo : lo + batch_size], num_probes=curvature_probes,
                                          generator=seed + lo, method=curvature_method))
        return torch.cat(parts)

    trace, s = _timed(traces)
    per_call = 4 if curvature_method == "fd" else (2 + 4 if curvature_method == "vjp" else 6)
    out.add("curvature", trace, i + per_call * curvature_probes, s + step_share * i,
            f"Hutchinson tr ∂(ε_c − ε_∅)/∂x, K={curvature_probes} ({curvature_method}), x_t of w=1 run, t={t}")
    return out


# ---------------------------------------------------------------------------------------------------- localisation
class _AttentionProbe:
    """Attention processor wrapper that records cross-attention probabilities, then runs the original processor."""

    def __init__(self, inner: Any, store: list[Tensor]) -> None:
        self.inner = inner
        self.store = store

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is not None and hidden_states.ndim == 3:
            context = encoder_hidden_states
            if getattr(attn, "norm_cross", None):
                context = attn.norm_encoder_hidden_states(context)
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(q, k, None)  # [B*heads, HW, L]
            b = hidden_states.shape[0]
            self.store.append(probs.reshape(b, -1, *probs.shape[1:]).mean(1).detach())
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


@torch.no_grad()
def cross_attention_maps(model: ProbeModel, x: Tensor, t: int, cond: Tensor, token_mask: Tensor) -> Tensor:
    """Cross-attention baseline map ``[B, H, W]``: attention probability of every position to the selected tokens
    (``token_mask`` ``[B, L]``), averaged over heads, tokens and cross-attention layers (bilinear to image size).
    UNets only (their ``attn2`` cross-attention layers; transformers attend jointly)."""
    unet = model.model
    if not any(k.endswith("attn2.processor") for k in getattr(unet, "attn_processors", {})):
        raise ValueError(f"cross-attention maps read a UNet's attn2 layers; {type(unet).__name__} has none (set "
                         "localization.cross_attention=false)")
    original = dict(unet.attn_processors)
    store: list[Tensor] = []
    unet.set_attn_processor({k: _AttentionProbe(p, store) if k.endswith("attn2.processor") else p
                             for k, p in original.items()})
    try:
        model.denoiser.eps(x, t, cond)
    finally:
        unet.set_attn_processor(original)
    h, w = x.shape[-2:]
    weights = token_mask.float() / token_mask.float().sum(1, keepdim=True).clamp_min(1)
    maps = []
    for probs in store:  # [B, hw, L]
        side = int(round(probs.shape[1] ** 0.5))
        m = (probs * weights[:, None, :]).sum(-1).reshape(-1, 1, side, side)
        maps.append(F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(maps).mean(0)


def localization_maps(
    model: ProbeModel,
    x: Tensor,
    t: int,
    cond: Tensor,
    *,
    num_probes: int = 16,
    method: str = "vjp",
    seed: int = 0,
    token_mask: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, float]]:
    """Kim & Lee's maps at ``x`` (x_t of a CFG trajectory) and timestep ``t``: Δh_∅, Δh_θ̃ (EMA), Δs_∅, Δs_θ̃,
    raw conditional curvature, and the cross-attention baseline when ``token_mask`` is given.

    Returns ``(maps [B, H, W] by name, passes per caption, wall seconds for all captions)``.
    """
    den, uncond = model.denoiser, model.uncond
    sigma = float(den.sigma(t))
    kw = {"num_probes": num_probes, "generator": seed, "method": method}
    vjp_cost = 2 * num_probes + 1 if method == "vjp" else (2 * num_probes if method == "fd" else 3 * num_probes)
    maps: dict[str, Tensor] = {}
    passes: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def put(name: str, fn: Callable[[], Tensor], cost: float) -> None:
        m, s = _timed(fn)
        maps[name], passes[name], seconds[name] = m.detach().float().cpu(), cost, s

    put("dh_uncond", lambda: curvature_diff_map(den.guidance_fn(t, cond, uncond), None, x, **kw), 2 * vjp_cost)
    with torch.no_grad():
        (eps_c, eps_u), s_cu = _timed(lambda: den.eps_cond_uncond(x, t, cond, uncond))
    put("ds_uncond", lambda: score_diff_map(eps_c, eps_u, sigma=sigma), 2)
    seconds["ds_uncond"] += s_cu
    if model.ema is not None:
        ema = model.ema
        put("dh_ema", lambda: curvature_diff_map(den.eps_fn(t, cond), ema.eps_fn(t, cond), x, **kw), 2 * vjp_cost)
        with torch.no_grad():
            eps_ema, s_e = _timed(lambda: ema.eps(x, t, cond))
        put("ds_ema", lambda: score_diff_map(eps_c, eps_ema, sigma=sigma), 2)
        seconds["ds_ema"] += s_e + s_cu / 2
    put("raw_curvature", lambda: conditional_curvature_map(den.eps_fn(t, cond), x, **kw), vjp_cost)
    if token_mask is not None:
        put("cross_attention", lambda: cross_attention_maps(model, x, t, cond, token_mask), 1)
    return maps, passes, seconds


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ValueError:  # a constant set of maps (e.g. an EMA equal to the live model): undefined
        return None


def localization_metrics(maps: Tensor, template_mask: Tensor, constraint_mask: Tensor | None) -> dict[str, Any]:
    """One map type on the template captions: pixel AUROC and Kim & Lee's IoU sweep against the template square,
    and how much it lights up the constraint border.

    ``constraint_auroc`` ranks border pixels against interior pixels outside the stamp (0.5 = ignores the border,
    higher = lights it up); ``constraint_mass`` is the share of the map's mass on the border, to compare with the
    border's share of the pixels (``constraint_area``).
    """
    n = maps.shape[0]
    masks = template_mask.expand(n, -1, -1)
    sweep = _safe(lambda: localization_sweep(maps.clamp_min(0), masks))
    out: dict[str, Any] = {
        "pixel_auroc": _safe(lambda: pixel_auroc(maps, masks)),
        "best_global_iou": sweep.best_global_iou if sweep else None,
        "best_mean_iou": sweep.best_mean_iou if sweep else None,
        "best_accuracy": sweep.best_accuracy if sweep else None,
    }
    if constraint_mask is not None and bool(constraint_mask.any()):
        keep = ~template_mask
        border = constraint_mask[keep]
        values = maps[:, keep]
        labels = border.expand(n, -1).reshape(-1)
        out["constraint_auroc"] = _safe(lambda: roc_auc(values.reshape(-1).double(), labels))
        total = float(maps.clamp_min(0).sum())
        out["constraint_mass"] = float(maps.clamp_min(0)[:, constraint_mask].sum()) / total if total > 0 else None
        out["constraint_area"] = float(constraint_mask.float().mean())
    return out
