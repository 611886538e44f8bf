"""Ground truth in the flow parameterisation: a flow-matching model of a Gaussian mixture (the mixture's exact velocity
field ``v = E[ε − x_0 | x_t]`` on the linear interpolant ``x_t = (1 − σ) x_0 + σ ε``, tests/gmm.py) run through a
:class:`~mnemoguard.denoiser.Denoiser` with diffusers' ``FlowMatchEulerDiscreteScheduler``; every signal computed from
it against the closed forms, as the ε tests do for the VP / VE forms; a DDPM and a flow model of the same memorizer
put the danger zone at the same VE-equivalent σ; the sampler returns a point mass."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from mnemoguard.callbacks.danger_zone import band_from_excess, return_flags, return_profile
from mnemoguard.denoiser import Denoiser, x0_from_prediction
from mnemoguard.family.schedule import DDPMSchedule, FlowMatchSchedule
from mnemoguard.sampling import denoise_from, generate, sampling_steps
from mnemoguard.signals.curvature import curvature_diff_map, score_diff_map
from mnemoguard.signals.danger_zone import danger_zone_band, max_posterior_weights, shell_coverage, shell_interval
from mnemoguard.signals.hutchinson import hutchinson_diagonal, hutchinson_trace, jacobian_products, rademacher_probes
from mnemoguard.signals.laplace import infinity_laplacian, noise_recovery_flux, p_laplacian_hutchinson, sphere_points
from mnemoguard.signals.posterior import empirical_optimal_denoiser
from mnemoguard.signals.score_gap import anisotropy_cosine, asthana_score, live_baseline_gap, wen_norm
from mnemoguard.signals.trajectory import (
    decompose_latents,
    guided_x0_prediction,
    normalized_first_step_loss,
    overshoot_coefficient,
    sample_forward_noise,
    schedule_deviation,
    theoretical_schedule,
)
from tests.gmm import GaussianMixture, MixtureNet, ddpm_coefs, flow_coefs, point_masses

SHAPE = (2, 2, 2)  # a latent [C, H, W], d = 8
D = math.prod(SHAPE)
T = 1000
SHIFT = 3.0  # SD3's shift: the training grid is σ = 3s / (1 + 2s), s = 1/T .. 1
LEVEL = 300  # σ ≈ 0.56, VE-equivalent σ ≈ 1.3


def _flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=SHIFT)


def _flow_den(mixtures, prediction_type: str = "flow_prediction") -> Denoiser:
    return Denoiser(MixtureNet(mixtures, flow_coefs(T), prediction_type, SHAPE), _flow_scheduler())


def _at_level(den: Denoiser, level: int) -> tuple[torch.Tensor, float, float]:
    """The training timestep of a level (float32, σ·T, as the scripts draw it) and its ``(α, σ)`` in float64."""
    t = den.schedule.timesteps_at(torch.tensor(level))
    sigma = float(t.double()) / T
    return t, 1.0 - sigma, sigma


def _mixtures() -> dict[str, GaussianMixture]:
    g = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(3, D, generator=g, dtype=torch.float64)
    a = torch.randn(2, D, D, generator=g, dtype=torch.float64)
    full = a @ a.transpose(-1, -2) * 0.05 + 0.1 * torch.eye(D, dtype=torch.float64)
    return {
        "diagonal": GaussianMixture(means, torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
                                    0.05 + 0.3 * torch.rand(3, D, generator=g, dtype=torch.float64)),
        "full": GaussianMixture(torch.randn(2, D, generator=g, dtype=torch.float64),
                                torch.tensor([0.6, 0.4], dtype=torch.float64), full),
        "isotropic": GaussianMixture(torch.randn(2, D, generator=g, dtype=torch.float64), None,
                                     torch.tensor([0.2, 0.6], dtype=torch.float64)),
    }


def _points(law: GaussianMixture, n: int, seed: int) -> torch.Tensor:
    return law.sample(n, torch.Generator().manual_seed(seed)).reshape(n, *SHAPE)


def _between(law: GaussianMixture) -> torch.Tensor:
    """The midpoint of the first two (noised) means, where both components weigh and the Hessian is far from
    diagonal (the mixture's interaction terms ``Σ w_i g_i g_iᵀ − s sᵀ``)."""
    return (0.5 * (law.means[0] + law.means[1])).reshape(1, *SHAPE)


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------- tests/gmm.py
def test_the_interpolants_law_is_the_vp_law_with_alpha_one_minus_sigma_and_matches_monte_carlo():
    base = _mixtures()["diagonal"]
    sigma = 0.35
    law = base.flow(sigma)
    torch.testing.assert_close(law.means, (1 - sigma) * base.means)
    torch.testing.assert_close(law.cov, (1 - sigma) ** 2 * base.cov + sigma**2)
    g = torch.Generator().manual_seed(4)
    x = base.sample(200_000, g)
    xt = (1 - sigma) * x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)
    torch.testing.assert_close(xt.mean(0), (law.weights[:, None] * law.means).sum(0), atol=1e-2, rtol=0)
    torch.testing.assert_close((xt**2).mean(0), (law.weights[:, None] * (law.cov + law.means**2)).sum(0),
                               atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        base.flow(1.5)


@pytest.mark.parametrize("kind", ["diagonal", "full", "isotropic"])
def test_posterior_mean_is_gaussian_conditioning_per_component_and_tweedie(kind):
    """Independent reference: each component's joint Gaussian of (x_0, x_t), conditioned with a generic solve, mixed
    with weights from torch.distributions."""
    mix = _mixtures()[kind]
    alpha, sigma = 0.6, 0.4
    law = mix.flow(sigma)
    y = _points(law, 5, 1).reshape(5, D)
    cov = mix.cov if mix.full else torch.diag_embed(mix.cov)
    eye = torch.eye(D, dtype=torch.float64)
    cond_means, log_w = [], []
    for i in range(mix.num_components):
        c_xt = alpha**2 * cov[i] + sigma**2 * eye
        gain = alpha * cov[i] @ torch.linalg.inv(c_xt)  # Cov(x0, xt) Var(xt)^-1
        cond_means.append(mix.means[i] + (y - alpha * mix.means[i]) @ gain.T)
        normal = torch.distributions.MultivariateNormal(alpha * mix.means[i], covariance_matrix=c_xt)
        log_w.append(mix.weights[i].log() + normal.log_prob(y))
    w = torch.softmax(torch.stack(log_w, 1), dim=1)
    ref = (w[..., None] * torch.stack(cond_means, 1)).sum(1)
    _close(mix.posterior_mean_fn(alpha, sigma)(y), ref)
    _close(mix.posterior_mean_fn(alpha, sigma)(y), (y + sigma**2 * law.score(y)) / alpha)  # Tweedie
    _close(law.posterior_weights(y), w)


def test_velocity_is_eps_minus_x0_with_its_jacobian_in_closed_form_and_defined_at_pure_noise():
    mix = _mixtures()["full"]
    sigma = 0.7
    alpha = 1 - sigma
    law = mix.flow(sigma)
    y = _points(law, 4, 2)
    s = law.score(y)
    v = mix.velocity_fn(alpha, sigma)(y)
    assert v.shape == y.shape and mix.velocity_fn(alpha, sigma)(y.float()).dtype == torch.float32
    _close(v, -sigma * s - (y + sigma**2 * s) / alpha)
    _close(v, law.eps_fn(sigma)(y) - mix.posterior_mean_fn(alpha, sigma)(y))
    # dv/dx = −σH − (I + σ²H)/α, H the Hessian of log p_t: autograd through the torch closed form
    eye = torch.eye(D, dtype=torch.float64)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda z: mix.velocity_fn(alpha, sigma)(z[None])[0], y[b].reshape(D))
        h = law.hessian(y[b : b + 1])[0]
        _close(jac, -sigma * h - (eye + sigma**2 * h) / alpha)
    # σ = 1 (α = 0, the sampler's first step): x̂_0 is the prior mean, v = x − E[x_0]
    prior_mean = (mix.weights[:, None] * mix.means).sum(0).reshape(SHAPE)
    _close(mix.velocity_fn(0.0, 1.0)(y), y - prior_mean)
    near = mix.velocity_fn(1e-9, 1 - 1e-9)(y)
    assert (near - (y - prior_mean)).abs().max() < 1e-7


# ---------------------------------------------------------------------------------------------------- the denoiser
@pytest.mark.parametrize("family,prediction_type", [("flow", "flow_prediction"), ("ddpm", "epsilon"),
                                                    ("ddpm", "v_prediction"), ("ddpm", "sample")])
@pytest.mark.parametrize("kind", ["diagonal", "full", "isotropic"])
def test_the_denoisers_eps_score_and_x0_are_the_exact_posterior_quantities(family, prediction_type, kind):
    mix = _mixtures()[kind]
    if family == "flow":
        den = _flow_den(mix)
        assert isinstance(den.schedule, FlowMatchSchedule) and den.prediction_type == "flow_prediction"
        timesteps = [_at_level(den, k)[0] for k in (60, LEVEL, 700)]
        coefs = flow_coefs(T)
    else:
        sched = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)
        coefs = ddpm_coefs(sched.alphas_cumprod)
        den = Denoiser(MixtureNet(mix, coefs, prediction_type, SHAPE), sched)
        assert isinstance(den.schedule, DDPMSchedule) and den.prediction_type == prediction_type
        timesteps = [torch.tensor(100), torch.tensor(500), torch.tensor(900)]
    for k, t in enumerate(timesteps):
        alpha, sigma = coefs(t)
        law = mix.vp(alpha, sigma)
        x = _points(law, 6, 10 + k)
        with torch.no_grad():
            eps, score, x0 = den.eps(x, t), den.score(x, t), den.x0(x, t)
        assert eps.dtype == torch.float64 and eps.shape == x.shape
        _close(eps, -sigma * law.score(x))
        _close(score, law.score(x))
        _close(x0, mix.posterior_mean_fn(alpha, sigma)(x))
        _close(den.schedule.ve_sigma(t), torch.tensor(sigma / alpha, dtype=torch.float64), 1e-12)
        if family == "flow":
            torch.testing.assert_close(den.model.calls[-1], t.expand(6))  # the network got σ·T itself
            _close(den.raw(x, t), mix.velocity_fn(alpha, sigma)(x))


# ---------------------------------------------------------------------------------------------------- score gaps
def _two_laws():
    """Uncond law B (index 0: a broad two-component mixture) and cond law A (index 1)."""
    mixes = _mixtures()
    return mixes["isotropic"], mixes["diagonal"]


COND, UNCOND = torch.ones(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, dtype=torch.float64)


def test_noise_gaps_and_anisotropy_of_two_laws_from_one_cfg_call_match_closed_forms():
    law_u, law_c = _two_laws()
    den = _flow_den([law_u, law_c])
    t, alpha, sigma = _at_level(den, LEVEL)
    x = _points(law_c.flow(sigma), 3, 3)
    with torch.no_grad():
        eps_c, eps_u = den.eps_cond_uncond(x, t, COND, UNCOND)
    s_c, s_u = law_c.flow(sigma).score(x), law_u.flow(sigma).score(x)
    _close(eps_c, -sigma * s_c)
    _close(eps_u, -sigma * s_u)
    _close(wen_norm(eps_c, eps_u), sigma * (s_c - s_u).flatten(1).norm(dim=1))
    _close(live_baseline_gap(eps_c, eps_u, sigma=sigma), (s_c - s_u).flatten(1).norm(dim=1))
    for mode, (a, b) in {"x,c|x": (s_u, s_c - s_u), "x,x|c": (s_u, s_c), "x|c,c|x": (s_c, s_c - s_u)}.items():
        ref = F.cosine_similarity(a, b, dim=1).flatten(1).mean(1)  # score space: the common −σ cancels
        _close(anisotropy_cosine(eps_c, eps_u, mode=mode), ref)
    # Asthana & B. (epsilon path) at a high and a low noise level of the flow schedule, two generations per prompt
    t_lo, _, sigma_lo = _at_level(den, 60)
    with torch.no_grad():
        lo = den.eps_cond_uncond(x[:2], t_lo, COND, UNCOND)
        hi = den.eps_cond_uncond(x[:2], t, COND, UNCOND)
    s_lo = law_c.flow(sigma_lo).score(x[:2]), law_u.flow(sigma_lo).score(x[:2])
    norm = (sigma * (s_c - s_u)[:2].flatten(1).norm(dim=1)).mean()
    cos = F.cosine_similarity(s_lo[1], s_lo[0] - s_lo[1], dim=1).flatten(1).mean(1).mean()
    _close(asthana_score(*hi, *lo, preset="sd1", num_generations=2), (1.0 * norm + 2.0 * cos).reshape(1))


def test_at_pure_noise_a_flow_models_noise_gap_vanishes_and_its_velocity_gap_is_the_gap_of_the_means():
    """σ = 1 (the flow sampler's first step): ε̂ = x_t + α v = x_t whatever the network, so every eps-space gap is 0
    there; the velocity gap is ``x̂_0(∅) − x̂_0(c)`` = the difference of the two laws' means."""
    law_u, law_c = _two_laws()
    den = _flow_den([law_u, law_c])
    t = den.schedule.timesteps_at(torch.tensor(T - 1))
    assert float(t) == T and float(den.schedule.ve_sigma(t)) == math.inf
    x = _points(law_c.flow(1.0), 3, 4)
    with torch.no_grad():
        eps_c, eps_u = den.eps_cond_uncond(x, t, COND, UNCOND)
        v_c, v_u = den.raw_cond_uncond(x, t, COND, UNCOND)
    torch.testing.assert_close(eps_c, x, rtol=0, atol=0)
    assert float(wen_norm(eps_c, eps_u).abs().max()) == 0.0
    mean = {k: (m.weights[:, None] * m.means).sum(0) for k, m in (("u", law_u), ("c", law_c))}
    _close(wen_norm(v_c, v_u), (mean["c"] - mean["u"]).norm().expand(3))


# ---------------------------------------------------------------------------------------------------- curvature
def test_jacobian_products_of_the_flow_eps_are_minus_sigma_times_the_exact_hessian():
    mix = _mixtures()["full"]
    den = _flow_den(mix)
    t, _, sigma = _at_level(den, LEVEL)
    law = mix.flow(sigma)
    x = torch.cat([_points(law, 2, 5), _between(law)])
    probes = rademacher_probes(x, 6, generator=0)
    exact = torch.einsum("bij,kbj->kbi", -sigma * law.hessian(x), probes.reshape(6, 3, D)).reshape(probes.shape)
    for method in ("jvp", "vjp"):
        _close(jacobian_products(den.eps_fn(t), x, probes, method=method), exact)
    torch.testing.assert_close(jacobian_products(den.eps_fn(t), x, probes, method="fd", fd_step=1e-5), exact,
                               atol=1e-8, rtol=1e-7)


def test_hutchinson_diagonal_and_trace_of_the_flow_eps_converge_to_the_exact_hessian():
    mix = _mixtures()["diagonal"]
    den = _flow_den(mix)
    t, _, sigma = _at_level(den, LEVEL)
    law = mix.flow(sigma)
    R = 200  # independent estimates of the same point, one per batch row
    x = _between(law).repeat(R, 1, 1, 1)
    J = -sigma * law.hessian(x[:1])[0]
    exact = torch.diagonal(J).reshape(SHAPE)
    off = J.pow(2).sum(1) - torch.diagonal(J).pow(2)  # Rademacher: Var[(v ⊙ Jv)_i] = Σ_{j≠i} J_ij²
    for K in (8, 128):
        est = hutchinson_diagonal(den.eps_fn(t), x, num_probes=K, generator=K, method="jvp")
        # the same probes on the exact field give the same numbers
        _close(est, hutchinson_diagonal(law.eps_fn(sigma), x, num_probes=K, generator=K, method="jvp"))
        rms = (est - exact).pow(2).mean(0).sqrt().flatten()
        theory = (off / K).sqrt()
        assert torch.allclose(rms, theory, rtol=0.3), (K, rms, theory)
        assert (est.mean(0) - exact).abs().max() < 4 * theory.max() / math.sqrt(R)  # unbiased
        tr = hutchinson_trace(den.eps_fn(t), x, num_probes=K, generator=K)
        tr_theory = (2 * off.sum() / K).sqrt()  # J symmetric: Var[vᵀJv] = 2 Σ_{i≠j} J_ij²
        assert abs((tr + sigma * law.laplacian(x[:1])).pow(2).mean().sqrt() / tr_theory - 1) < 0.25


def test_curvature_and_score_difference_maps_of_two_laws_match_their_closed_forms():
    law_u, law_c = _two_laws()
    den = _flow_den([law_u, law_c])
    t, _, sigma = _at_level(den, LEVEL)
    lu, lc = law_u.flow(sigma), law_c.flow(sigma)
    x = torch.cat([_points(lc, 1, 7), _points(lu, 1, 8)])
    K = 4000
    fn = den.guidance_fn(t, COND, UNCOND)  # eps_c − eps_u from one batched call
    signed = curvature_diff_map(fn, None, x, num_probes=K, generator=0, sigma=sigma, positive_part=False)
    # closed form: (1/σ) Σ_c diag(∂(ε_c − ε_u)/∂x) = −Σ_c (diag H_c − diag H_u)
    exact = -(lc.hessian_diag(x) - lu.hessian_diag(x)).reshape(2, *SHAPE).sum(1)
    same_probes = curvature_diff_map(lc.eps_fn(sigma), lu.eps_fn(sigma), x, num_probes=K, generator=0, sigma=sigma,
                                     positive_part=False)
    _close(signed, same_probes)
    probes = rademacher_probes(x, K, generator=0)
    jac = -sigma * (lc.hessian(x) - lu.hessian(x))
    samples = (probes * torch.einsum("bij,kbj->kbi", jac, probes.reshape(K, 2, D)).reshape(probes.shape)).sum(2)
    se = (samples / sigma).std(0) / math.sqrt(K)
    assert ((signed - exact).abs() <= 5 * se + 1e-12).all()
    with torch.no_grad():
        eps_c, eps_u = den.eps_cond_uncond(x, t, COND, UNCOND)
    _close(score_diff_map(eps_c, eps_u, sigma=sigma), (lc.score(x) - lu.score(x)).pow(2).sum(1))


# ---------------------------------------------------------------------------------------------------- p-Laplace
def test_p_laplacians_of_the_flow_denoiser_match_the_closed_forms():
    mix = _mixtures()["diagonal"]
    den = _flow_den(mix)
    t, _, sigma = _at_level(den, LEVEL)
    law = mix.flow(sigma)
    x = torch.cat([_points(law, 3, 9), _between(law)])
    for method in ("jvp", "vjp"):
        _close(infinity_laplacian(den.eps_fn(t), x, sigma=sigma, method=method), law.infinity_laplacian(x), 1e-9)
    _close(p_laplacian_hutchinson(den.eps_fn(t), x, sigma=sigma, p=math.inf), law.infinity_laplacian(x), 1e-9)
    h = law.hessian(x)
    off = h - torch.diag_embed(torch.diagonal(h, dim1=-2, dim2=-1))
    K = 4096
    std = (2.0 / K * (off**2).sum((-1, -2))).sqrt()  # of the Rademacher trace of the (symmetric) Hessian
    for p in (1.0, 2.0, 3.0):
        est = p_laplacian_hutchinson(den.eps_fn(t), x, sigma=sigma, p=p, num_probes=K, generator=int(10 * p))
        exact = law.p_laplacian(x, p)
        prefactor = law.score(x).reshape(4, -1).norm(dim=1) ** (p - 2)
        assert ((est - exact).abs() <= 5 * prefactor * std + 1e-4 * exact.abs() + 1e-6).all(), (p, est, exact)


def test_noise_recovery_flux_with_the_interpolants_coefficients():
    g = torch.Generator().manual_seed(6)
    z0 = torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    den = _flow_den(point_masses(z0))
    t, alpha, sigma = _at_level(den, 100)
    # a model that memorized z0 returns the injected noise exactly: k = 1
    k = noise_recovery_flux(den.eps_fn(t), z0, alpha=alpha, sigma=sigma, num_points=32, generator=0)
    _close(k, torch.ones(1, dtype=torch.float64), 1e-12)
    # a broad law: k is the mean cosine of the exact ε at the sphere points y_k = α z0 + σ√d n_k
    broad = _mixtures()["isotropic"]
    z = torch.cat([z0, torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)])
    k = noise_recovery_flux(_flow_den(broad).eps_fn(t), z, alpha=alpha, sigma=sigma, num_points=64, generator=7)
    pts = sphere_points(alpha * z, sigma * math.sqrt(D), 64, generator=7)
    e = broad.flow(sigma).eps_fn(sigma)(pts.points.reshape(-1, *SHAPE)).reshape(64, 2, -1)
    ref = F.cosine_similarity(e, pts.normals.reshape(64, 2, -1), dim=-1).mean(0)
    _close(k, ref)
    assert (k < 0.9).all()
    per_sample = noise_recovery_flux(_flow_den(broad).eps_fn(t), z, alpha=torch.full((2,), alpha, dtype=torch.float64),
                                     sigma=torch.full((2,), sigma, dtype=torch.float64), num_points=64, generator=7)
    _close(per_sample, k)
    with pytest.raises(ValueError, match="not both"):
        noise_recovery_flux(den.eps_fn(t), z0, 0.5, alpha=alpha, sigma=sigma)
    with pytest.raises(ValueError, match="alpha= and sigma="):
        noise_recovery_flux(den.eps_fn(t), z0, alpha=alpha)


# ---------------------------------------------------------------------------------------------------- trajectory
def test_first_step_loss_with_the_interpolants_snr_is_the_rms_error_of_the_flow_x0_prediction():
    mix = _mixtures()["diagonal"]
    den = _flow_den(mix)
    t, alpha, sigma = _at_level(den, 900)  # high noise (σ < 1: at σ = 1 the SNR is 0 and A_c is undefined)
    x_star = _points(mix, 3, 11)
    x_t, eps = sample_forward_noise(x_star, alpha=alpha, sigma=sigma, num_draws=8,
                                    generator=torch.Generator().manual_seed(0))
    assert x_t.shape == (8, 3, *SHAPE)
    _close(x_t, alpha * x_star + sigma * eps, 1e-14)
    with torch.no_grad():
        eps_pred = den.eps(x_t.reshape(-1, *SHAPE), t).reshape(x_t.shape)
        x0_pred = den.x0(x_t.reshape(-1, *SHAPE), t).reshape(x_t.shape)
    a_c = normalized_first_step_loss(eps_pred, eps, alpha=alpha, sigma=sigma)
    _close(a_c, ((x0_pred - x_star) ** 2).sum((2, 3, 4)).mean(0).div(D).sqrt())
    # a model of the point mass at x* recovers it from any noise: A_c = 0
    mem = _flow_den(point_masses(x_star[:1].reshape(1, D)))
    with torch.no_grad():
        eps_mem = mem.eps(x_t[:, 0], t)
    assert float(normalized_first_step_loss(eps_mem, eps[:, 0], alpha=alpha, sigma=sigma, draw_dim=0,
                                            event_ndim=3).max()) < 1e-10
    with pytest.raises(ValueError, match="alpha > 0"):
        normalized_first_step_loss(eps_pred, eps, alpha=0.0, sigma=1.0)


def test_guided_x0_prediction_with_the_interpolants_coefficients_and_the_cfg_overshoot():
    law_u, law_c = _two_laws()
    den = _flow_den([law_u, law_c])
    t, alpha, sigma = _at_level(den, LEVEL)
    x = _points(law_u.flow(sigma), 4, 12)
    g = 4.0
    with torch.no_grad():
        eps_c, eps_u = den.eps_cond_uncond(x, t, COND, UNCOND)
        v_c, v_u = den.raw_cond_uncond(x, t, COND, UNCOND)
    out = guided_x0_prediction(x, eps_u, eps_c, guidance_scale=g, alpha=alpha, sigma=sigma)
    x0_u, x0_c = law_u.posterior_mean_fn(alpha, sigma)(x), law_c.posterior_mean_fn(alpha, sigma)(x)
    _close(out, x0_u + g * (x0_c - x0_u))
    guided_v = v_u + g * (v_c - v_u)  # what the flow sampler steps with (den.guided, in float64)
    _close(out, x0_from_prediction(guided_v, x, torch.tensor(alpha, dtype=torch.float64),
                                     torch.tensor(sigma, dtype=torch.float64), "flow_prediction"))
    with pytest.raises(TypeError, match="guidance_scale"):
        guided_x0_prediction(x, eps_u, eps_c, alpha=alpha, sigma=sigma)
    # Cor. 3 near the flow's first step: prompt law = point mass at x*, unconditional = uniform over the training set
    train = torch.randn(6, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_star, mu = train[0], train.mean(0)
    mem = _flow_den([point_masses(train), point_masses(x_star[None])])
    t_top, alpha, sigma = _at_level(mem, T - 2)  # σ ≈ 0.9993
    x_t = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        eps_c, eps_u = mem.eps_cond_uncond(x_t, t_top, COND, UNCOND)
    x0 = guided_x0_prediction(x_t, eps_u, eps_c, guidance_scale=7.5, alpha=alpha, sigma=sigma)
    coef = overshoot_coefficient(x0, x_star.reshape(SHAPE), mu.reshape(SHAPE), seed_dim=0)
    assert float(coef) == pytest.approx(7.5, rel=2e-2)


def test_the_alpha_sigma_keywords_with_ddpms_coefficients_are_the_alpha_bar_path():
    g = torch.Generator().manual_seed(13)
    x, e1, e2 = (torch.randn(3, *SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    ab = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    col = (-1, 1, 1, 1)
    _close(guided_x0_prediction(x, e1, e2, ab.reshape(col), 3.0),
           guided_x0_prediction(x, e1, e2, guidance_scale=3.0, alpha=a.reshape(col), sigma=s.reshape(col)), 1e-14)
    _close(normalized_first_step_loss(e1, e2, ab, draw_dim=None),
           normalized_first_step_loss(e1, e2, alpha=a, sigma=s, draw_dim=None), 1e-12)
    xt_bar, n_bar = sample_forward_noise(x, 0.3, 2, generator=torch.Generator().manual_seed(0))
    xt, n = sample_forward_noise(x, alpha=math.sqrt(0.3), sigma=math.sqrt(0.7), num_draws=2,
                                 generator=torch.Generator().manual_seed(0))
    _close(xt, xt_bar, 1e-14)
    torch.testing.assert_close(n, n_bar, rtol=0, atol=0)
    _close(torch.stack(theoretical_schedule(ab)), torch.stack(theoretical_schedule(alpha=a, sigma=s)), 1e-15)
    b = torch.tensor([[0.5, 0.1], [0.9, 0.7], [0.9, 1.2]], dtype=torch.float64)
    _close(schedule_deviation(b, ab), schedule_deviation(b, alpha=a), 1e-15)
    fn = _mixtures()["isotropic"].vp_from_alpha_bar(0.5).eps_fn(math.sqrt(0.5))
    _close(noise_recovery_flux(fn, x, ab, num_points=8, generator=1),
           noise_recovery_flux(fn, x, alpha=a, sigma=s, num_points=8, generator=1), 1e-12)
    with pytest.raises(ValueError, match="not both"):
        guided_x0_prediction(x, e1, e2, 0.5, 2.0, alpha=0.5, sigma=0.5)
    with pytest.raises(ValueError, match="alpha= and sigma="):
        normalized_first_step_loss(e1, e2, alpha=0.5)
    with pytest.raises(TypeError, match="num_draws"):
        sample_forward_noise(x, alpha=0.5, sigma=0.5, generator=torch.Generator())


def _flow_trajectory(den: Denoiser, x_T: torch.Tensor, guidance_scale: float, num_steps: int = 10):
    """The flow sampler's Euler steps in float64 with guided velocities; latents (x_T first) and (α, σ) of each."""
    schedule = den.schedule
    xs, alphas, sigmas = [x_T], [], []
    x = x_T
    for t, t_prev in sampling_steps(den, num_steps):
        a, s = schedule.sampler_coefs(t, x)
        alphas.append(float(a))
        sigmas.append(float(s))
        with torch.no_grad():
            v_c, v_u = den.raw_cond_uncond(x, t, COND, UNCOND)
        v = v_u + guidance_scale * (v_c - v_u)
        x = schedule.step(den.to_x0(v, x, t), den.to_eps(v, x, t), t_prev)
        xs.append(x)
    alphas.append(1.0)
    sigmas.append(0.0)
    return torch.stack(xs), alphas, sigmas


def test_the_flow_sampler_on_a_memorized_point_follows_the_theoretical_schedule_and_cfg_overshoots_it():
    """Euler on a point mass at x* from σ = 1: x_t = σ_t x_T + α_t x* exactly (the theoretical shares). With a
    memorized prompt (point mass) against a uniform unconditional law and g = 7.5 the early image share overshoots α_t;
    with g = 1 it is the schedule; a broad N(0, I) prompt carries no x*."""
    train = torch.randn(6, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_star = train[:1]
    x_T = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    star = x_star.reshape(1, *SHAPE)
    mem = _flow_den([point_masses(train), point_masses(x_star)])
    xs, alphas, sigmas = _flow_trajectory(mem, x_T, 1.0)
    out = decompose_latents(xs, x_T, star)
    noise_share, image_share = theoretical_schedule(alpha=alphas, sigma=sigmas)
    assert alphas[0] == 0.0 and sigmas[0] == 1.0
    _close(out.noise_coef[:, 0], noise_share)
    _close(out.image_coef[:, 0], image_share)
    assert out.residual_ratio.max() < 1e-10
    assert float(schedule_deviation(out.image_coef, alpha=alphas).abs().max()) < 1e-10
    xs, alphas, _ = _flow_trajectory(mem, x_T, 7.5)
    dev = schedule_deviation(decompose_latents(xs, x_T, star).image_coef, alpha=alphas, num_steps=4)
    assert float(dev) > 1.0
    broad = GaussianMixture(torch.zeros(1, D, dtype=torch.float64), None, 1.0)
    xs, _, _ = _flow_trajectory(_flow_den([broad, broad]), x_T, 7.5)
    assert decompose_latents(xs, x_T, star).image_coef.abs().max() < 1e-10
    with pytest.raises(ValueError, match="alpha_bars"):
        schedule_deviation(out.image_coef)
    with pytest.raises(ValueError, match="one value per step"):
        theoretical_schedule(alpha=alphas, sigma=sigmas[:-1])


# ---------------------------------------------------------------------------------------------------- danger zone
def test_the_danger_zone_curves_of_point_masses_on_the_ve_equivalent_grid_of_the_flow_levels():
    """W_σ from the flow denoiser's x̂_0 (point masses: x̂_0 = Σ_i w_i x_i, so the posterior weights are the affine
    coordinates of x̂_0) at ``x_t = α x_j + σ z`` equals the VE curve at ``σ/α``; the shells of the flow's own noisy
    training inputs (radius σ√d around α x_i) are the VE shells at σ/α."""
    train = torch.randn(4, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    held = torch.randn(6, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den = _flow_den(point_masses(train))
    levels = [20, 150, 400, 650, 850]
    ve = den.schedule.level_sigmas()[levels]
    M = 64
    w_lib = max_posterior_weights(train, ve, num_probes=M, generator=torch.Generator().manual_seed(3))
    c_lib = shell_coverage(train, ve, num_probes=M, generator=torch.Generator().manual_seed(4), population=held,
                           shell_constant=1.0)
    g = torch.Generator().manual_seed(3)  # the library's probes: a training row each, then the noise
    pick = torch.randint(4, (M,), generator=g)
    z = torch.randn(M, D, generator=g, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    pop_pick = torch.randint(6, (M,), generator=g)
    pop_z = torch.randn(M, D, generator=g, dtype=torch.float64)
    q_lo, q_hi = shell_interval(D, 1.0)
    affine = torch.cat([train.T, torch.ones(1, 4, dtype=torch.float64)])  # (d + 1, N)
    for k, level in enumerate(levels):
        t, alpha, sigma = _at_level(den, level)
        _close(ve[k], torch.tensor(sigma / alpha, dtype=torch.float64), 1e-12)
        x_t = alpha * train[pick] + sigma * z
        with torch.no_grad():
            x0 = den.x0(x_t.reshape(M, *SHAPE), t).reshape(M, D)
        _close(x0, empirical_optimal_denoiser(x_t / alpha, train, float(ve[k])), 1e-9)
        w = torch.linalg.lstsq(affine, torch.cat([x0.T, torch.ones(1, M, dtype=torch.float64)])).solution.T
        _close(w.max(1).values, w_lib[:, k], 1e-8)
        y = alpha * held[pop_pick] + sigma * pop_z  # a noisy input the flow sampler may visit
        stat = torch.cdist(y, alpha * train) ** 2 / sigma**2
        covered = ((stat >= q_lo) & (stat <= q_hi)).any(1).double()
        torch.testing.assert_close(covered, c_lib[:, k], rtol=0, atol=0)
    assert w_lib.mean(0)[0] > 0.99 and w_lib.mean(0)[-1] < 0.6  # concentrated at small σ, spread at large σ


def test_a_band_in_ve_sigma_maps_to_levels_of_the_same_ve_sigma_in_both_families():
    sigmas = torch.logspace(-2, 2, 9)
    coverage = torch.tensor([0, 0, 0, 0.5, 0.9, 1, 1, 1, 1])  # rises to 0.5 at σ = 10^-0.5
    weight = torch.tensor([1, 1, 1, 1, 1, 0.5, 0.2, 0.1, 0.1])  # falls to 0.5 at σ = 10^0.5
    ddpm = DDPMSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=T))
    flow = FlowMatchSchedule.from_scheduler(_flow_scheduler())
    found = {}
    for name, schedule in (("ddpm", ddpm), ("flow", flow)):
        table = schedule.level_sigmas()
        band = danger_zone_band(sigmas, weight, coverage, level_sigmas=table)
        assert band.sigma_lo == pytest.approx(10**-0.5) and band.sigma_hi == pytest.approx(10**0.5)
        assert table[band.t_lo] >= band.sigma_lo > table[band.t_lo - 1]
        assert table[band.t_hi] <= band.sigma_hi < table[band.t_hi + 1]
        # the levels' own timesteps give the same VE σ (σ/α at t = σ·T for flow, ᾱ_t for DDPM)
        for level in (band.t_lo, band.t_hi):
            t = schedule.timesteps_at(torch.tensor(level))
            if name == "flow":
                s = float(t.double()) / T
                assert float(table[level]) == pytest.approx(s / (1 - s), rel=1e-12)
            assert int(schedule.levels_of(t)) == level
        found[name] = (table, band)
    for end in ("t_lo", "t_hi"):
        (td, bd), (tf, bf) = found["ddpm"], found["flow"]
        kd, kf = getattr(bd, end), getattr(bf, end)
        spacing = max(float((td[kd + 1] / td[kd]).log()), float((tf[kf + 1] / tf[kf]).log()))
        assert abs(float((td[kd] / tf[kf]).log())) <= spacing


class BandMemorizer(torch.nn.Module):
    """tests/callbacks/test_danger_zone.py's memorizer for any family: a model whose clean-image estimate is the
    empirical optimal denoiser of ``train`` for VE-equivalent σ/α in ``[lo, hi]`` and the posterior mean of a
    Gaussian fitted to the data elsewhere; it outputs ε (DDPM) or the velocity ε − x̂_0 (flow)."""

    def __init__(self, train, coefs, prediction_type, lo, hi):
        super().__init__()
        self.train_points, self.coefs, self.prediction_type, self.lo, self.hi = train.double(), coefs, \
            prediction_type, lo, hi
        self.mean, self.var = train.double().mean(0), train.double().var()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # device and dtype for the sampler
        self.config = SimpleNamespace(in_channels=train.shape[1], sample_size=train.shape[-1])

    def forward(self, x, t, encoder_hidden_states=None, return_dict=True):
        alpha, sigma = self.coefs(torch.as_tensor(t).reshape(-1)[0])  # the sampler calls every row at one timestep
        x = x.double()
        ve = sigma / alpha if alpha > 0 else math.inf
        if self.lo <= ve <= self.hi:
            x0 = empirical_optimal_denoiser(x / alpha, self.train_points, ve)
        else:  # Gaussian posterior mean, written without dividing by α (α = 0 at the flow's first step)
            x0 = self.mean + (x - alpha * self.mean) * alpha * self.var / (alpha**2 * self.var + sigma**2)
        eps = (x - alpha * x0) / sigma
        out = (eps if self.prediction_type == "epsilon" else eps - x0).float()
        return SimpleNamespace(sample=out) if return_dict else (out,)


def _crossing(log_sigmas: list[float], rates: list[float], level: float) -> float:
    """log σ where a falling rate last stays at or above ``level`` (linear interpolation in log σ)."""
    k = max(i for i, r in enumerate(rates) if r >= level)
    frac = (rates[k] - level) / (rates[k] - rates[k + 1])
    return log_sigmas[k] + frac * (log_sigmas[k + 1] - log_sigmas[k])


def test_ddpm_and_flow_models_of_one_memorizer_put_the_live_band_at_the_same_ve_sigma():
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(24, 1, 4, 4, generator=gen) * 1.6 - 0.8  # "images" of 16 pixels in [-1, 1]
    held = torch.rand(12, 1, 4, 4, generator=gen) * 1.6 - 0.8
    lo, hi = 0.1, 0.5
    probes = torch.cat([train[:8], held])
    draws = 4
    x0 = probes.repeat_interleave(draws, 0)
    noise = torch.randn(x0.shape, generator=gen)
    reference = (torch.cat([train, held]) + 1) / 2
    own = torch.cat([torch.arange(8), 24 + torch.arange(12)]).repeat_interleave(draws)
    is_training = torch.tensor([True] * 24 + [False] * 12)
    kind = torch.tensor([True] * 8 + [False] * 12).repeat_interleave(draws)
    ddpm = DDPMScheduler(num_train_timesteps=T)
    families = {"ddpm": (ddpm, ddpm_coefs(ddpm.alphas_cumprod), "epsilon"),
                "flow": (_flow_scheduler(), flow_coefs(T), "flow_prediction")}
    profiles = {}
    for name, (sched, coefs, prediction_type) in families.items():
        den = Denoiser(BandMemorizer(train, coefs, prediction_type, lo, hi), sched)
        steps = 25
        # the tracker's grid: every sampler step with a finite VE σ (not the flow's σ = 1)
        grid = [(k, t) for k, (t, _) in enumerate(sampling_steps(den, steps))
                if math.isfinite(float(den.schedule.ve_sigma(torch.tensor(t))))]
        starts = [k for k, _ in grid]
        sigmas = [float(den.schedule.ve_sigma(torch.tensor(t))) for _, t in grid]
        levels = [int(den.schedule.levels_of(torch.tensor(t))) for _, t in grid]
        images = denoise_from(den, x0, noise, starts, torch.zeros(x0.shape[0], 1, 1), num_inference_steps=steps)
        returns, lands = return_flags(images, reference, own, is_training, 1 / 3)
        profile = return_profile(levels, sigmas, returns, lands, {"at_risk": kind, "heldout": ~kind})
        excess = profile.excess()
        inside = [k for k, s in enumerate(profile.sigmas) if lo <= s <= hi]
        assert inside and all(profile.rates["at_risk"][k] >= 0.9 and profile.rates["heldout_self"][k] == 0.0
                              and profile.rates["heldout_copy"][k] > 0.5 for k in inside), name
        assert all(abs(e) < 0.2 for e, s in zip(excess, profile.sigmas) if s < lo / 2), name
        band = band_from_excess(excess, 0.5)
        assert band is not None and band[0] == inside[0] and band[1] >= inside[-1], (name, band)
        profiles[name] = profile
    # the band's upper end (where the excess falls through 1/2) at the same VE σ, within one grid spacing
    ends, spacing = {}, 0.0
    for name, profile in profiles.items():
        log_s = [math.log(s) for s in profile.sigmas]
        ends[name] = _crossing(log_s, profile.excess(), 0.5)
        k = max(i for i, s in enumerate(log_s) if s <= ends[name])
        spacing = max(spacing, log_s[k + 1] - log_s[k])
        assert math.log(hi) <= ends[name] <= math.log(4 * hi), name
    assert abs(ends["ddpm"] - ends["flow"]) <= spacing, (ends, spacing)


# ---------------------------------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("family,prediction_type", [("flow", "flow_prediction"), ("ddpm", "epsilon"),
                                                    ("ddpm", "v_prediction"), ("ddpm", "sample")])
def test_the_sampler_with_an_oracle_of_a_point_mass_returns_it(family, prediction_type):
    """Flow: Euler on the linear interpolant is exact for a point mass (x̂_0 = x* at every step), and sampling ends at
    σ = 0: the sample is x*. DDPM: DDIM keeps ε̂ = (x_T − α_T x*)/σ_T at every step and ends at ᾱ_0 (Stable
    Diffusion's ``set_alpha_to_one=False``): the sample is α_0 x* + σ_0 ε̂."""
    g = torch.Generator().manual_seed(3)
    x_star = (torch.rand(1, *SHAPE, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    latents = torch.randn(2, *SHAPE, generator=g)
    cond = torch.zeros(2, 1, 1)
    if family == "flow":
        den = _flow_den(point_masses(x_star.reshape(1, D)))
        expected = x_star.expand(2, *SHAPE)
    else:
        sched = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)
        den = Denoiser(MixtureNet(point_masses(x_star.reshape(1, D)), ddpm_coefs(sched.alphas_cumprod),
                                  prediction_type, SHAPE), sched)
        t_first = sampling_steps(den, 10)[0][0]
        ab = sched.alphas_cumprod.double()
        eps = (latents.double() - ab[t_first].sqrt() * x_star) / (1 - ab[t_first]).sqrt()
        expected = ab[0].sqrt() * x_star + (1 - ab[0]).sqrt() * eps
    tol = 1e-6  # float32 steps (the errors are ~1e-7)
    images = generate(den, cond, num_inference_steps=10, latents=latents)
    torch.testing.assert_close(2 * images.double() - 1, expected, rtol=0, atol=tol)
    if family == "flow":  # from every start of the sampler's schedule the point comes back as itself
        back = denoise_from(den, x_star.expand(2, *SHAPE).float(), latents, list(range(10)), cond,
                            num_inference_steps=10)
        torch.testing.assert_close(2 * back.double() - 1, x_star.expand(10, 2, *SHAPE), rtol=0, atol=tol)
