"""Kim, Kim & Lee (2025) trajectory signals on constructed cases with known answers."""

import math

import pytest
import torch

from mnemoguard.signals.trajectory import (
    decompose_latents,
    guided_x0_prediction,
    normalized_first_step_loss,
    overshoot_coefficient,
    project_onto,
    sample_forward_noise,
    schedule_deviation,
    theoretical_schedule,
)
from tests.gmm import GaussianMixture, point_masses

SHAPE = (2, 4, 4)
D = math.prod(SHAPE)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_overshoot_coefficient_recovers_planted_factor_and_off_target():
    x_star, mu = _randn(3, *SHAPE, seed=1), _randn(*SHAPE, seed=2)
    v = x_star - mu
    ortho = _randn(3, *SHAPE, seed=3)
    ortho = ortho - (ortho * v).sum((1, 2, 3), keepdim=True) / (v * v).sum((1, 2, 3), keepdim=True) * v
    x0 = mu + 7.5 * v + ortho
    torch.testing.assert_close(overshoot_coefficient(x0, x_star, mu), torch.full((3,), 7.5, dtype=torch.float64))
    proj = project_onto(x0 - mu, v)
    torch.testing.assert_close(proj.off_target, ortho.flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1))


def test_overshoot_pooled_over_seeds_is_the_least_squares_fit():
    x_star, mu = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    x0 = _randn(5, *SHAPE, seed=4) + 3 * (x_star - mu)  # five seeds of one pair
    v = (x_star - mu).reshape(-1, 1).repeat(5, 1)
    ref = torch.linalg.lstsq(v, (x0 - mu).reshape(-1, 1)).solution.squeeze()
    torch.testing.assert_close(overshoot_coefficient(x0, x_star, mu, seed_dim=0), ref)


def test_cfg_on_exact_mixture_scores_overshoots_by_the_guidance_scale():
    """Cor. 3 with exact scores: conditional law = point mass at x*, unconditional = uniform over the training set."""
    train = _randn(6, D, seed=5)
    x_star, mu = train[0], train.mean(0)
    alpha_bar, g = 1e-5, 7.5
    s = math.sqrt(1 - alpha_bar)
    eps_c = point_masses(x_star[None]).vp_from_alpha_bar(alpha_bar).eps_fn(s)
    eps_u = point_masses(train).vp_from_alpha_bar(alpha_bar).eps_fn(s)
    x_t = _randn(16, *SHAPE, seed=6)
    x0 = guided_x0_prediction(x_t, eps_u(x_t), eps_c(x_t), alpha_bar, g)
    coef = overshoot_coefficient(x0, x_star.reshape(SHAPE), mu.reshape(SHAPE), seed_dim=0)
    assert float(coef) == pytest.approx(g, rel=2e-2)


def test_guided_x0_prediction_with_unit_guidance_is_the_conditional_prediction():
    x_t, eu, ec = _randn(2, *SHAPE, seed=1), _randn(2, *SHAPE, seed=2), _randn(2, *SHAPE, seed=3)
    ref = (x_t - math.sqrt(0.7) * ec) / math.sqrt(0.3)
    torch.testing.assert_close(guided_x0_prediction(x_t, eu, ec, 0.3, 1.0), ref)


def test_normalized_first_step_loss_equals_x0_prediction_rms_error():
    x_star = _randn(3, *SHAPE, seed=1)
    alpha_bar = 0.01
    x_t, eps = sample_forward_noise(x_star, alpha_bar, 8, generator=torch.Generator().manual_seed(0))
    assert x_t.shape == (8, 3, *SHAPE)
    eps_pred = eps + 0.2 * _randn(8, 3, *SHAPE, seed=7)
    a_c = normalized_first_step_loss(eps_pred, eps, alpha_bar)
    x0_pred = (x_t - math.sqrt(1 - alpha_bar) * eps_pred) / math.sqrt(alpha_bar)
    ref = ((x0_pred - x_star) ** 2).sum((2, 3, 4)).mean(0).div(D).sqrt()
    torch.testing.assert_close(a_c, ref)


def test_normalized_first_step_loss_is_zero_for_a_perfect_predictor_and_single_draw_works():
    eps = _randn(4, *SHAPE)
    assert normalized_first_step_loss(eps, eps, 0.5, draw_dim=None).abs().max() == 0
    delta = torch.zeros_like(eps)
    delta[..., 0, 0, 0] = 2.0
    out = normalized_first_step_loss(eps + delta, eps, 0.5, draw_dim=None)
    torch.testing.assert_close(out, torch.full((4,), 2.0 / math.sqrt(D), dtype=torch.float64))


def test_decomposition_recovers_planted_coefficients_and_orthogonal_residual():
    x_T, x_star = _randn(3, *SHAPE, seed=1), _randn(3, *SHAPE, seed=2)
    a = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    b = torch.tensor([0.1, 0.6, 1.2], dtype=torch.float64)
    basis = torch.stack([x_T.flatten(1), x_star.flatten(1)], -1)  # (3, D, 2)
    r = _randn(3, D, seed=3)
    proj = basis @ torch.linalg.solve(basis.mT @ basis, basis.mT @ r[..., None])
    r = (r - proj.squeeze(-1)).reshape(3, *SHAPE) * 0.1  # orthogonal to both components
    x_t = a[:, None, None, None] * x_T + b[:, None, None, None] * x_star + r
    out = decompose_latents(x_t, x_T, x_star)
    torch.testing.assert_close(out.noise_coef, a)
    torch.testing.assert_close(out.image_coef, b)
    torch.testing.assert_close(out.residual_ratio, r.flatten(1).norm(dim=1) / x_t.flatten(1).norm(dim=1))


def _ddim(eps_fns, alpha_bars, x_T):
    """Deterministic DDIM (η = 0) over the given ᾱ schedule (decreasing noise); returns all latents, x_T first."""
    xs = [x_T]
    x = x_T
    for k in range(len(alpha_bars) - 1):
        a, a_next = alpha_bars[k], alpha_bars[k + 1]
        eps = eps_fns[k](x)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
        xs.append(x)
    return torch.stack(xs)


def test_decomposition_of_a_memorizing_ddim_trajectory_matches_closed_form():
    """Exact scores of a point mass at x*: x_t = (s_t/s_T) x_T + (α_t − s_t α_T/s_T) x* at every step."""
    x_star = _randn(1, D, seed=1)
    alpha_bars = torch.linspace(0.005, 0.99, 10).tolist()
    eps_fns = [point_masses(x_star).vp_from_alpha_bar(a).eps_fn(math.sqrt(1 - a)) for a in alpha_bars]
    x_T = _randn(1, *SHAPE, seed=2)
    xs = _ddim(eps_fns, alpha_bars, x_T)
    out = decompose_latents(xs, x_T, x_star.reshape(1, *SHAPE))
    ab = torch.tensor(alpha_bars, dtype=torch.float64)
    s, al = (1 - ab).sqrt(), ab.sqrt()
    torch.testing.assert_close(out.noise_coef[:, 0], s / s[0])
    torch.testing.assert_close(out.image_coef[:, 0], al - s * al[0] / s[0])
    assert out.residual_ratio.max() < 1e-10


def _guided(eps_u, eps_c, g):
    return lambda x: eps_u(x) + g * (eps_c(x) - eps_u(x))


def test_cfg_on_a_memorized_pair_overestimates_the_image_share_early():
    """Exact scores: prompt law = point mass at x*, unconditional = uniform over the training set (Cor. 3 setting).

    With g = 7.5 the early image share b_t overshoots sqrt(ᾱ_t); with g = 1 it follows the schedule; a prompt whose
    law is the broad N(0, I) carries no x* at all (b_t = 0).
    """
    alpha_bars = torch.linspace(0.005, 0.99, 10).tolist()
    train = _randn(6, D, seed=1)
    x_star = train[:1]
    x_T = _randn(1, *SHAPE, seed=2)

    def run(cond, g):
        fns = []
        for a in alpha_bars:
            s = math.sqrt(1 - a)
            eps_u = point_masses(train).vp_from_alpha_bar(a).eps_fn(s)
            fns.append(_guided(eps_u, cond.vp_from_alpha_bar(a).eps_fn(s), g))
        return decompose_latents(_ddim(fns, alpha_bars, x_T), x_T, x_star.reshape(1, *SHAPE)).image_coef[:, 0]

    dev_mem = schedule_deviation(run(point_masses(x_star), 7.5), alpha_bars, num_steps=4)
    dev_g1 = schedule_deviation(run(point_masses(x_star), 1.0), alpha_bars, num_steps=4)
    broad = GaussianMixture(torch.zeros(1, D, dtype=torch.float64), None, 1.0)
    b_broad = decompose_latents(
        _ddim([broad.vp_from_alpha_bar(a).eps_fn(math.sqrt(1 - a)) for a in alpha_bars], alpha_bars, x_T),
        x_T,
        x_star.reshape(1, *SHAPE),
    ).image_coef
    assert float(dev_mem) > 1.0
    assert float(dev_g1) < 0.05
    assert b_broad.abs().max() < 1e-10
    _, ideal = theoretical_schedule(alpha_bars)
    assert float(schedule_deviation(ideal[:, None], alpha_bars).abs().max()) == 0.0


def test_schedule_deviation_counts_only_excess_image_share_in_first_steps():
    alpha_bars = [0.01, 0.04, 0.25, 0.81]
    b = torch.tensor([[0.3, 0.1], [0.2, 0.2], [0.5, 0.5], [1.0, 0.9]], dtype=torch.float64)  # steps × batch
    out = schedule_deviation(b, alpha_bars)
    torch.testing.assert_close(out, torch.tensor([0.2 + 0.0 + 0.0 + 0.1, 0.0], dtype=torch.float64))
    torch.testing.assert_close(schedule_deviation(b, alpha_bars, num_steps=1), torch.tensor([0.2, 0.0]).double())


def test_bad_inputs_raise_clear_errors():
    x = _randn(2, *SHAPE)
    with pytest.raises(ValueError, match="collinear"):
        decompose_latents(x, x, 2 * x)
    with pytest.raises(ValueError, match="alpha_bar"):
        normalized_first_step_loss(x, x, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        normalized_first_step_loss(x, x[:1], 0.5)
    with pytest.raises(ValueError, match="zero norm"):
        overshoot_coefficient(x, x, x)
    with pytest.raises(ValueError, match="event_ndim"):
        project_onto(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="alpha_bars"):
        schedule_deviation(torch.zeros(3, 2), [0.1, 0.2])
