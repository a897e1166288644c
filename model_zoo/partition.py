"""Seeded splits of a labelled dataset across federated clients (pure numpy; returns sorted index arrays)."""
from __future__ import annotations

import numpy as np

MAX_DIRICHLET_DRAWS = 1000


def _labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    return labels


def _indices_of(labels: np.ndarray, identities: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(labels, identities))


def split_holdout(labels, num_holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, holdout_idx): num_holdout whole identities are held out, so no client ever trains on them."""
    labels = _labels(labels)
    identities = np.unique(labels)
    if not 0 <= num_holdout < len(identities):
        raise ValueError(f"num_holdout must be in [0, {len(identities)}) for {len(identities)} identities, "
                         f"got {num_holdout}")
    held = np.random.default_rng(seed).choice(identities, size=num_holdout, replace=False)
    holdout_mask = np.isin(labels, held)
    return np.flatnonzero(~holdout_mask), np.flatnonzero(holdout_mask)


def identity_counts(num_identities: int, weights) -> np.ndarray:
    """How many identities each client gets: at least one each, the rest in proportion to weights.

    Largest-remainder rounding of num_identities * w_k / sum(w) after the one-each floor, so the counts
    add up to num_identities exactly; ties go to the earlier client.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"weights must be a non-empty 1-D array of finite values > 0, got {weights}")
    if not len(weights) <= num_identities:
        raise ValueError(f"{num_identities} identities cannot give {len(weights)} clients one identity each")
    spare = num_identities - len(weights)
    quota = spare * weights / weights.sum()
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:spare - counts.sum()]] += 1
    return counts + 1


def partition_by_identity(labels, num_clients: int, seed: int, weights=None) -> list[np.ndarray]:
    """Shuffle identities and deal them into num_clients disjoint groups; all indices used.

    weights=None deals them as evenly as possible; otherwise client k receives identity_counts(...)[k]
    identities, roughly in proportion to weights[k] (unequal client sizes, so n_k matters in FedAvg).
    """
    labels = _labels(labels)
    identities = np.unique(labels)
    if not 1 <= num_clients <= len(identities):
        raise ValueError(f"num_clients must be in [1, {len(identities)}] for {len(identities)} identities, "
                         f"got {num_clients}")
    shuffled = np.random.default_rng(seed).permutation(identities)
    if weights is None:
        return [_indices_of(labels, group) for group in np.array_split(shuffled, num_clients)]
    if len(weights) != num_clients:
        raise ValueError(f"need one weight per client: {num_clients} clients, {len(weights)} weights")
    cuts = np.cumsum(identity_counts(len(identities), weights))[:-1]
    return [_indices_of(labels, group) for group in np.split(shuffled, cuts)]


def skewed_weights(num_clients: int, skew: float) -> np.ndarray:
    """Geometric client weights from 1 up to skew (the largest client's share over the smallest's)."""
    if num_clients < 1 or not skew >= 1:
        raise ValueError(f"need num_clients >= 1 and skew >= 1, got {num_clients} and {skew}")
    return skew ** (np.arange(num_clients) / max(1, num_clients - 1))


def cap_per_identity(labels, max_per_identity: int, seed: int) -> np.ndarray:
    """Sorted indices keeping at most max_per_identity seeded-random samples of each identity."""
    labels = _labels(labels)
    if max_per_identity < 1:
        raise ValueError(f"max_per_identity must be >= 1, got {max_per_identity}")
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(members)[:max_per_identity]
            for members in (np.flatnonzero(labels == identity) for identity in np.unique(labels))]
    return np.sort(np.concatenate(kept))


def _dirichlet_draw(labels: np.ndarray, identities: np.ndarray, num_clients: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for identity in identities:
        members = rng.permutation(np.flatnonzero(labels == identity))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, part in enumerate(np.split(members, cuts)):
            shares[client].append(part)
    return [np.sort(np.concatenate(parts)) for parts in shares]


def partition_dirichlet(labels, num_clients: int, alpha: float, seed: int, min_size: int = 2) -> list[np.ndarray]:
    """Label-skewed split: each identity's samples are divided by proportions drawn from Dir(alpha).

    Small alpha concentrates each identity on few clients. Draws repeat (from the same seeded stream, so
    the result stays reproducible) until every client holds at least min_size samples.
    """
    labels = _labels(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_clients * min_size > len(labels):
        raise ValueError(f"{len(labels)} samples cannot give {num_clients} clients {min_size} samples each")
    rng = np.random.default_rng(seed)
    identities = np.unique(labels)
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(labels, identities, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(f"no Dirichlet split (alpha={alpha}) gave every one of {num_clients} clients {min_size} "
                     f"samples in {MAX_DIRICHLET_DRAWS} draws; raise alpha or lower min_size")
