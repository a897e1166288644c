import numpy as np
import pytest

from aggregator.strategies import CoordinateMedian, FedAvg, TrimmedMean


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
