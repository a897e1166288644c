"""Client partitions: coverage, disjointness, identity separation and reproducibility."""
import numpy as np
import pytest

from model_zoo.partition import partition_by_identity, partition_dirichlet, split_holdout

LABELS = np.repeat(np.arange(12), [10, 10, 10, 10, 8, 8, 8, 8, 5, 5, 3, 3])


def _assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_split_holdout_keeps_identities_whole():
    train, held = split_holdout(LABELS, num_holdout=3, seed=4)
    _assert_exact_cover([train, held], len(LABELS))
    assert len(np.unique(LABELS[held])) == 3
    assert not set(LABELS[train]) & set(LABELS[held])
    again = split_holdout(LABELS, num_holdout=3, seed=4)
    assert np.array_equal(again[1], held)
    assert len(split_holdout(LABELS, 0, seed=0)[1]) == 0
    with pytest.raises(ValueError):
        split_holdout(LABELS, 12, seed=0)


@pytest.mark.parametrize("num_clients", [1, 5, 12])
def test_partition_by_identity_is_disjoint_and_complete(num_clients):
    parts = partition_by_identity(LABELS, num_clients, seed=7)
    assert len(parts) == num_clients
    _assert_exact_cover(parts, len(LABELS))
    ids = [set(LABELS[p]) for p in parts]
    assert all(ids)  # every client holds at least one identity
    assert sum(len(s) for s in ids) == 12  # no identity shared between clients
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_by_identity(LABELS, num_clients, seed=7)))


def test_partition_by_identity_depends_on_seed_and_rejects_too_many_clients():
    a = partition_by_identity(LABELS, 4, seed=0)
    b = partition_by_identity(LABELS, 4, seed=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="num_clients"):
        partition_by_identity(LABELS, 13, seed=0)


def test_dirichlet_reproducible_complete_and_min_size():
    parts = partition_dirichlet(LABELS, 4, alpha=0.3, seed=11, min_size=5)
    _assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 5
    again = partition_dirichlet(LABELS, 4, alpha=0.3, seed=11, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_dirichlet(LABELS, 4, alpha=0.3, seed=12, min_size=5)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_alpha_controls_label_skew():
    labels = np.repeat(np.arange(20), 20)

    def mean_identities_per_client(alpha):
        return np.mean([len(np.unique(labels[p])) for p in partition_dirichlet(labels, 5, alpha, seed=0)])

    # Small alpha puts most of an identity on one client; large alpha spreads it over all of them.
    assert mean_identities_per_client(0.05) < 10 < mean_identities_per_client(100.0) == 20


def test_dirichlet_rejects_impossible_requests():
    with pytest.raises(ValueError):
        partition_dirichlet(LABELS, 50, alpha=1.0, seed=0, min_size=2)
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(LABELS, 2, alpha=0.0, seed=0)
