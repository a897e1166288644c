import numpy as np
import pytest

from aggregator.strategies import CoordinateMedian, NonFiniteResult
from aggregator.strategies.median import coordinate_median

UPDATES = [{"w": np.array([v, -v], np.float32)} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]


def test_median_by_hand():
    np.testing.assert_array_equal(coordinate_median(UPDATES)["w"], [3.0, -3.0])


def test_median_declares_no_partial_sums_and_no_weights():
    median = CoordinateMedian()
    assert not median.supports_partial_sums and not median.weighted
    assert not hasattr(median, "merge") and not hasattr(median, "partial_sum")
    median.begin_round({"w": np.zeros(2, np.float32)})
    median.accumulate(UPDATES[0], 10**15)  # a huge weight changes nothing
    median.accumulate(UPDATES[1], 1)
    median.accumulate(UPDATES[2], 1)
    np.testing.assert_array_equal(median.aggregate()["w"], [2.0, -2.0])


def test_median_of_float64_values_near_the_limit_is_refused_not_inf():
    huge = [{"w": np.array([1.7e308], np.float64)}, {"w": np.array([1.7e308], np.float64)}]
    with pytest.raises(NonFiniteResult, match="median"):
        coordinate_median(huge)  # (a + b) / 2 overflows in the sum
