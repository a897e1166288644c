import numpy as np
import pytest

from aggregator.strategies.clipping import clip_update, update_norm


def test_clipping_scales_the_delta_to_the_bound_and_keeps_small_updates():
    ref = {"w": np.array([1.0, 1.0], np.float32), "b": np.array([0.0], np.float32)}
    big = {"w": np.array([4.0, 5.0], np.float32), "b": np.array([0.0], np.float32)}  # delta (3, 4): norm 5
    assert update_norm(big, ref) == pytest.approx(5.0)
    clipped = clip_update(big, ref, 1.0)
    np.testing.assert_allclose(clipped["w"], [1.6, 1.8], rtol=1e-6)  # ref + (3, 4) / 5
    assert update_norm(clipped, ref) == pytest.approx(1.0, rel=1e-6)
    assert clip_update(big, ref, 10.0) is not big and clip_update(big, ref, 10.0)["w"] is big["w"]
