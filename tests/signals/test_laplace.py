"""p-Laplace family (Brokman et al. 2025) against exact values on Gaussian mixtures (tests/gmm.py)."""

import math

import pytest
import torch

from mnemoguard.signals.laplace import (
    infinity_laplacian,
    noise_recovery_flux,
    p_laplacian_hutchinson,
    p_laplacian_sphere,
    sphere_flux,
    sphere_points,
)
from tests.gmm import GaussianMixture, point_masses

SHAPE = (1, 2, 2)  # d = 4, laid out like a latent [C, H, W]
D = 4
ALPHA_BAR = 0.5
SIGMA = math.sqrt(1 - ALPHA_BAR)


def _mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(3, D, generator=g, dtype=torch.float64)
    cov = 0.05 + 0.3 * torch.rand(3, D, generator=g, dtype=torch.float64)  # anisotropic (diagonal)
    return GaussianMixture(means, torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64), cov).vp_from_alpha_bar(ALPHA_BAR)


def _points(mix: GaussianMixture, n: int = 5, seed: int = 1) -> torch.Tensor:
    return mix.sample(n, torch.Generator().manual_seed(seed)).reshape(n, *SHAPE)


def _hutchinson_std(mix: GaussianMixture, x: torch.Tensor, k: int) -> torch.Tensor:
    """Std of the Rademacher trace estimate of the (symmetric) Hessian: sqrt(2/K Σ_{i≠j} H_ij²)."""
    h = mix.hessian(x)
    off = h - torch.diag_embed(torch.diagonal(h, dim1=-2, dim2=-1))
    return (2.0 / k * (off**2).sum((-1, -2))).sqrt()


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_hutchinson_p_laplacian_converges_to_exact_as_probes_grow(p):
    mix = _mixture()
    x = _points(mix)
    exact = mix.p_laplacian(x, p)
    prefactor = (mix.score(x).reshape(5, -1).norm(dim=1)) ** (p - 2)
    errors = []
    for k in (16, 256, 4096):
        est = p_laplacian_hutchinson(
            mix.eps_fn(SIGMA), x, sigma=SIGMA, p=p, num_probes=k, generator=torch.Generator().manual_seed(k)
        )
        bound = 5 * prefactor * _hutchinson_std(mix, x, k) + 1e-4 * exact.abs() + 1e-6
        assert ((est - exact).abs() <= bound).all(), (k, est, exact)
        errors.append(float((est - exact).abs().mean()))
    assert errors[-1] < errors[0] / 4


@pytest.mark.parametrize("method", ["jvp", "vjp", "fd"])
def test_infinity_laplacian_matches_exact_for_every_product_method(method):
    mix = _mixture()
    x = _points(mix)
    out = infinity_laplacian(mix.eps_fn(SIGMA), x, sigma=SIGMA, method=method, fd_step=1e-4)
    tol = 1e-5 if method == "fd" else 1e-9
    torch.testing.assert_close(out, mix.infinity_laplacian(x), rtol=tol, atol=tol)
    torch.testing.assert_close(p_laplacian_hutchinson(mix.eps_fn(SIGMA), x, sigma=SIGMA, p=math.inf), out)


def test_hutchinson_jvp_and_vjp_agree_with_the_same_probes():
    mix = _mixture()
    x = _points(mix)
    kw = dict(sigma=SIGMA, p=1.0, num_probes=8)
    a = p_laplacian_hutchinson(mix.eps_fn(SIGMA), x, method="jvp", generator=torch.Generator().manual_seed(0), **kw)
    b = p_laplacian_hutchinson(mix.eps_fn(SIGMA), x, method="vjp", generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    """Single axis-aligned Gaussian: H = −diag(1/v) everywhere, so every Rademacher probe gives the exact trace."""
    mix = GaussianMixture(torch.zeros(1, D, dtype=torch.float64), None, torch.tensor([[0.5, 1.0, 2.0, 4.0]]))
    x = _points(mix, 3)
    out = p_laplacian_hutchinson(mix.eps_fn(1.0), x, sigma=1.0, p=2.0, num_probes=1)
    torch.testing.assert_close(out, torch.full((3,), -(2 + 1 + 0.5 + 0.25), dtype=torch.float64))


def test_sphere_flux_of_a_linear_field_recovers_its_trace():
    """F(y) = A y + b: E[<F(c + r n), n>] = r·tr(A)/d exactly, for every r and center."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    bias = torch.randn(D, generator=g, dtype=torch.float64)

    def field(y):
        return (y.reshape(y.shape[0], -1) @ a.T + bias).reshape(y.shape)

    center = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    r = 0.7
    errs = []
    for k in (64, 16384):
        flux = sphere_flux(field, center, radius=r, p=2.0, num_points=k, generator=torch.Generator().manual_seed(k))
        errs.append(float((D / r * flux - torch.trace(a)).abs().max()))
    assert errs[1] < 0.1 and errs[1] < errs[0]
    anti = sphere_flux(field, center, radius=r, p=2.0, num_points=64, generator=g, antithetic=True)
    # antithetic pairs cancel the constant part exactly; only <A n, n> noise remains
    assert float((D / r * anti - torch.trace(a)).abs().max()) < errs[0]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_sphere_flux_obeys_divergence_theorem_on_a_mixture(p):
    """(d/r)·flux equals the ball average of the exact p-Laplacian of the score field (any radius)."""
    mix = _mixture()
    x = _points(mix, 2)
    r = 0.4
    est = p_laplacian_sphere(
        mix.eps_fn(SIGMA), x, sigma=SIGMA, radius=r, p=p, num_points=20000, generator=torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(4)
    for b in range(2):
        n = torch.randn(20000, D, generator=g, dtype=torch.float64)
        n = n / n.norm(dim=1, keepdim=True)
        u = torch.rand(20000, 1, generator=g, dtype=torch.float64) ** (1 / D)
        ball_mean = mix.p_laplacian(x[b].reshape(1, D) + r * u * n, p).mean()
        assert float(est[b]) == pytest.approx(float(ball_mean), rel=0.05, abs=0.05)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_sphere_estimate_tends_to_the_point_value_as_radius_shrinks(p):
    mix = _mixture()
    x = _points(mix, 3)
    exact = mix.p_laplacian(x, p)
    errs = []
    for r in (0.5, 0.05):
        est = p_laplacian_sphere(
            mix.eps_fn(SIGMA),
            x,
            sigma=SIGMA,
            radius=r,
            p=p,
            num_points=8000,
            generator=torch.Generator().manual_seed(5),
        )
        errs.append(float(((est - exact) / exact.abs().clamp_min(1)).abs().max()))
    assert errs[1] < 0.05 and errs[1] < errs[0]


def test_noise_recovery_flux_is_one_for_a_memorized_point_and_lower_for_a_broad_law():
    """Exact eps of a point mass at z0 returns the injected noise: cos = 1. A broad law recovers it only partly."""
    z0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    abar = 0.9
    s = math.sqrt(1 - abar)
    mem = noise_recovery_flux(
        point_masses(z0.reshape(2, -1)[:1]).vp_from_alpha_bar(abar).eps_fn(s), z0[:1], abar, num_points=32, generator=0
    )
    torch.testing.assert_close(mem, torch.ones(1, dtype=torch.float64))
    broad = GaussianMixture(torch.zeros(1, D, dtype=torch.float64), None, 1.0).vp_from_alpha_bar(abar).eps_fn(s)
    gen = noise_recovery_flux(broad, z0, abar, num_points=256, generator=0)
    assert (gen < 0.9).all()


def test_noise_recovery_flux_is_minus_scaled_sphere_estimate_of_one_laplacian():
    mix = _mixture()
    z0 = _points(mix, 2)
    abar = 0.8
    marg = _mixture()  # reuse: any field works for the identity
    k = noise_recovery_flux(marg.eps_fn(SIGMA), z0, abar, num_points=64, generator=7)
    pts = sphere_points(math.sqrt(abar) * z0, math.sqrt(1 - abar) * math.sqrt(D), 64, generator=7)
    e = marg.eps_fn(SIGMA)(pts.points.reshape(-1, *SHAPE)).reshape(64, 2, -1)
    ref = torch.nn.functional.cosine_similarity(e, pts.normals.reshape(64, 2, -1), dim=-1).mean(0)
    torch.testing.assert_close(k, ref)


def test_sphere_flux_chunking_and_points_layout():
    mix = _mixture()
    x = _points(mix, 3)
    a = sphere_flux(mix.eps_fn(SIGMA), x, radius=0.3, num_points=12, generator=8)
    b = sphere_flux(mix.eps_fn(SIGMA), x, radius=0.3, num_points=12, generator=8, point_batch=5)
    torch.testing.assert_close(a, b)
    pts = sphere_points(x, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), 6, generator=8, antithetic=True)
    assert pts.points.shape == (6, 3, *SHAPE)
    dist = (pts.points - x[None]).reshape(6, 3, -1).norm(dim=-1)
    torch.testing.assert_close(dist, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).expand(6, 3))
    torch.testing.assert_close(pts.normals[:3], -pts.normals[3:])


def test_runs_through_a_tiny_unet_with_jvp_and_flux(tiny_unet, ddpm_scheduler):
    from mnemoguard.denoiser import Denoiser

    den = Denoiser(tiny_unet, ddpm_scheduler)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 16, 16, generator=g)
    cond = torch.randn(1, 4, 32, generator=g)
    t = 500
    sigma = float(den.sigma(t))
    fn = den.eps_fn(t, cond)
    with den.ad_safe():
        lap1 = p_laplacian_hutchinson(fn, x, sigma=sigma, p=1.0, num_probes=2, generator=0)
        lap_inf = infinity_laplacian(fn, x, sigma=sigma)
    k = noise_recovery_flux(fn, x, float(den.alpha_bar(t)), num_points=4, generator=0)
    assert lap1.shape == lap_inf.shape == k.shape == (1,)
    assert torch.isfinite(torch.cat([lap1, lap_inf, k])).all() and k.abs().max() <= 1


def test_bad_inputs_raise_clear_errors():
    mix = _mixture()
    x = _points(mix, 2)
    fn = mix.eps_fn(SIGMA)
    with pytest.raises(ValueError, match="finite p >= 1"):
        sphere_flux(fn, x, radius=0.1, p=math.inf)
    with pytest.raises(ValueError, match="p >= 1 or math.inf"):
        p_laplacian_hutchinson(fn, x, sigma=SIGMA, p=0.5)
    with pytest.raises(ValueError, match="even"):
        sphere_points(x, 0.1, 3, antithetic=True)
    with pytest.raises(ValueError, match="radius must be > 0"):
        sphere_points(x, 0.0, 4)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        infinity_laplacian(fn, x, sigma=0.0)
    with pytest.raises(ValueError, match="alpha_bar"):
        noise_recovery_flux(fn, x, 1.0)
    with pytest.raises(ValueError, match="eps is exactly zero"):
        infinity_laplacian(lambda z: torch.zeros_like(z), x, sigma=1.0)
