"""Memorization signals: pure functions, tensors in and tensors out (formulas and costs in docs/signals.md).

- hutchinson: batched Rademacher probes, Jacobian products, Hutchinson diagonal / trace
- curvature: curvature-difference and score-difference maps (Kim & Lee 2026)
- posterior: posterior weights, the empirical optimal denoiser, max posterior weight W_σ (Dodson et al. 2026)
- shell_coverage: shell coverage C_σ (Dodson et al. 2026)
- danger_zone: both curves in one pass, the band, σ ↔ timestep (Dodson et al. 2026)
- laplace: the p-Laplace family of log p_t (Brokman et al. 2025)
- score_gap: Wen et al.'s text-conditional gap (2024), live-vs-baseline gaps per band, Asthana & Belagiannis'
  norm + anisotropy detector (2026)
- trajectory: early-denoising overshoot and first-step loss (Kim, Kim & Lee 2025)
- returns: one-step self-return of a noised training image (Gu et al.'s ratio at Dodson et al.'s noise levels)
"""

from ._streaming import distinct_rows, subsample_indices
from .curvature import (
    conditional_curvature_map,
    curvature_diff_map,
    curvature_map,
    score_diff_map,
    upsample_map,
)
from .danger_zone import (
    DangerZone,
    DangerZoneCurves,
    danger_zone_band,
    danger_zone_curves,
    sigma_to_timestep,
    sigmas_from_alphas_cumprod,
)
from .hutchinson import (
    hutchinson_diagonal,
    hutchinson_samples,
    hutchinson_trace,
    jacobian_products,
    make_generator,
    rademacher_probes,
)
from .laplace import (
    SpherePoints,
    infinity_laplacian,
    noise_recovery_flux,
    p_laplacian_from_parts,
    p_laplacian_hutchinson,
    p_laplacian_sphere,
    sphere_flux,
    sphere_points,
)
from .posterior import (
    empirical_optimal_denoiser,
    max_posterior_weight_curve,
    max_posterior_weights,
    posterior_weights,
)
from .returns import self_return_ratio, self_return_score
from .score_gap import (
    ASTHANA_PRESETS,
    AsthanaPreset,
    anisotropy_cosine,
    asthana_norm,
    asthana_score,
    band_mean,
    ddim_timesteps,
    live_baseline_gap,
    split_by_band,
    wen_norm,
    wen_score,
    wen_training_filter,
)
from .shell_coverage import chi_square_interval, shell_coverage, shell_coverage_curve, shell_interval
from .trajectory import (
    LatentDecomposition,
    Projection,
    decompose_latents,
    guided_x0_prediction,
    normalized_first_step_loss,
    overshoot_coefficient,
    project_onto,
    sample_forward_noise,
    schedule_deviation,
    theoretical_schedule,
)

__all__ = [
    "anisotropy_cosine",
    "asthana_norm",
    "ASTHANA_PRESETS",
    "asthana_score",
    "AsthanaPreset",
    "band_mean",
    "chi_square_interval",
    "distinct_rows",
    "conditional_curvature_map",
    "curvature_diff_map",
    "curvature_map",
    "danger_zone_band",
    "danger_zone_curves",
    "DangerZone",
    "DangerZoneCurves",
    "ddim_timesteps",
    "decompose_latents",
    "empirical_optimal_denoiser",
    "guided_x0_prediction",
    "hutchinson_diagonal",
    "hutchinson_samples",
    "hutchinson_trace",
    "infinity_laplacian",
    "jacobian_products",
    "LatentDecomposition",
    "live_baseline_gap",
    "make_generator",
    "max_posterior_weight_curve",
    "max_posterior_weights",
    "noise_recovery_flux",
    "normalized_first_step_loss",
    "overshoot_coefficient",
    "p_laplacian_from_parts",
    "p_laplacian_hutchinson",
    "p_laplacian_sphere",
    "posterior_weights",
    "project_onto",
    "Projection",
    "rademacher_probes",
    "sample_forward_noise",
    "schedule_deviation",
    "score_diff_map",
    "shell_coverage",
    "shell_coverage_curve",
    "shell_interval",
    "self_return_ratio",
    "self_return_score",
    "sigma_to_timestep",
    "sigmas_from_alphas_cumprod",
    "sphere_flux",
    "sphere_points",
    "SpherePoints",
    "split_by_band",
    "subsample_indices",
    "theoretical_schedule",
    "upsample_map",
    "wen_norm",
    "wen_score",
    "wen_training_filter",
]
