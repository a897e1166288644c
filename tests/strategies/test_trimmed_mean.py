import numpy as np
import pytest

from aggregator.strategies import NonFiniteResult, TrimmedMean, build_strategy
from aggregator.strategies.trimmed_mean import trimmed_mean

UPDATES = [{"w": np.array([v, -v], np.float32)} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]


def test_trimmed_mean_by_hand():
    # K=5, trim 0.2 -> drop 1 at each end per coordinate: mean(2, 3, 4) = 3
    np.testing.assert_array_equal(trimmed_mean(UPDATES, 0.2)["w"], [3.0, -3.0])
    # no trimming is the plain mean: (1+2+3+4+100)/5 = 22
    np.testing.assert_array_equal(trimmed_mean(UPDATES, 0.0)["w"], [22.0, -22.0])
    with pytest.raises(ValueError):
        trimmed_mean(UPDATES, 0.5)


def test_trimmed_mean_is_built_by_name_and_declares_no_partial_sums():
    strategy = build_strategy("trimmed_mean", {}, None, 0.1)
    assert strategy.name == "trimmed_mean" and isinstance(strategy, TrimmedMean)
    assert not strategy.supports_partial_sums and not strategy.weighted


def test_an_overflowing_trimmed_mean_is_refused():
    huge = [{"w": np.array([1.7e308], np.float64)} for _ in range(3)]
    with pytest.raises(NonFiniteResult, match="trimmed mean"):
        trimmed_mean(huge, 0.0)
