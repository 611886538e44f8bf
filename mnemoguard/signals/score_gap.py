"""Score-gap signals: Wen et al.'s text-conditional noise gap, live-vs-baseline gaps per noise band, and Asthana &
Belagiannis' norm + anisotropy detector.

All functions are pure: tensors in, tensors out, no model calls, no state. Noise predictions are ``[B, C, H, W]``
(any ``[B, ...]`` for the norms; the cosine needs a channel axis at dim 1). Get them from
:meth:`mnemoguard.denoiser.Denoiser.eps_cond_uncond` (one batched UNet call for both branches).

References
----------
- Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024
  (code: github.com/YuxinWenRick/diffusion_memorization).
- Asthana & Belagiannis, "Detecting and Mitigating Memorization in Diffusion Models through Anisotropy of the
  Log-Probability", ICLR 2026 (code: github.com/rohanasthana/memorization-anisotropy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ASTHANA_PRESETS",
    "AsthanaPreset",
    "anisotropy_cosine",
    "asthana_norm",
    "asthana_score",
    "band_mean",
    "ddim_timesteps",
    "live_baseline_gap",
    "split_by_band",
    "wen_norm",
    "wen_score",
    "wen_training_filter",
]

Band = tuple[float, float]


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, found {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 1:
        raise ValueError(f"{names} must be batched [B, ...], found a 0-dim tensor")


def _per_sample_l2(d: Tensor) -> Tensor:
    return d.reshape(d.shape[0], -1).norm(dim=1)


# ---------------------------------------------------------------------------------------------------- Wen et al.
def wen_norm(eps_cond: Tensor, eps_uncond: Tensor) -> Tensor:
    """Text-conditional noise gap of one denoising step, per sample (Wen et al., ICLR 2024, Sec. 3).

    .. math::

        d(x_t) = \\lVert \\varepsilon_\\theta(x_t, t, c) - \\varepsilon_\\theta(x_t, t, \\varnothing) \\rVert_2

    the L2 norm over all of C x H x W (the code's ``text_noise_norm``, ``lp=2``); not divided by sigma_t.
    Memorized prompts give large gaps, already at the first step from pure noise.
    Returns ``[B]``.
    """
    _check_pair(eps_cond, eps_uncond, "eps_cond and eps_uncond")
    return _per_sample_l2(eps_cond - eps_uncond)


def wen_score(
    eps_cond: Tensor | Sequence[Tensor],
    eps_uncond: Tensor | Sequence[Tensor],
    *,
    num_generations: int = 1,
) -> Tensor:
    """Wen et al.'s detection score: the gap averaged over denoising steps and generations per prompt.

    .. math::

        \\text{score}(c) = \\frac{1}{|S|\\,G} \\sum_{i \\in S} \\sum_{j < G}
        \\lVert \\varepsilon_\\theta(x^{(j)}_{t_i}, t_i, c) - \\varepsilon_\\theta(x^{(j)}_{t_i}, t_i, \\varnothing)
        \\rVert_2

    Args:
        eps_cond, eps_uncond: a sequence with one ``[P*G, ...]`` tensor per step in S, or a single ``[P*G, ...]``
            tensor (one step, e.g. the first-step variant). Generations of one prompt are
            consecutive in the batch (diffusers' ``num_images_per_prompt`` layout: row ``p*G + j``).
        num_generations: G.

    The paper's headline uses all 50 DDIM steps and G=4 (notebook ``det_mem_viz``); "first step, one generation"
    is ``S={0}``, G=1. Returns ``[P]``.
    """
    cond = _as_steps(eps_cond, "eps_cond")
    uncond = _as_steps(eps_uncond, "eps_uncond")
    if len(cond) != len(uncond):
        raise ValueError(f"eps_cond has {len(cond)} steps and eps_uncond {len(uncond)}")
    gaps = torch.stack([wen_norm(c, u) for c, u in zip(cond, uncond)])  # [S, P*G]
    n = gaps.shape[1]
    if num_generations < 1 or n % num_generations:
        raise ValueError(f"batch {n} is not a multiple of num_generations={num_generations}")
    return gaps.reshape(gaps.shape[0], n // num_generations, num_generations).mean(dim=(0, 2))


def _as_steps(eps: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(eps, Tensor):
        return [eps]
    steps = list(eps)
    if not steps:
        raise ValueError(f"{name}: expected at least one step, found none")
    return steps


def wen_training_filter(
    model_pred: Tensor, eps_uncond: Tensor, threshold: float | None = 2.0
) -> tuple[Tensor, Tensor]:
    """Wen et al.'s training-time filter: the gap at the *training* inputs and the keep mask.

    .. math::

        m_b = \\lVert \\varepsilon_\\theta(x_{t_b}, t_b, c_b) - \\varepsilon_\\theta(x_{t_b}, t_b, \\varnothing)
        \\rVert_2, \\qquad \\text{keep}_b = m_b < \\tau

    at the training noisy latent and the training timestep of each sample (``train_text_to_image.py``,
    ``--hard_threshold``; tau = 2 for SD 1.4 at 512 px, the L2 over 4x64x64). The gap is detached (the code computes
    it under ``no_grad``). The code drops the whole step when nothing is kept; a caller should also mask per-sample
    loss weights (SNR weighting) with ``keep``, which the authors' code forgets. ``threshold=None`` keeps all.

    Returns ``(gap [B], keep [B] bool)``.
    """
    _check_pair(model_pred, eps_uncond, "model_pred and eps_uncond")
    gap = wen_norm(model_pred.detach(), eps_uncond.detach())
    keep = torch.ones_like(gap, dtype=torch.bool) if threshold is None else gap < threshold
    return gap, keep


# ---------------------------------------------------------------------------------------------------- live vs baseline
def live_baseline_gap(eps_live: Tensor, eps_base: Tensor, *, sigma: Tensor | float | None = None) -> Tensor:
    """Per-sample gap between the live model and a less-trained baseline at the same inputs.

    .. math::

        g_b = \\lVert \\varepsilon_{\\text{live}}(x_b, t_b, c_b) - \\varepsilon_{\\text{base}}(x_b, t_b, c_b)
        \\rVert_2 \\quad (\\text{divided by } \\sigma_{t_b} \\text{ if ``sigma`` is given: a score-space gap})

    The baseline is any "less-trained model" (unconditional branch, LoRA disabled, EMA, earlier snapshot; see
    :mod:`mnemoguard.baselines`). With the unconditional branch as baseline this is :func:`wen_norm`. Growth of the
    gap during fine-tuning, per noise band (:func:`split_by_band`), is the training-time memorization signal of the
    design (Wen et al. 2024 use the unconditional baseline; Kim & Lee 2026 the less-trained checkpoint, Eq. 6).
    Returns ``[B]``.
    """
    _check_pair(eps_live, eps_base, "eps_live and eps_base")
    gap = _per_sample_l2(eps_live - eps_base)
    if sigma is not None:
        gap = gap / torch.as_tensor(sigma, dtype=gap.dtype, device=gap.device)
    return gap


def _check_bands(bands: Sequence[Band]) -> list[Band]:
    out = []
    for band in bands:
        if len(band) != 2 or not band[0] < band[1]:
            raise ValueError(f"a band is a (t_lo, t_hi) pair with t_lo < t_hi, found {band!r}")
        out.append((band[0], band[1]))
    if not out:
        raise ValueError("expected at least one (t_lo, t_hi) band, found none")
    return out


def split_by_band(values: Tensor, timesteps: Tensor, bands: Sequence[Band]) -> dict[Band, Tensor]:
    """Group per-sample values by timestep band: ``{(t_lo, t_hi): values[t_lo <= t < t_hi]}``.

    Bands are half-open, may overlap and need not cover all timesteps. Values are never averaged across bands.
    """
    if values.ndim != 1 or timesteps.shape != values.shape:
        raise ValueError(
            f"expected per-sample values [B] and timesteps [B], found {tuple(values.shape)} and "
            f"{tuple(timesteps.shape)}"
        )
    t = timesteps.to(values.device)
    return {(lo, hi): values[(t >= lo) & (t < hi)] for lo, hi in _check_bands(bands)}


def band_mean(values: Tensor, timesteps: Tensor, bands: Sequence[Band]) -> Tensor:
    """Mean of per-sample values inside each band, ``[len(bands)]``, NaN for a band with no sample."""
    parts = split_by_band(values, timesteps, bands)
    nan = torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    return torch.stack([v.mean() if v.numel() else nan for v in parts.values()])


# ---------------------------------------------------------------------------------------------------- Asthana & B.
@dataclass(frozen=True)
class AsthanaPreset:
    """Per-model settings of Asthana & Belagiannis' detector (``detect_eval.py`` and ``local_model/pipe.py``)."""

    gamma1: float
    gamma2: float
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_inference_steps: int = 50  # DDIM
    t_hi_index: int = 0  # timesteps[0]: 981 for SD (steps_offset=1)
    t_lo_index: int = -3  # timesteps[-3]: 41 for SD
    mode: str = "x,c|x"
    seed: int = 51


ASTHANA_PRESETS: dict[str, AsthanaPreset] = {
    "sd1": AsthanaPreset(gamma1=1.0, gamma2=2.0),  # CompVis/stable-diffusion-v1-4
    "sd2": AsthanaPreset(gamma1=1.0, gamma2=0.1, prediction_type="v_prediction"),  # stabilityai/stable-diffusion-2
    "realistic_vision": AsthanaPreset(gamma1=2.0, gamma2=1.0),  # SG161222/Realistic_Vision_V5.1_noVAE
}


def ddim_timesteps(
    num_inference_steps: int = 50, num_train_timesteps: int = 1000, steps_offset: int = 1
) -> list[int]:
    """DDIM "leading" timesteps, descending: ``[981, 961, ..., 21, 1]`` for SD's 1000 / 50 / offset 1.

    .. math:: t_i = (n - 1 - i) \\lfloor T / n \\rfloor + \\text{offset}
    """
    if not 0 < num_inference_steps <= num_train_timesteps:
        raise ValueError(f"need 0 < num_inference_steps <= {num_train_timesteps}, found {num_inference_steps}")
    ratio = num_train_timesteps // num_inference_steps
    return [i * ratio + steps_offset for i in reversed(range(num_inference_steps))]


def _normalize(eps: Tensor, normalization: str | None) -> Tensor:
    if normalization is None:
        return eps
    if normalization == "L2":  # per sample and channel, over the spatial positions
        return eps / (eps.flatten(2).norm(dim=2).reshape(*eps.shape[:2], *([1] * (eps.ndim - 2))) + 1e-6)
    if normalization == "L1":  # per sample, over everything
        return eps / eps.reshape(eps.shape[0], -1).abs().sum(dim=1).reshape(-1, *([1] * (eps.ndim - 1)))
    raise ValueError(f"normalization must be None, 'L1' or 'L2', found {normalization!r}")


_COSINE_MODES = ("x,c|x", "x,x|c", "x|c,c|x")


def anisotropy_cosine(
    eps_cond: Tensor, eps_uncond: Tensor, *, mode: str = "x,c|x", normalization: str | None = None
) -> Tensor:
    """Channel-wise cosine between the unconditional prediction and the guidance direction, averaged over pixels.

    .. math::

        \\cos(x) = \\frac{1}{HW} \\sum_{h,w}
        \\frac{\\langle \\varepsilon_\\varnothing[:,h,w],\\, (\\varepsilon_c - \\varepsilon_\\varnothing)[:,h,w]
        \\rangle}{\\lVert \\varepsilon_\\varnothing[:,h,w] \\rVert\\, \\lVert (\\varepsilon_c -
        \\varepsilon_\\varnothing)[:,h,w] \\rVert}

    (Asthana & Belagiannis, ICLR 2026): at a low-noise timestep log p_t is anisotropic and, for memorized prompts,
    the guidance vector aligns with the unconditional score. Evaluated on pure noise x_T (no denoising). The cosine
    is over the latent channels at each position (``F.cosine_similarity(dim=1)``), not over the flattened tensor.
    Score-space and eps-space cosines agree (a common factor -1/sigma_t cancels). Modes (code names):
    ``"x,c|x"`` = cos(eps_u, eps_c - eps_u) (headline), ``"x,x|c"`` = cos(eps_u, eps_c),
    ``"x|c,c|x"`` = cos(eps_c, eps_c - eps_u). ``normalization`` ("L1"/"L2") follows the SD1 path of their code:
    "L2" divides each channel by its spatial L2 norm (+1e-6), "L1" each sample by its total L1 norm.
    Returns ``[B]``.
    """
    _check_pair(eps_cond, eps_uncond, "eps_cond and eps_uncond")
    if eps_cond.ndim < 3:
        raise ValueError(f"expected [B, C, H, W] noise predictions, found shape {tuple(eps_cond.shape)}")
    if mode not in _COSINE_MODES:
        raise ValueError(f"mode must be one of {_COSINE_MODES}, found {mode!r}")
    c, u = _normalize(eps_cond, normalization), _normalize(eps_uncond, normalization)
    a, b = {"x,c|x": (u, c - u), "x,x|c": (c, u), "x|c,c|x": (c, c - u)}[mode]
    return F.cosine_similarity(a, b, dim=1).flatten(1).mean(dim=1)


def asthana_norm(
    eps_cond: Tensor,
    eps_uncond: Tensor,
    *,
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    alpha_bar: Tensor | float | None = None,
    normalization: str | None = None,
) -> Tensor:
    """Norm term of Asthana & Belagiannis' detector at the high-noise timestep, per sample ``[B]``.

    - epsilon models (their SD v1 path): :math:`\\lVert \\varepsilon_c - \\varepsilon_\\varnothing \\rVert_2`
      over C x H x W, NOT divided by sigma_t (= :func:`wen_norm`; the optional normalization is applied to both
      predictions first).
    - v-prediction models (their SD v2 path): in their score space
      :math:`s = (\\sqrt{\\bar\\alpha}\\, v - x)/(1 - \\bar\\alpha)`, so the term is
      :math:`\\sqrt{\\bar\\alpha_t}\\, \\lVert v_c - v_\\varnothing \\rVert_2 / (1 - \\bar\\alpha_t)`.
      Pass the network's raw v outputs and ``alpha_bar`` at t_hi. Their conversion differs from the standard score
      :math:`-(\\alpha_t v + \\sigma_t x)/\\sigma_t` by a sign and a factor 1/sigma_t; we follow their code. Their
      ``normalization`` has no effect on this path.
    """
    _check_pair(eps_cond, eps_uncond, "eps_cond and eps_uncond")
    if prediction_type == "epsilon":
        return wen_norm(_normalize(eps_cond, normalization), _normalize(eps_uncond, normalization))
    if prediction_type == "v_prediction":
        if alpha_bar is None:
            raise ValueError("prediction_type='v_prediction' needs alpha_bar (alphas_cumprod at t_hi)")
        ab = torch.as_tensor(alpha_bar, dtype=eps_cond.dtype, device=eps_cond.device)
        return ab.sqrt() * wen_norm(eps_cond, eps_uncond) / (1 - ab)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', found {prediction_type!r}")


def asthana_score(
    eps_cond_hi: Tensor,
    eps_uncond_hi: Tensor,
    eps_cond_lo: Tensor,
    eps_uncond_lo: Tensor,
    *,
    gamma1: float | None = None,
    gamma2: float | None = None,
    preset: str | AsthanaPreset = "sd1",
    mode: str | None = None,
    normalization: str | None = None,
    alpha_bar_hi: Tensor | float | None = None,
    num_generations: int = 1,
) -> Tensor:
    """Asthana & Belagiannis' memorization score (ICLR 2026): norm at high noise plus anisotropy at low noise.

    .. math::

        \\text{score}(c) = \\gamma_1 \\lVert \\varepsilon_c(x_T, t_{hi}) - \\varepsilon_\\varnothing(x_T, t_{hi})
        \\rVert_2 + \\gamma_2 \\, \\overline{\\cos}\\big(\\varepsilon_\\varnothing(x_T, t_{lo}),\\,
        \\varepsilon_c(x_T, t_{lo}) - \\varepsilon_\\varnothing(x_T, t_{lo})\\big)

    Both pairs of predictions come from the SAME pure-noise input x_T (two CFG calls in all: t_hi = DDIM
    ``timesteps[0]`` = 981 and t_lo = ``timesteps[-3]`` = 41 for SD; see :func:`ddim_timesteps`). See
    :func:`asthana_norm` and :func:`anisotropy_cosine` for the terms. For v-prediction presets pass raw v
    outputs and ``alpha_bar_hi``. Presets (:data:`ASTHANA_PRESETS`) give gamma = (1, 2) for SD 1.4, (1, 0.1) for
    SD 2 and (2, 1) for Realistic Vision; explicit ``gamma1``/``gamma2``/``mode`` override them.

    Rows ``p*G + j`` are generation j of prompt p; norm and cosine are averaged over the G generations (as the code
    does) before combining. Returns ``[P]``.
    """
    if isinstance(preset, str) and preset not in ASTHANA_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(ASTHANA_PRESETS)} or an AsthanaPreset")
    p = ASTHANA_PRESETS[preset] if isinstance(preset, str) else preset
    g1 = p.gamma1 if gamma1 is None else gamma1
    g2 = p.gamma2 if gamma2 is None else gamma2
    norm = asthana_norm(
        eps_cond_hi, eps_uncond_hi, prediction_type=p.prediction_type, alpha_bar=alpha_bar_hi,
        normalization=normalization,
    )
    # Their v-prediction path takes the cosine on the raw v outputs, ignoring the normalization.
    cos_norm = normalization if p.prediction_type == "epsilon" else None
    cos = anisotropy_cosine(eps_cond_lo, eps_uncond_lo, mode=mode or p.mode, normalization=cos_norm)
    if norm.shape != cos.shape:
        raise ValueError(f"high- and low-noise batches differ: {tuple(norm.shape)} vs {tuple(cos.shape)}")
    n = norm.shape[0]
    if num_generations < 1 or n % num_generations:
        raise ValueError(f"batch {n} is not a multiple of num_generations={num_generations}")
    norm = norm.reshape(-1, num_generations).mean(dim=1)
    cos = cos.reshape(-1, num_generations).mean(dim=1)
    return g1 * norm + g2 * cos
