"""The analytic Gaussian-mixture reference (tests/gmm.py) against autograd and torch.distributions."""

import math

import pytest
import torch

from tests.gmm import GaussianMixture, point_masses

D = 3


def _mixtures() -> dict[str, GaussianMixture]:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, D, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    a = torch.randn(3, D, D, generator=g, dtype=torch.float64)
    full = a @ a.transpose(-1, -2) * 0.3 + 0.2 * torch.eye(D, dtype=torch.float64)
    return {
        "isotropic": GaussianMixture(means, weights, torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)),
        "diagonal": GaussianMixture(means, weights, 0.1 + torch.rand(3, D, generator=g, dtype=torch.float64)),
        "full": GaussianMixture(means, weights, full),
    }


@pytest.fixture(params=["isotropic", "diagonal", "full"])
def mixture(request) -> GaussianMixture:
    return _mixtures()[request.param].ve(0.4)


def _points(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _torch_mixture(m: GaussianMixture) -> torch.distributions.Distribution:
    cov = m.cov if m.full else torch.diag_embed(m.cov)
    comp = torch.distributions.MultivariateNormal(m.means, covariance_matrix=cov)
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=m.weights), comp)


def test_log_prob_matches_torch_distributions(mixture):
    y = _points()
    torch.testing.assert_close(mixture.log_prob(y), _torch_mixture(mixture).log_prob(y))


def test_score_matches_autograd_of_log_prob(mixture):
    y = _points().requires_grad_(True)
    (grad,) = torch.autograd.grad(_torch_mixture(mixture).log_prob(y).sum(), y)
    torch.testing.assert_close(mixture.score(y.detach()), grad)


def test_hessian_diagonal_trace_match_autograd_hessian(mixture):
    y = _points()
    dist = _torch_mixture(mixture)
    for b in range(y.shape[0]):
        ref = torch.autograd.functional.hessian(lambda v: dist.log_prob(v[None])[0], y[b])
        hess = mixture.hessian(y[b : b + 1])[0]
        torch.testing.assert_close(hess, ref)
        torch.testing.assert_close(mixture.hessian_diag(y[b : b + 1])[0], torch.diagonal(ref))
        torch.testing.assert_close(mixture.laplacian(y[b : b + 1])[0], torch.trace(ref))
        s = mixture.score(y[b : b + 1])[0]
        torch.testing.assert_close(mixture.score_hessian_score(y[b : b + 1])[0], s @ ref @ s)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_p_laplacian_matches_autograd_divergence(mixture, p):
    y = _points(3)

    def field(v: torch.Tensor) -> torch.Tensor:
        s = mixture.eps_fn(-1.0)(v[None])[0]  # eps_fn(-1) = +score, differentiable
        return torch.linalg.vector_norm(s) ** (p - 2) * s

    for b in range(y.shape[0]):
        jac = torch.autograd.functional.jacobian(field, y[b])
        torch.testing.assert_close(mixture.p_laplacian(y[b : b + 1], p)[0], torch.trace(jac))


def test_infinity_laplacian_is_curvature_along_unit_score(mixture):
    y = _points()
    s = mixture.score(y)
    u = s / s.norm(dim=-1, keepdim=True)
    ref = torch.einsum("bi,bij,bj->b", u, mixture.hessian(y), u)
    torch.testing.assert_close(mixture.p_laplacian(y, math.inf), ref)


def test_eps_fn_is_minus_noise_std_times_score_and_keeps_shape(mixture):
    y = _points().reshape(4, 1, D)
    eps = mixture.eps_fn(0.4)(y)
    assert eps.shape == y.shape
    torch.testing.assert_close(eps, -0.4 * mixture.score(y))
    assert mixture.eps_fn(0.4)(y.float()).dtype == torch.float32


def test_posterior_weights_of_point_masses_are_softmax_of_squared_distances():
    x = _points(5, seed=2)
    y = _points(4, seed=3)
    sigma = 0.7
    ref = torch.softmax(-(torch.cdist(y, x) ** 2) / (2 * sigma**2), dim=1)
    torch.testing.assert_close(point_masses(x).ve(sigma).posterior_weights(y), ref)


def test_vp_marginal_matches_monte_carlo_moments():
    base = _mixtures()["diagonal"]
    alpha_bar = 0.6
    marg = base.vp_from_alpha_bar(alpha_bar)
    g = torch.Generator().manual_seed(4)
    x = base.sample(200_000, g)
    xt = math.sqrt(alpha_bar) * x + math.sqrt(1 - alpha_bar) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    mean = (marg.weights[:, None] * marg.means).sum(0)
    torch.testing.assert_close(xt.mean(0), mean, atol=1e-2, rtol=0)
    second = (marg.weights[:, None] * (marg.cov + marg.means**2)).sum(0)
    torch.testing.assert_close((xt**2).mean(0), second, atol=2e-2, rtol=0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="shape \\(N, d\\)"):
        GaussianMixture(torch.zeros(3))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="non-positive variance"):
        point_masses(torch.zeros(2, 2)).score(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="coordinates"):
        point_masses(torch.zeros(2, 2)).ve(1.0).score(torch.zeros(1, 3))
