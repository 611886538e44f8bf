"""Nearest-neighbour ratio, memorized fraction, template-verbatim distance and overshoot check."""

import math

import numpy as np
import pytest
import torch

from mnemoguard.evaluation import (
    GU_RATIO_THRESHOLD,
    bootstrap_mean,
    find_duplicates,
    is_memorized,
    masked_sq_distance,
    memorized_fraction,
    nearest_neighbour_distances,
    nearest_neighbour_ratio,
    overshoot_alignment,
    overshoot_memorized,
    template_verbatim,
)

# Three "images" of two pixels: (0, 0), (3, 0), (0, 4).
TRAIN = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])


# ---------------------------------------------------------------- nearest-neighbour ratio


def test_ratio_matches_hand_computed_distances():
    gen = torch.tensor([[1.0, 0.0], [0.5, 0.0], [3.0, 0.0]])
    res = nearest_neighbour_ratio(gen, TRAIN)
    # (1, 0): d1 = 1 to (0,0), d2 = 2 to (3,0); (0.5, 0): 0.5 and 2.5; exact copy of (3,0): 0 and 3
    torch.testing.assert_close(res.distances, torch.tensor([[1.0, 2.0], [0.5, 2.5], [0.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(res.ratio, torch.tensor([0.5, 0.2, 0.0], dtype=torch.float64))
    assert res.indices.tolist() == [[0, 1], [0, 1], [1, 0]]
    assert res.memorized().tolist() == [False, True, True]


def test_exact_copy_has_distance_exactly_zero_despite_large_values():
    train = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255 + 1e4
    res = nearest_neighbour_ratio(train[[7]], train)
    assert res.distances[0, 0].item() == 0.0
    assert res.indices[0, 0].item() == 7


def test_threshold_is_strict_and_configurable():
    ratio = torch.tensor([1 / 3, 0.3333, 0.49, 0.5])
    assert is_memorized(ratio).tolist() == [False, True, False, False]
    assert is_memorized(ratio, threshold=0.5).tolist() == [True, True, True, False]
    assert GU_RATIO_THRESHOLD == pytest.approx(1 / 3)


def test_chunked_distances_equal_unchunked_and_brute_force():
    g = torch.Generator().manual_seed(1)
    queries = torch.rand(37, 3, 4, 4, generator=g)
    refs = torch.rand(53, 3, 4, 4, generator=g)
    d_small, i_small = nearest_neighbour_distances(queries, refs, k=3, query_chunk_size=5, reference_chunk_size=7)
    d_big, i_big = nearest_neighbour_distances(queries, refs, k=3, query_chunk_size=1000, reference_chunk_size=1000)
    brute = torch.cdist(queries.reshape(37, -1).double(), refs.reshape(53, -1).double())
    d_ref, i_ref = torch.topk(brute, 3, dim=1, largest=False)
    torch.testing.assert_close(d_small, d_big)
    torch.testing.assert_close(d_small, d_ref)
    assert torch.equal(i_small, i_big) and torch.equal(i_small, i_ref)


def test_accepts_numpy_and_uint8_images():
    train = np.array([[[0, 0]], [[30, 0]], [[0, 40]]], dtype=np.uint8)
    gen = np.array([[[5, 0]]], dtype=np.uint8)
    res = nearest_neighbour_ratio(gen, train)
    assert res.ratio.item() == pytest.approx(5 / 25)


def test_duplicated_training_images_are_rejected():
    train = torch.cat([TRAIN, TRAIN[:1]])
    assert find_duplicates(train) == [[0, 3]]
    with pytest.raises(ValueError, match="unique images"):
        nearest_neighbour_ratio(torch.tensor([[1.0, 1.0]]), train)


def test_zero_second_distance_raises_when_uniqueness_check_is_off():
    train = torch.cat([TRAIN, TRAIN[:1]])
    with pytest.raises(ValueError, match="d2 = 0"):
        nearest_neighbour_ratio(TRAIN[:1], train, check_unique=False)


def test_find_duplicates_is_chunk_independent():
    x = torch.randint(0, 3, (40, 2), generator=torch.Generator().manual_seed(0)).float()
    assert find_duplicates(x, chunk_size=3) == find_duplicates(x, chunk_size=1000)


@pytest.mark.parametrize(
    ("gen", "train", "kwargs", "match"),
    [
        (torch.zeros(2, 3), torch.arange(8.0).reshape(4, 2), {}, "same image shape"),
        (torch.zeros(2, 2), TRAIN[:1], {}, "at least 2 training images"),
        (torch.tensor([[float("nan"), 0.0]]), TRAIN, {}, "finite"),
        (torch.tensor([[-1.0, 0.5]]), TRAIN, {"value_range": (0.0, 255.0)}, r"generated must lie in \[0, 255\]"),
        (torch.zeros(3), TRAIN, {}, r"shape \[N, \.\.\.\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(gen, train, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nearest_neighbour_ratio(gen, train, **kwargs)


# ---------------------------------------------------------------- memorized fraction / bootstrap


def test_memorized_fraction_counts_ratios_below_threshold():
    est = memorized_fraction(torch.tensor([0.1, 0.5, 0.2, 0.9]))
    assert est.estimate == 0.5
    assert est.n == 4 and est.n_resamples == 1000 and est.level == 0.95
    assert 0.0 <= est.low <= est.estimate <= est.high <= 1.0


def test_memorized_fraction_accepts_ratio_result():
    res = nearest_neighbour_ratio(torch.tensor([[0.5, 0.0], [1.0, 0.0]]), TRAIN)
    assert memorized_fraction(res).estimate == 0.5


def test_bootstrap_is_deterministic_given_seed():
    flags = (np.arange(200) % 7 == 0).astype(float)
    a = bootstrap_mean(flags, n_resamples=500, seed=3)
    b = bootstrap_mean(flags, n_resamples=500, seed=3)
    c = bootstrap_mean(flags, n_resamples=500, seed=4)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)


def test_bootstrap_interval_of_constant_values_is_degenerate():
    est = bootstrap_mean(np.ones(50))
    assert (est.estimate, est.low, est.high) == (1.0, 1.0, 1.0)


def test_bootstrap_interval_width_matches_normal_approximation():
    p, n = 0.3, 400
    flags = np.zeros(n)
    flags[: int(p * n)] = 1
    est = bootstrap_mean(flags, n_resamples=4000, level=0.95, seed=0)
    expected = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
    assert est.high - est.low == pytest.approx(expected, rel=0.15)


def test_bootstrap_level_widens_interval():
    flags = (np.arange(100) % 3 == 0).astype(float)
    narrow = bootstrap_mean(flags, level=0.5)
    wide = bootstrap_mean(flags, level=0.99)
    assert wide.low < narrow.low and wide.high > narrow.high


@pytest.mark.parametrize(
    ("values", "kwargs", "match"),
    [
        (np.array([]), {}, "empty"),
        (np.ones(3), {"level": 1.0}, "level"),
        (np.ones(3), {"n_resamples": 0}, "n_resamples"),
        (np.array([1.0, np.nan]), {}, "finite"),
    ],
)
def test_bootstrap_rejects_bad_input(values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_mean(values, **kwargs)


def test_ratio_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        is_memorized(torch.tensor([1.5]))


# ---------------------------------------------------------------- template verbatim


def test_masked_distance_hand_computed():
    gen = torch.zeros(1, 1, 2, 2)
    tpl = torch.ones(1, 1, 2, 2)
    one_pixel = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    full = torch.ones(1, 2, 2)
    # one masked pixel with squared error 1, mask mean 1/4 -> 4; the full mask: 4 / 1 -> 4
    assert masked_sq_distance(gen, tpl, one_pixel).item() == pytest.approx(4.0)
    assert masked_sq_distance(gen, tpl, full).item() == pytest.approx(4.0)


def test_masked_distance_ignores_pixels_outside_the_mask():
    tpl = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    gen = tpl.clone()
    gen[:, :, 2:] = 1.0 - gen[:, :, 2:]  # change only the unmasked half
    assert masked_sq_distance(gen, tpl, mask).item() == pytest.approx(0.0, abs=1e-12)


def test_masked_distance_matches_literal_formula_pairwise():
    g = torch.Generator().manual_seed(2)
    gen = torch.rand(3, 3, 5, 5, generator=g)
    tpl = torch.rand(4, 3, 5, 5, generator=g)
    masks = (torch.rand(4, 5, 5, generator=g) > 0.5).float()
    got = masked_sq_distance(gen, tpl, masks)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            m = masks[j].expand(3, -1, -1).double()
            ref = (((tpl[j] * m - gen[i] * m) ** 2).sum() / m.mean()).item()
            assert got[i, j].item() == pytest.approx(ref, rel=1e-9)


def test_channel_mask_equals_broadcast_mask():
    g = torch.Generator().manual_seed(3)
    gen, tpl = torch.rand(2, 3, 4, 4, generator=g), torch.rand(1, 3, 4, 4, generator=g)
    m = (torch.rand(1, 4, 4, generator=g) > 0.3).float()
    torch.testing.assert_close(
        masked_sq_distance(gen, tpl, m), masked_sq_distance(gen, tpl, m[:, None].expand(-1, 3, -1, -1))
    )


def test_template_verbatim_uses_kim_lee_threshold():
    tpl = torch.full((1, 3, 256, 256), 0.5)
    mask = torch.ones(1, 256, 256)
    close = tpl + 0.1  # masked distance 0.01 * 196608 = 1966 < 2500
    far = tpl + 0.12  # 0.0144 * 196608 = 2831 > 2500
    assert template_verbatim(torch.cat([close, far]), tpl, mask).flatten().tolist() == [True, False]


def test_empty_template_mask_raises():
    with pytest.raises(ValueError, match="all zero"):
        masked_sq_distance(
            torch.zeros(1, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(2, 2), torch.zeros(2, 2)])
        )


@pytest.mark.parametrize(
    ("gen", "tpl", "mask", "match"),
    [
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.full((1, 2, 2), 2.0), r"masks must lie in \[0, 1\]"),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 3), torch.ones(1, 3, 3), "share"),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(2, 2, 2), "masks must have shape"),
        (torch.zeros(1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 2, 2), r"\[N, C, H, W\]"),
    ],
)
def test_masked_distance_rejects_bad_shapes_and_values(gen, tpl, mask, match):
    with pytest.raises(ValueError, match=match):
        masked_sq_distance(gen, tpl, mask)


def test_template_verbatim_requires_unit_pixel_range():
    with pytest.raises(ValueError, match=r"generated must lie in \[0, 1\]"):
        template_verbatim(torch.full((1, 1, 2, 2), 255.0), torch.zeros(1, 1, 2, 2), torch.ones(1, 2, 2))


# ---------------------------------------------------------------- overshoot-aware check


def test_overshoot_alignment_hand_computed():
    mean = torch.tensor([1.0, 1.0])
    target = torch.tensor([[2.0, 1.0]])  # x* - mu = (1, 0)
    gen = torch.tensor([[4.0, 1.0], [2.0, 2.0]])  # u = (3, 0): overshoot by 3; u = (1, 1)
    res = overshoot_alignment(gen, target.expand(2, -1), mean)
    torch.testing.assert_close(res.cosine, torch.tensor([1.0, 1 / math.sqrt(2)], dtype=torch.float64))
    torch.testing.assert_close(res.coefficient, torch.tensor([3.0, 1.0], dtype=torch.float64))


def test_clipped_overshoot_is_missed_by_ratio_but_caught_by_direction():
    mean = torch.zeros(4)
    x_star = torch.tensor([0.5, 0.5, -0.5, -0.5])
    other = torch.tensor([-0.5, 0.5, 0.5, -0.5])
    generated = (mean + 3 * (x_star - mean)).clamp(-1, 1)[None]  # guidance w = 3, then clipping
    ratio = nearest_neighbour_ratio(generated, torch.stack([x_star, other])).ratio
    assert ratio.item() == pytest.approx(1 / math.sqrt(5))  # d1 = 1, d2 = sqrt(5): not a copy for Gu et al.
    assert not is_memorized(ratio).item()
    assert overshoot_memorized(generated, x_star[None], mean).tolist() == [True]
    assert overshoot_alignment(generated, x_star[None], mean).coefficient.item() == pytest.approx(2.0)


def test_overshoot_min_coefficient_rejects_faint_images():
    mean, target = torch.zeros(2), torch.tensor([[1.0, 0.0]])
    faint = torch.tensor([[0.05, 0.0]])
    assert overshoot_memorized(faint, target, mean).tolist() == [True]
    assert overshoot_memorized(faint, target, mean, min_coefficient=0.5).tolist() == [False]


def test_overshoot_undefined_direction_raises():
    mean = torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match="targets .* equal the mean"):
        overshoot_alignment(torch.tensor([[0.0, 0.0]]), mean[None], mean)
    with pytest.raises(ValueError, match="generated .* equal the mean"):
        overshoot_alignment(mean[None], torch.tensor([[0.0, 0.0]]), mean)
    with pytest.raises(ValueError, match="mean must have shape"):
        overshoot_alignment(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(3))
