import numpy as np
import pytest

from aggregator.robust import clip_update, coordinate_median, trimmed_mean, update_norm
from aggregator.strategy import CoordinateMedian, FedAvg, TrimmedMean, build_strategy


def test_clipping_scales_the_delta_to_the_bound_and_keeps_small_updates():
    ref = {"w": np.array([1.0, 1.0], np.float32), "b": np.array([0.0], np.float32)}
    big = {"w": np.array([4.0, 5.0], np.float32), "b": np.array([0.0], np.float32)}  # delta (3, 4): norm 5
    assert update_norm(big, ref) == pytest.approx(5.0)
    clipped = clip_update(big, ref, 1.0)
    np.testing.assert_allclose(clipped["w"], [1.6, 1.8], rtol=1e-6)  # ref + (3, 4) / 5
    assert update_norm(clipped, ref) == pytest.approx(1.0, rel=1e-6)
    assert clip_update(big, ref, 10.0) is not big and clip_update(big, ref, 10.0)["w"] is big["w"]


def test_median_and_trimmed_mean_by_hand():
    updates = [{"w": np.array([v, -v], np.float32)} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    np.testing.assert_array_equal(coordinate_median(updates)["w"], [3.0, -3.0])
    # K=5, trim 0.2 -> drop 1 at each end per coordinate: mean(2, 3, 4) = 3
    np.testing.assert_array_equal(trimmed_mean(updates, 0.2)["w"], [3.0, -3.0])
    # no trimming is the plain mean: (1+2+3+4+100)/5 = 22
    np.testing.assert_array_equal(trimmed_mean(updates, 0.0)["w"], [22.0, -22.0])
    with pytest.raises(ValueError):
        trimmed_mean(updates, 0.5)


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
def test_robust_rules_resist_one_poisoned_client_of_five_where_fedavg_does_not(attack):
    rng = np.random.default_rng(0)
    global_model = {"w": rng.standard_normal(1000).astype(np.float32)}
    direction = rng.standard_normal(1000).astype(np.float32) * 0.01
    honest = [{"w": global_model["w"] + direction + rng.standard_normal(1000).astype(np.float32) * 0.001}
              for _ in range(4)]
    bad_delta = direction * (100.0 if attack == "scaled" else -100.0)
    poisoned = {"w": global_model["w"] + bad_delta}
    clean_target = global_model["w"] + direction

    def run(strategy):
        strategy.begin_round(global_model)
        for update in [*honest, poisoned]:
            strategy.accumulate(update, 100)
        return np.linalg.norm(strategy.aggregate()["w"] - clean_target)

    honest_spread = np.linalg.norm(direction) * 0.1
    assert run(FedAvg()) > 10 * np.linalg.norm(direction)  # plain FedAvg is dragged far off
    assert run(CoordinateMedian()) < honest_spread
    assert run(TrimmedMean(trim_fraction=0.2)) < honest_spread
    assert run(FedAvg(clip_norm=float(np.linalg.norm(direction)) * 1.1)) < 0.5 * np.linalg.norm(direction)


def test_fedavg_without_options_stays_exact():
    updates = [({"w": np.array([1.0, 3.0], np.float32)}, 1), ({"w": np.array([3.0, 1.0], np.float32)}, 3)]
    strategy = build_strategy("fedavg", {}, None, 0.2)
    strategy.begin_round({"w": np.zeros(2, np.float32)})
    for tensors, n in updates:
        strategy.accumulate(tensors, n)
    np.testing.assert_array_equal(strategy.aggregate()["w"], [2.5, 1.5])
    assert build_strategy("trimmed_mean", {}, None, 0.1).name == "trimmed_mean"


def test_server_momentum_and_adam_by_hand():
    from aggregator.strategy import FedAdam, FedAvgM

    start = {"w": np.array([1.0], np.float32), "bn.running_var": np.array([1.0], np.float32)}
    update = {"w": np.array([0.5], np.float32), "bn.running_var": np.array([3.0], np.float32)}
    m = FedAvgM(server_lr=1.0, momentum=0.5)
    m.begin_round(start)
    m.accumulate(update, 1)
    first = m.aggregate()  # g = 0.5, v = 0.5: w = 1 - 0.5
    np.testing.assert_allclose(first["w"], [0.5])
    np.testing.assert_allclose(first["bn.running_var"], [3.0])  # statistics are averaged, not stepped
    m.begin_round(first)
    m.accumulate({"w": np.array([0.5], np.float32), "bn.running_var": np.array([3.0], np.float32)}, 1)
    np.testing.assert_allclose(m.aggregate()["w"], [0.25])  # g = 0, v = 0.25: momentum carries on

    adam = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    adam.begin_round(start)
    adam.accumulate(update, 1)
    # m = 0.1 * 0.5, v = 0.01 * 0.25: step = 0.05 / (0.05 + 1e-3)
    np.testing.assert_allclose(adam.aggregate()["w"], [1.0 - 0.1 * 0.05 / 0.051], rtol=1e-6)
