import numpy as np
import pytest

from aggregator.strategies import FedAvg, WeightedSum, build_strategy
from aggregator.strategies.fedavg import fedavg


def _updates(rng, sizes, shapes):
    return [({name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}, n)
            for n in sizes]


def test_fedavg_equals_the_weighted_mean_formula():
    rng = np.random.default_rng(0)
    shapes = {"conv.weight": (8, 3, 3, 3), "bn.running_var": (8,), "fc.bias": (5,)}
    updates = _updates(rng, [3, 11, 40, 1], shapes)
    total = sum(n for _, n in updates)
    result = fedavg(updates)
    for name in shapes:
        expected = sum(np.float64(n) / total * t[name].astype(np.float64) for t, n in updates)
        assert result[name].dtype == np.float32
        np.testing.assert_array_equal(result[name], expected.astype(np.float32))


def test_fedavg_of_hand_computed_values():
    # (1*[0, 4] + 3*[4, 0]) / 4 = [3, 1]
    result = fedavg([({"w": np.array([0.0, 4.0], np.float32)}, 1), ({"w": np.array([4.0, 0.0], np.float32)}, 3)])
    np.testing.assert_array_equal(result["w"], np.array([3.0, 1.0], np.float32))


def test_streaming_order_and_partial_sums_do_not_change_the_result():
    rng = np.random.default_rng(1)
    updates = _updates(rng, [5, 7, 2, 9, 4], {"w": (64,)})
    forward = fedavg(updates)
    backward = fedavg(reversed(updates))
    left, right = WeightedSum(), WeightedSum()
    for tensors, n in updates[:2]:
        left.add(tensors, n)
    for tensors, n in updates[2:]:
        right.add(tensors, n)
    left.merge(right)
    np.testing.assert_allclose(backward["w"], forward["w"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(left.mean()["w"], forward["w"], rtol=0, atol=1e-7)
    assert left.count == 5 and left.total_weight == 27


def test_mismatched_names_and_bad_weights_are_refused():
    acc = WeightedSum()
    acc.add({"a": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="names"):
        acc.add({"b": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="positive"):
        acc.add({"a": np.zeros(2, np.float32)}, 0)
    with pytest.raises(ValueError, match="no updates"):
        WeightedSum().mean()


def test_strategy_restarts_its_sum_each_round():
    strategy = FedAvg(train={"lr": 0.1})
    assert strategy.configure_round(1) == {"lr": 0.1}
    strategy.begin_round({})
    strategy.accumulate({"w": np.ones(3, np.float32)}, 2)
    assert strategy.num_updates == 1
    np.testing.assert_array_equal(strategy.aggregate()["w"], np.ones(3, np.float32))
    strategy.begin_round({})
    assert strategy.num_updates == 0


def test_fedavg_without_options_stays_exact():
    updates = [({"w": np.array([1.0, 3.0], np.float32)}, 1), ({"w": np.array([3.0, 1.0], np.float32)}, 3)]
    strategy = build_strategy("fedavg", {}, None, 0.2)
    strategy.begin_round({"w": np.zeros(2, np.float32)})
    for tensors, n in updates:
        strategy.accumulate(tensors, n)
    np.testing.assert_array_equal(strategy.aggregate()["w"], [2.5, 1.5])
    assert build_strategy("trimmed_mean", {}, None, 0.1).name == "trimmed_mean"
