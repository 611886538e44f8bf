"""The copy rate's confidence bound: Wilson's score bound for a binomial proportion."""

import math

import pytest


@pytest.mark.parametrize("k,n", [(1, 16), (2, 32), (4, 32), (16, 16), (7, 100)])
def test_the_wilson_lower_bound_solves_the_score_equation_below_the_estimate(k, n):
    from statistics import NormalDist

    from mnemoguard.evaluation import wilson_lower_bound

    low, z, p = wilson_lower_bound(k, n, 0.95), NormalDist().inv_cdf(0.95), k / n
    # Wilson's bound is the root below p̂ of (p̂ − L)² = z² L (1 − L) / n: the score test's acceptance edge.
    assert 0 < low < p and (p - low) ** 2 == pytest.approx(z * z * low * (1 - low) / n, rel=1e-9)


def test_the_wilson_lower_bound_is_zero_without_successes_and_separates_two_copies_from_four():
    from mnemoguard.evaluation import wilson_lower_bound

    assert wilson_lower_bound(0, 32) == 0.0 and math.isnan(wilson_lower_bound(0, 0))
    assert wilson_lower_bound(2, 32) < 0.05 < wilson_lower_bound(4, 32)  # 2 of 32 is no evidence of 5 %, 4 is
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_lower_bound(5, 4)
