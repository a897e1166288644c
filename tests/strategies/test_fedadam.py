import numpy as np

from aggregator.strategies import FedAdam

START = {"w": np.array([1.0], np.float32), "bn.running_var": np.array([1.0], np.float32)}
UPDATE = {"w": np.array([0.5], np.float32), "bn.running_var": np.array([3.0], np.float32)}


def test_adam_by_hand():
    adam = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    adam.begin_round(START)
    adam.accumulate(UPDATE, 1)
    # m = 0.1 * 0.5, v = 0.01 * 0.25: step = 0.05 / (0.05 + 1e-3)
    np.testing.assert_allclose(adam.aggregate()["w"], [1.0 - 0.1 * 0.05 / 0.051], rtol=1e-6)
    assert set(adam.slots) == {"m.w", "v.w"}  # statistics have no optimizer state
