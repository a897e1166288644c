"""Checks every update must pass before it can touch the global model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from aggregator.strategies.base import NonFiniteResult
from fedwire.messages import PROTOCOL_VERSION, TensorSpec, TransferManifest


class UpdateRejected(Exception):
    """An update that is dropped, with the reason sent back in the ack."""


def check_update_manifest(
    manifest: TransferManifest,
    *,
    kind: str = "update",
    device_id: str,
    current_round: int,
    model_version: int,
    expected: Sequence[TensorSpec],
    max_payload_bytes: int,
) -> None:
    """Reject before any chunk is kept: wrong kind, sender, round, tensors or size."""
    if manifest.protocol != PROTOCOL_VERSION:
        raise UpdateRejected(f"protocol {manifest.protocol} is not {PROTOCOL_VERSION}")
    if manifest.kind != kind:
        raise UpdateRejected(f"kind {manifest.kind!r} where the round collects {kind!r}")
    if manifest.sender != device_id:
        raise UpdateRejected(f"sender {manifest.sender!r} does not match topic device {device_id!r}")
    if manifest.round != current_round:
        raise UpdateRejected(f"stale or future round {manifest.round} (current {current_round})")
    if manifest.model_version != model_version:
        raise UpdateRejected(f"trained from model version {manifest.model_version}, expected {model_version}")
    if manifest.num_samples <= 0:
        raise UpdateRejected("num_samples must be positive")
    if manifest.payload_bytes > max_payload_bytes:
        raise UpdateRejected(f"payload of {manifest.payload_bytes} bytes exceeds {max_payload_bytes}")
    check_specs(manifest.tensors, expected)


def check_specs(actual: Sequence[TensorSpec], expected: Sequence[TensorSpec]) -> None:
    want = {spec.name: spec for spec in expected}
    got = {spec.name: spec for spec in actual}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise UpdateRejected(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, spec in want.items():
        if tuple(got[name].shape) != tuple(spec.shape):
            raise UpdateRejected(f"{name}: shape {list(got[name].shape)} != {list(spec.shape)}")
        if got[name].dtype != spec.dtype:
            raise UpdateRejected(f"{name}: dtype {got[name].dtype} != {spec.dtype}")


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    for name, value in tensors.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise UpdateRejected(f"{name}: contains NaN or Inf")


def check_running_variances(tensors: Mapping[str, np.ndarray]) -> None:
    """BatchNorm variances are never negative in an honest update; one that is would poison the model."""
    for name, value in tensors.items():
        if "running_var" in name and (value < 0).any():
            raise UpdateRejected(f"{name}: negative BatchNorm variance")


def model_problem(tensors: Mapping[str, np.ndarray]) -> str | None:
    """Why a global model must not be signed or published (a NaN or Inf, a negative BatchNorm variance), or None."""
    try:
        check_finite(tensors)
        check_running_variances(tensors)
    except UpdateRejected as exc:
        return str(exc)
    return None


def publishable(compute: Callable[[], Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(tensors, None) from `compute` (an aggregate, a statistics mean), or (None, why) when one of its steps
    overflowed or the result must not be published."""
    try:
        tensors = dict(compute())
    except NonFiniteResult as exc:
        return None, str(exc)
    problem = model_problem(tensors)
    return (None, problem) if problem else (tensors, None)


class UnsafeModel(RuntimeError):
    """A global model the guard before signing refused: nothing was published."""
