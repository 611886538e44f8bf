"""Hutchinson estimators and Kim & Lee's maps: exact Gaussian-mixture ground truth, the tiny UNet, and a literal
re-computation in the style of the authors' code (a python loop of VJPs on one retained graph)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from mnemoguard.denoiser import Denoiser
from mnemoguard.signals.curvature import (
    conditional_curvature_map,
    curvature_diff_map,
    curvature_map,
    score_diff_map,
    upsample_map,
)
from mnemoguard.signals.hutchinson import (
    hutchinson_diagonal,
    hutchinson_samples,
    hutchinson_trace,
    jacobian_products,
    rademacher_probes,
)
from tests.conftest import make_tiny_unet
from tests.gmm import GaussianMixture

EVENT = (2, 2, 3)  # channels x H x W, d = 12
D = math.prod(EVENT)
SIGMA = 0.6


def _mixture(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, D, generator=g, dtype=torch.float64)
    cov = 0.05 + torch.rand(n, D, generator=g, dtype=torch.float64)  # anisotropic (diagonal) components
    return GaussianMixture(means, None, cov).vp_from_alpha_bar(1 - SIGMA**2)


def _point(seed, batch=1):
    g = torch.Generator().manual_seed(100 + seed)
    return (0.7 * torch.randn(1, *EVENT, generator=g, dtype=torch.float64)).repeat(batch, 1, 1, 1)


def _eps_jacobian(mix, x):
    """Exact d eps / dx = -sigma * Hessian(log p), (B, D, D)."""
    return -SIGMA * mix.hessian(x)


# ------------------------------------------------------------------------------------------------ probes
def test_probes_are_rademacher_deterministic_and_follow_x():
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    p = rademacher_probes(x, 5, generator=11)
    assert p.shape == (5, 2, 3, 4) and p.dtype == torch.float64 and set(p.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(p, rademacher_probes(x, 5, torch.Generator().manual_seed(11)))
    assert not torch.equal(p, rademacher_probes(x, 5, generator=12))
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        rademacher_probes(x, 0)


# ------------------------------------------------------------------------------------------------ GMM ground truth
@pytest.mark.parametrize("method", ["jvp", "vjp", "fd"])
def test_hutchinson_diagonal_converges_to_the_exact_diagonal_like_one_over_sqrt_k(method):
    mix = _mixture(0)
    R = 200  # independent estimates of the same point, one per batch row
    x = _point(0, R)
    J = _eps_jacobian(mix, x[:1])[0]
    exact = torch.diagonal(J).reshape(EVENT)
    # Rademacher: Var[(v * Jv)_i] = sum_{j != i} J_ij^2
    off = J.pow(2).sum(1) - torch.diagonal(J).pow(2)
    errs = {}
    for K in (8, 128):
        est = hutchinson_diagonal(mix.eps_fn(SIGMA), x, num_probes=K, generator=K, method=method, fd_step=1e-5)
        rms = (est - exact).pow(2).mean(0).sqrt().flatten()
        theory = (off / K).sqrt()
        assert torch.allclose(rms, theory, rtol=0.3), (K, rms, theory)
        errs[K] = rms.mean().item()
        assert (est.mean(0) - exact).abs().max() < 4 * theory.max() / math.sqrt(R)  # unbiased
    assert 3.0 < errs[8] / errs[128] < 5.5  # sqrt(16) = 4


def test_hutchinson_trace_converges_to_the_laplacian_with_the_predicted_variance():
    mix = _mixture(1)
    R = 200
    x = _point(1, R)
    J = _eps_jacobian(mix, x[:1])[0]
    exact = -SIGMA * mix.laplacian(x[:1])[0]
    off = J.pow(2).sum() - torch.diagonal(J).pow(2).sum()  # J symmetric: Var[v'Jv] = 2 sum_{i != j} J_ij^2
    for K in (4, 64):
        est = hutchinson_trace(mix.eps_fn(SIGMA), x, num_probes=K, generator=K)
        assert est.shape == (R,)
        rms = (est - exact).pow(2).mean().sqrt()
        theory = (2 * off / K).sqrt()
        assert abs(rms / theory - 1) < 0.25, (K, rms, theory)


def test_jvp_vjp_and_finite_differences_agree_to_their_precision_on_a_mixture():
    mix = _mixture(2)
    x = torch.cat([_point(s) for s in range(3)])
    probes = rademacher_probes(x, 6, generator=0)
    f = mix.eps_fn(SIGMA)
    jvp = jacobian_products(f, x, probes, method="jvp")
    vjp = jacobian_products(f, x, probes, method="vjp")  # J symmetric: J v = J^T v
    fd = jacobian_products(f, x, probes, method="fd", fd_step=1e-5)
    exact = torch.einsum("bij,kbj->kbi", _eps_jacobian(mix, x), probes.reshape(6, 3, D)).reshape(probes.shape)
    torch.testing.assert_close(jvp, exact, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(vjp, exact, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(fd, exact, atol=1e-8, rtol=1e-7)


def test_curvature_difference_of_two_mixtures_matches_its_closed_form():
    sharp, broad = _mixture(3), _mixture(4, n=5)
    x = torch.cat([_point(s) for s in range(2)])
    K = 4000
    kwargs = dict(num_probes=K, generator=0, sigma=SIGMA)
    signed = curvature_diff_map(sharp.eps_fn(SIGMA), broad.eps_fn(SIGMA), x, positive_part=False, **kwargs)
    # closed form: (1/sigma) sum_c diag(d(eps_a - eps_b)/dx) = -sum_c (diag H_a - diag H_b)
    exact = -(sharp.hessian_diag(x) - broad.hessian_diag(x)).reshape(2, *EVENT).sum(1)
    samples = hutchinson_samples(
        lambda z: sharp.eps_fn(SIGMA)(z) - broad.eps_fn(SIGMA)(z), x, num_probes=K, generator=0
    ).sum(2) / SIGMA
    se = samples.std(0) / math.sqrt(K)
    assert ((signed - exact).abs() <= 5 * se + 1e-12).all()
    assert (signed - exact).abs().max() < 0.05 * exact.abs().max()
    positive = curvature_diff_map(sharp.eps_fn(SIGMA), broad.eps_fn(SIGMA), x, **kwargs)
    torch.testing.assert_close(positive, signed.clamp_min(0))
    assert (exact > 0).any() and (exact < 0).any()  # the closed form has both signs here: relu matters


# ------------------------------------------------------------------------------------------------ tiny UNet
@pytest.fixture
def den(tiny_unet, ddpm_scheduler):
    return Denoiser(tiny_unet, ddpm_scheduler)


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 16, 16, generator=g), torch.randn(batch, 4, 32, generator=g), torch.zeros(1, 4, 32)


def test_unet_maps_have_the_right_shape_dtype_device_and_leave_parameters_untouched(den, tiny_unet):
    x, cond, uncond = _inputs()
    for p in tiny_unet.parameters():
        p.requires_grad_(True)
    for method in ("jvp", "vjp", "fd"):
        with den.ad_safe():
            m = curvature_diff_map(den.guidance_fn(500, cond, uncond), None, x, num_probes=2, method=method)
        assert m.shape == (2, 16, 16) and m.dtype == x.dtype and m.device == x.device and not m.requires_grad
        assert (m >= 0).all()
    assert all(p.grad is None for p in tiny_unet.parameters())


def test_jvp_and_vjp_traces_coincide_on_the_unet_and_fd_tracks_jvp(den):
    x, cond, _ = _inputs(1)
    f = den.eps_fn(300, cond)
    with den.ad_safe(), torch.no_grad():
        tr_jvp = hutchinson_trace(f, x, num_probes=4, generator=3, method="jvp")
        tr_vjp = hutchinson_trace(f, x, num_probes=4, generator=3, method="vjp")  # v'Jv = v'J'v, same probes
        d_jvp = hutchinson_diagonal(f, x, num_probes=4, generator=3, method="jvp")
        d_fd = hutchinson_diagonal(f, x, num_probes=4, generator=3, method="fd", fd_step=1e-2)
    torch.testing.assert_close(tr_vjp, tr_jvp, atol=1e-4, rtol=1e-4)
    assert (d_fd - d_jvp).abs().max() < 1e-2 * d_jvp.abs().max()


@pytest.mark.parametrize("method,chunk", [("vjp", 4), ("vjp", 1), ("jvp", 4)])
def test_maps_are_deterministic_under_a_seed_and_independent_of_probe_chunking(den, method, chunk):
    x, cond, uncond = _inputs(2, batch=1)
    g = den.guidance_fn(100, cond, uncond)
    opts = dict(num_probes=5, method=method)
    with den.ad_safe():
        a = curvature_diff_map(g, None, x, generator=5, **opts)
        b = curvature_diff_map(g, None, x, generator=torch.Generator().manual_seed(5), probe_batch=chunk, **opts)
        c = curvature_diff_map(g, None, x, generator=6, **opts)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, c)


def test_jvp_without_ad_safe_explains_the_fix(den):
    x, cond, _ = _inputs(3, batch=1)
    with pytest.raises(RuntimeError, match="ad_safe"):
        hutchinson_diagonal(den.eps_fn(10, cond), x, num_probes=1, method="jvp")


def _kim_lee_literal(unet, z, t, emb, probes, bad_unet=None, cond_only=False):
    """compute_diag_h_*: one forward with a graph, K VJPs with retain_graph, s = -target, relu(-sum_c diag)."""
    zg = z.clone().detach().requires_grad_(True)
    with torch.enable_grad():
        noise_u, noise_c = unet(torch.cat([zg] * 2), t, encoder_hidden_states=emb).sample.chunk(2)
        if bad_unet is not None:
            _, bad_c = bad_unet(torch.cat([zg] * 2), t, encoder_hidden_states=emb).sample.chunk(2)
            target = noise_c - bad_c
        else:
            target = noise_c if cond_only else noise_c - noise_u
        s = -target
        diag = torch.zeros_like(zg)
        for v in probes:
            (jtv,) = torch.autograd.grad((s * v).sum(), zg, retain_graph=True)
            diag += v * jtv
    diag /= len(probes)
    return (-diag.sum(dim=1)).relu()


@pytest.mark.parametrize("baseline", ["uncond", "less_trained", "none"])
def test_curvature_maps_match_the_authors_sequential_vjp_loop(den, tiny_unet, ddpm_scheduler, baseline):
    x, cond, uncond = _inputs(4, batch=1)
    t = torch.tensor(1)
    emb = torch.cat([uncond, cond])
    K = 5
    probes = rademacher_probes(x, K, generator=9)
    bad = make_tiny_unet(seed=1).eval() if baseline == "less_trained" else None
    ref = _kim_lee_literal(tiny_unet, x, t, emb, probes, bad_unet=bad, cond_only=baseline == "none")
    opts = dict(num_probes=K, generator=9, method="vjp")
    if baseline == "uncond":
        fast = curvature_diff_map(den.eps_fn(t, cond), den.eps_fn(t, uncond), x, **opts)
        fused = curvature_diff_map(den.guidance_fn(t, cond, uncond), None, x, **opts)
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    elif baseline == "less_trained":
        fast = curvature_diff_map(den.eps_fn(t, cond), Denoiser(bad, ddpm_scheduler).eps_fn(t, cond), x, **opts)
    else:
        fast = conditional_curvature_map(den.eps_fn(t, cond), x, **opts)
    assert ref.abs().max() > 0
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


def test_score_difference_map_matches_the_authors_step_loop():
    unet, bad = make_tiny_unet().eval(), make_tiny_unet(seed=1).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(5)
    x, cond, uncond = _inputs(5, batch=1)
    emb = torch.cat([uncond, cond])
    start, end = 3, 4  # inclusive step range, as score_diff_step_start / _end
    den, den_bad = Denoiser(unet, sched), Denoiser(bad, sched)
    z, acc, acc_bad, count = x.clone(), torch.zeros(16, 16), torch.zeros(16, 16), 0
    eps_c, eps_u, eps_bad, sigmas = [], [], [], []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            noise_u, noise_c = unet(torch.cat([z] * 2), t, encoder_hidden_states=emb).sample.chunk(2)
            _, bad_c = bad(torch.cat([z] * 2), t, encoder_hidden_states=emb).sample.chunk(2)
            if start <= i <= end:
                sigma = torch.sqrt(1 - sched.alphas_cumprod[t])
                acc += ((-noise_c / sigma - -noise_u / sigma) ** 2).sum(dim=1)[0]
                acc_bad += ((-noise_c / sigma - -bad_c / sigma) ** 2).sum(dim=1)[0]
                count += 1
                c, u = den.eps_cond_uncond(z, t, cond, uncond)
                eps_c.append(c)
                eps_u.append(u)
                eps_bad.append(den_bad.eps(z, t, cond))
                sigmas.append(den.sigma(t))
            z = sched.step(noise_u + 7.5 * (noise_c - noise_u), t, z).prev_sample
    torch.testing.assert_close(score_diff_map(eps_c, eps_u, sigma=sigmas)[0], acc / count, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(score_diff_map(eps_c, eps_bad, sigma=sigmas)[0], acc_bad / count, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ maps, errors
def test_upsampling_matches_pil_bilinear_resize():
    m = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    up = upsample_map(m, 32)
    assert up.shape == (2, 32, 32)
    ref = np.asarray(Image.fromarray(m[1].numpy(), mode="F").resize((32, 32), Image.BILINEAR))
    np.testing.assert_allclose(up[1].numpy(), ref, atol=1e-5)
    assert upsample_map(m[0], (16, 24)).shape == (16, 24)


def test_curvature_map_divides_by_sigma_and_sums_channels():
    # a linear field eps(x) = A x with diagonal A: every probe gives the exact diagonal
    a = torch.tensor([1.0, -3.0]).reshape(1, 2, 1, 1)
    x = torch.randn(1, 2, 2, 2)
    m = curvature_map(lambda z: a * z, x, num_probes=1, sigma=0.5, positive_part=False)
    torch.testing.assert_close(m, torch.full((1, 2, 2), -4.0))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"same shape .* input \(2, 3\), output \(2, 1\)"):
        hutchinson_diagonal(lambda z: z[:, :1], x, num_probes=1, method="vjp")
    with pytest.raises(ValueError, match="method must be one of"):
        hutchinson_diagonal(lambda z: z, x, method="hvp")
    with pytest.raises(ValueError, match=r"probes must have shape \[K, \*x.shape\]"):
        jacobian_products(lambda z: z, x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="steps"):
        score_diff_map([torch.zeros(1, 1, 2, 2)], [])
