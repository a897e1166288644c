import numpy as np
import pytest

from aggregator.strategies import FedAvgM, NonFiniteResult

START = {"w": np.array([1.0], np.float32), "bn.running_var": np.array([1.0], np.float32)}
UPDATE = {"w": np.array([0.5], np.float32), "bn.running_var": np.array([3.0], np.float32)}


def test_server_momentum_by_hand():
    m = FedAvgM(server_lr=1.0, momentum=0.5)
    m.begin_round(START)
    m.accumulate(UPDATE, 1)
    first = m.aggregate()  # g = 0.5, v = 0.5: w = 1 - 0.5
    np.testing.assert_allclose(first["w"], [0.5])
    np.testing.assert_allclose(first["bn.running_var"], [3.0])  # statistics are averaged, not stepped
    m.begin_round(first)
    m.accumulate({"w": np.array([0.5], np.float32), "bn.running_var": np.array([3.0], np.float32)}, 1)
    np.testing.assert_allclose(m.aggregate()["w"], [0.25])  # g = 0, v = 0.25: momentum carries on


def test_a_server_step_past_float32_is_refused_and_keeps_the_optimizer_state():
    # Both models are finite float32, but w_global - lr * v lands beyond float32's 3.4e38.
    start = {"w": np.array([3e38], np.float32)}
    m = FedAvgM(server_lr=2.0, momentum=0.0)
    m.begin_round(start)
    m.accumulate({"w": np.array([-3e38], np.float32)}, 1)
    with pytest.raises(NonFiniteResult, match="server step"):
        m.aggregate()
    assert m.slots == {}
