"""Client partitions: coverage, disjointness, identity separation and reproducibility."""
import numpy as np
import pytest

from model_zoo.partition import (cap_per_identity, identity_counts, partition_by_identity, partition_dirichlet,
                                 skewed_weights, split_holdout)

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


@pytest.mark.parametrize("weights", [[1, 2, 3], [1.0, 1.0, 5.0, 1.0], skewed_weights(5, 3.0)])
def test_weighted_identity_split_is_disjoint_complete_and_unequal(weights):
    parts = partition_by_identity(LABELS, len(weights), seed=3, weights=weights)
    _assert_exact_cover(parts, len(LABELS))
    ids = [set(LABELS[p]) for p in parts]
    assert sum(len(s) for s in ids) == 12 and all(ids)  # disjoint, every client has someone
    counts = identity_counts(12, weights)
    assert [len(s) for s in ids] == counts.tolist() and counts.sum() == 12
    assert counts[int(np.argmax(weights))] == counts.max() > counts.min()  # the heaviest client is the largest
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_by_identity(LABELS, len(weights), 3, weights)))


def test_identity_counts_hand_computed_and_validated():
    assert identity_counts(10, [1, 1]).tolist() == [5, 5]
    assert identity_counts(10, [1, 3]).tolist() == [3, 7]  # 1 each, then 8 split 2 : 6
    assert identity_counts(4, [1, 100, 1, 1]).tolist() == [1, 1, 1, 1]  # the one-each floor wins
    assert skewed_weights(3, 4.0).tolist() == [1.0, 2.0, 4.0] and skewed_weights(1, 4.0).tolist() == [1.0]
    with pytest.raises(ValueError, match="one identity each"):
        identity_counts(2, [1, 1, 1])
    with pytest.raises(ValueError, match="weights"):
        identity_counts(5, [1, 0])
    with pytest.raises(ValueError, match="one weight per client"):
        partition_by_identity(LABELS, 3, seed=0, weights=[1, 2])


def test_cap_per_identity_keeps_at_most_k_of_each_and_is_seeded():
    kept = cap_per_identity(LABELS, 4, seed=1)
    counts = np.bincount(LABELS[kept], minlength=12)
    assert counts.tolist() == [4] * 10 + [3, 3] and np.all(np.diff(kept) > 0)
    assert np.array_equal(kept, cap_per_identity(LABELS, 4, seed=1))
    assert not np.array_equal(kept, cap_per_identity(LABELS, 4, seed=2))
