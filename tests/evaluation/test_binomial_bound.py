"""The copy rate's confidence bound: the exact (Clopper–Pearson) lower bound of a binomial proportion."""

import math

import pytest


@pytest.mark.parametrize("k,n", [(1, 4), (2, 32), (5, 32), (3, 16), (16, 16), (7, 100)])
def test_the_lower_bound_is_where_k_or_more_successes_become_as_unlikely_as_the_confidence_allows(k, n):
    from mnemoguard.evaluation import binomial_lower_bound

    low = binomial_lower_bound(k, n, 0.95)
    tail = 1 - sum(math.comb(n, i) * low**i * (1 - low) ** (n - i) for i in range(k))  # P(X >= k | n, low)
    assert 0 < low < k / n and tail == pytest.approx(0.05, rel=1e-6)


def test_the_lower_bound_is_zero_without_successes_and_separates_two_copies_of_32_from_five():
    from mnemoguard.evaluation import binomial_lower_bound

    assert binomial_lower_bound(0, 32) == 0.0 and math.isnan(binomial_lower_bound(0, 0))
    assert binomial_lower_bound(2, 32) < binomial_lower_bound(4, 32) < 0.05 < binomial_lower_bound(5, 32)
    assert binomial_lower_bound(1, 4) == pytest.approx(1 - 0.95 ** 0.25, rel=1e-6)  # k = 1: 1 - (1 - L)^n = α
    with pytest.raises(ValueError, match="successes <= trials"):
        binomial_lower_bound(5, 4)
