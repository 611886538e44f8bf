"""Danger-zone curves (Dodson et al. 2026): posterior weights, W_σ, shell coverage C_σ and the band."""

import math

import numpy as np
import pytest
import torch

from mnemoguard.signals import distinct_rows
from mnemoguard.signals.danger_zone import (
    danger_zone_band,
    danger_zone_curves,
    sigma_to_timestep,
    sigmas_from_alphas_cumprod,
)
from mnemoguard.signals.posterior import (
    empirical_optimal_denoiser,
    max_posterior_weight_curve,
    max_posterior_weights,
    posterior_weights,
)
from mnemoguard.signals.shell_coverage import chi_square_interval, shell_coverage_curve, shell_interval
from tests.gmm import point_masses


def _data(n: int = 12, shape=(2, 3, 3), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


class _RecordingRows:
    """Array-like training set that records how many rows each read asks for."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data.numpy()
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        rows = self.data[index]
        self.reads.append(len(rows))
        return rows


def test_posterior_weights_match_analytic_point_mass_mixture():
    x = _data()
    y = _data(5, seed=1) * 2
    for sigma in (0.5, 2.0, 10.0):
        ref = point_masses(x).ve(sigma).posterior_weights(y)
        torch.testing.assert_close(posterior_weights(y, x, sigma, chunk_size=5), ref, rtol=1e-9, atol=1e-12)


def test_posterior_weights_accept_one_sigma_per_point():
    x, y = _data(), _data(3, seed=1)
    sig = torch.tensor([0.5, 1.0, 3.0])
    out = posterior_weights(y, x, sig)
    for b in range(3):
        torch.testing.assert_close(out[b], posterior_weights(y[b : b + 1], x, float(sig[b]))[0])


def test_empirical_optimal_denoiser_is_posterior_mean_and_streams():
    x, y = _data(), _data(4, seed=2)
    ref = posterior_weights(y, x, 1.3) @ x.reshape(12, -1).double()
    out = empirical_optimal_denoiser(y.double(), x, 1.3, chunk_size=5)
    torch.testing.assert_close(out.reshape(4, -1), ref)


def test_max_posterior_weight_tends_to_one_at_small_sigma_and_one_over_n_at_large_sigma():
    x = _data(20)
    w = max_posterior_weight_curve(x, [1e-3, 1e4], num_probes=64, generator=torch.Generator().manual_seed(0))
    assert w[0] == pytest.approx(1.0, abs=1e-6)
    assert w[1] == pytest.approx(1 / 20, rel=1e-3)


def test_max_posterior_weight_decreases_with_sigma():
    x = _data(30)
    sigmas = torch.logspace(-2, 2, 12)
    w = max_posterior_weight_curve(x, sigmas, num_probes=128, generator=torch.Generator().manual_seed(0))
    assert (w[1:] <= w[:-1] + 0.02).all()


def test_duplicated_training_points_split_the_posterior():
    x = _data(6).repeat(2, 1, 1, 1)  # every point twice
    w = max_posterior_weight_curve(x, [1e-3], num_probes=32, generator=torch.Generator().manual_seed(0))
    assert w[0] == pytest.approx(0.5, abs=1e-9)


def test_max_posterior_weights_match_monte_carlo_reference():
    """Same probes, computed naively: draw (j, z) exactly as the implementation does, then softmax over all N."""
    x = _data(15)
    sigmas = [0.3, 1.0, 3.0]
    out = max_posterior_weights(x, sigmas, num_probes=10, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    j = torch.randint(15, (10,), generator=g)
    z = torch.randn(10, 18, generator=g, dtype=torch.float64)
    flat = x.reshape(15, -1).double()
    for k, s in enumerate(sigmas):
        ref = point_masses(flat).ve(s).posterior_weights(flat[j] + s * z).max(1).values
        torch.testing.assert_close(out[:, k], ref)


@pytest.mark.parametrize("fn", [max_posterior_weights, shell_coverage_curve])
def test_chunked_equals_unchunked(fn):
    x = _data(17)
    sigmas = torch.logspace(-1, 1, 5)
    kw = dict(num_probes=9)
    full = fn(x, sigmas, generator=torch.Generator().manual_seed(1), chunk_size=1000, **kw)
    chunked = fn(x, sigmas, generator=torch.Generator().manual_seed(1), chunk_size=4, **kw)
    torch.testing.assert_close(chunked, full)


def test_reads_never_exceed_chunk_size_and_subsample_limits_rows():
    rows = _RecordingRows(_data(50))
    g = torch.Generator().manual_seed(0)
    max_posterior_weight_curve(rows, [0.5, 5.0], num_probes=8, generator=g, chunk_size=7)
    # one read for the 8 probe rows, then blocks of at most 7 rows covering all 50
    assert rows.reads[0] == 8 and max(rows.reads[1:]) <= 7 and sum(rows.reads[1:]) == 50
    rows.reads.clear()
    max_posterior_weight_curve(rows, [0.5], num_probes=4, generator=g, chunk_size=7, subsample=20)
    assert max(rows.reads[1:]) <= 7 and sum(rows.reads[1:]) == 20


def test_numpy_memmap_training_set(tmp_path):
    x = _data(10)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=tuple(x.shape))
    mm[:] = x.numpy()
    mm.flush()
    a = max_posterior_weights(mm, [1.0], num_probes=5, generator=torch.Generator().manual_seed(0), chunk_size=3)
    b = max_posterior_weights(x, [1.0], num_probes=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_shell_coverage_zero_at_small_sigma_and_the_shell_mass_at_large_sigma():
    x = _data(40, shape=(64,))
    held_out = _data(30, shape=(64,), seed=9)
    g = torch.Generator().manual_seed(0)
    c = shell_coverage_curve(x, [1e-3, 1e3], num_probes=400, generator=g, population=held_out, shell_constant=1.0)
    assert c[0] == 0.0
    # at large σ every shell test reduces to ‖z‖² ∈ [d − 2√(cd), d + 2√(cd) + 2c]: its χ²_64 mass (scipy, c = 1)
    lo, hi = shell_interval(64, 1.0)
    assert (lo, hi) == (48.0, 82.0)
    stats = pytest.importorskip("scipy.stats")
    assert c[1] == pytest.approx(stats.chi2.cdf(hi, 64) - stats.chi2.cdf(lo, 64), abs=0.05)


def test_shell_coverage_leave_one_out_ignores_own_point_but_counts_duplicates():
    x = _data(10, shape=(32,))
    g = torch.Generator().manual_seed(0)
    assert shell_coverage_curve(x, [1e-3], num_probes=50, generator=g)[0] == 0.0
    dup = torch.cat([x, x[:1]])
    c = shell_coverage_curve(dup, [1e-3], num_probes=400, generator=torch.Generator().manual_seed(0))
    assert c[0] == pytest.approx(2 / 11, abs=0.06)  # probes on either copy are covered by the other
    # Distinct rows with their multiplicity: a duplicated image's own copy no longer covers it.
    rows, mult, inverse = distinct_rows(dup)
    assert rows.shape[0] == 10 and mult.tolist() == [2] + [1] * 9 and torch.equal(rows[inverse], dup)
    c = shell_coverage_curve(rows, [1e-3], num_probes=400, generator=torch.Generator().manual_seed(0),
                             multiplicity=mult)
    assert c[0] == 0.0


def test_one_pass_curves_equal_the_separate_curves_and_give_a_band(ddpm_scheduler):
    x = torch.cat([_data(30, shape=(16,)), _data(5, shape=(16,))])  # five duplicated points
    sigmas = torch.logspace(-2, 1.5, 15)
    curves = danger_zone_curves(x, sigmas, num_probes=64, generator=torch.Generator().manual_seed(0), chunk_size=8)
    w = max_posterior_weight_curve(x, sigmas, num_probes=64, generator=torch.Generator().manual_seed(0))
    c = shell_coverage_curve(x, sigmas, num_probes=64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(curves.max_posterior_weight, w)
    torch.testing.assert_close(curves.coverage, c)
    band = danger_zone_band(
        curves.sigmas,
        curves.max_posterior_weight,
        curves.coverage,
        coverage_threshold=0.1,
        level_sigmas=sigmas_from_alphas_cumprod(ddpm_scheduler.alphas_cumprod),
    )
    assert math.isfinite(band.sigma_lo) and band.sigma_hi > 0


def test_chi_square_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for d in (10, 100, 16384):
        lo, hi = chi_square_interval(d, 0.99)
        assert lo == pytest.approx(stats.chi2.ppf(0.005, d), rel=1e-9)
        assert hi == pytest.approx(stats.chi2.ppf(0.995, d), rel=1e-9)


def test_danger_zone_band_between_coverage_rise_and_weight_fall_maps_to_timesteps():
    sigmas = torch.logspace(-2, 2, 9)  # 0.01 .. 100, ×√10 per step
    coverage = torch.tensor([0, 0, 0, 0.5, 0.9, 1, 1, 1, 1])  # rises to 0.5 at σ = 10^-0.5
    weight = torch.tensor([1, 1, 1, 1, 1, 0.5, 0.2, 0.1, 0.1])  # falls to 0.5 at σ = 10^0.5
    abar = torch.linspace(0.9999, 0.001, 1000)
    band = danger_zone_band(sigmas, weight, coverage, level_sigmas=sigmas_from_alphas_cumprod(abar))
    assert band.sigma_lo == pytest.approx(10**-0.5) and band.sigma_hi == pytest.approx(10**0.5)
    table = sigmas_from_alphas_cumprod(abar)
    assert table[band.t_lo] >= band.sigma_lo > table[band.t_lo - 1]
    assert table[band.t_hi] <= band.sigma_hi < table[band.t_hi + 1]
    assert not band.empty


def test_danger_zone_band_empty_when_posterior_spreads_before_coverage():
    sigmas = torch.logspace(-2, 2, 5)
    band = danger_zone_band(sigmas, torch.tensor([1, 0.2, 0.1, 0.1, 0.1]), torch.tensor([0, 0, 0, 0.8, 1.0]))
    assert band.empty and band.t_lo is None


def test_sigma_timestep_round_trip_with_ddpm_scheduler(ddpm_scheduler):
    abar = ddpm_scheduler.alphas_cumprod
    table = sigmas_from_alphas_cumprod(abar)
    assert (table[1:] > table[:-1]).all()
    torch.testing.assert_close(table[500], ((1 - abar[500].double()) / abar[500].double()).sqrt())
    assert int(sigma_to_timestep(float(table[321]), abar)) == 321


def test_bad_inputs_raise_clear_errors():
    x = _data()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="sigmas must be finite and > 0"):
        max_posterior_weight_curve(x, [0.0, 1.0], generator=g)
    with pytest.raises(ValueError, match="coordinates"):
        posterior_weights(torch.zeros(2, 5), x, 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        posterior_weights(torch.zeros(2, 18), x, 1.0, chunk_size=0)
    with pytest.raises(ValueError, match="same length"):
        danger_zone_band([1.0, 2.0], torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        sigmas_from_alphas_cumprod(torch.tensor([0.5, 0.0]))
    assert math.isfinite(chi_square_interval(3, 0.5)[1])


def test_multiplicity_is_the_posterior_over_distinct_images_with_the_copies_weights_summed():
    base = _data(12, shape=(16,))
    trained = torch.cat([base, base[:1].repeat(5, 1), base[1:2].repeat(2, 1)])  # image 0 six times, image 1 three
    rows, mult, inverse = distinct_rows(trained)
    assert mult.tolist() == [6, 3] + [1] * 10
    sigmas = torch.tensor([0.05, 0.5, 5.0], dtype=torch.float64)
    out = max_posterior_weights(rows, sigmas, num_probes=40, generator=torch.Generator().manual_seed(3),
                                multiplicity=mult)
    # Independently: the same probes (drawn as the rows were trained, copies included) against every trained row,
    # each copy its own point mass, then the weights of identical copies summed.
    g = torch.Generator().manual_seed(3)
    pick = torch.multinomial(mult.double(), 40, replacement=True, generator=g)
    z = torch.randn(40, 16, generator=g, dtype=torch.float64)
    for k, s in enumerate(sigmas):
        w = point_masses(trained.double()).ve(float(s)).posterior_weights(rows[pick].double() + s * z)
        per_image = torch.zeros(40, rows.shape[0], dtype=torch.float64).index_add_(1, inverse, w)
        torch.testing.assert_close(out[:, k], per_image.max(1).values)
    # Copies as separate rows cap W at small σ (a probe on image 0 has max weight 1/6); grouped, W -> 1.
    small = [1e-3]
    as_rows = max_posterior_weight_curve(trained, small, num_probes=400, generator=torch.Generator().manual_seed(0))
    grouped = max_posterior_weight_curve(rows, small, num_probes=400, generator=torch.Generator().manual_seed(0),
                                         multiplicity=mult)
    assert float(as_rows[0]) == pytest.approx((10 + 1 + 1) / 20, abs=0.08) and float(grouped[0]) == 1.0


def test_a_duplicated_testbed_has_a_band_once_copies_are_grouped_and_coverage_uses_held_out_points():
    # 200 distinct points in 64-d + 4 of them copied 60 times: copies are 55 % of the rows, as on the planted testbed.
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(200, 64, generator=gen)
    trained = torch.cat([distinct, distinct[:4].repeat_interleave(60, 0)])
    held_out = torch.randn(100, 64, generator=gen)
    sigmas = torch.logspace(-1.5, 1.5, 31, dtype=torch.float64)
    naive = danger_zone_curves(trained, sigmas, num_probes=256, generator=torch.Generator().manual_seed(1))
    assert float(naive.max_posterior_weight.max()) < 0.5 and danger_zone_band(
        naive.sigmas, naive.max_posterior_weight, naive.coverage).empty
    rows, mult, _ = distinct_rows(trained)
    fixed = danger_zone_curves(rows, sigmas, num_probes=256, generator=torch.Generator().manual_seed(1),
                               multiplicity=mult, population=held_out)
    band = danger_zone_band(fixed.sigmas, fixed.max_posterior_weight, fixed.coverage)
    assert not band.empty and 0.1 < band.sigma_lo < band.sigma_hi < 10
