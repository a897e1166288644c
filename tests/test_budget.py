"""aggregator/budget.py: what one device may send in a round (pure, no broker)."""

from aggregator.budget import BudgetLimits, DeviceBudget, sender
from fedwire.chunking import CHUNK_MAGIC


def _chunk(transfer: int, size: int = 100) -> bytes:
    return CHUNK_MAGIC + transfer.to_bytes(16, "big") + bytes(size)


def test_derived_limits_leave_room_for_the_honest_uploads():
    limits = BudgetLimits.derive(update_bytes=4_084_224, chunk_bytes=16_384, transfers=4)
    assert limits == BudgetLimits(messages=1068, bytes=17_413_472, transfers=4)
    assert BudgetLimits.derive(1000, 1024, 2, messages=7, max_bytes=5000) == BudgetLimits(7, 5000, 2)


def test_a_device_over_any_limit_is_dropped_for_the_rest_of_the_round_and_counted_once():
    budget = DeviceBudget(BudgetLimits(messages=3, bytes=10_000, transfers=1))
    assert all(budget.admit("a", _chunk(1)).admitted for _ in range(3))
    over = budget.admit("a", _chunk(1))
    assert not over.admitted and over.first_drop and "3 messages" in over.reason
    later = budget.admit("a", b"{}")
    assert not later.admitted and not later.first_drop
    assert budget.admit("b", _chunk(1)).admitted  # another device has its own budget
    assert "1 update transfers" in budget.admit("b", _chunk(2)).reason
    assert budget.new_round()["a"] == (over.reason, 2)
    assert budget.admit("a", _chunk(1)).admitted  # a new round, a new budget


def test_bytes_and_transfers_are_limits_too():
    budget = DeviceBudget(BudgetLimits(messages=100, bytes=1000, transfers=2))
    assert budget.admit("big", bytes(900)).admitted
    assert "1000 bytes" in budget.admit("big", bytes(200)).reason
    assert budget.admit("many", _chunk(1)).admitted and budget.admit("many", _chunk(2)).admitted
    assert "2 update transfers" in budget.admit("many", _chunk(3)).reason


def test_revoked_devices_are_always_dropped():
    budget = DeviceBudget(BudgetLimits(100, 10_000, 4), revoked=["cam-b"])
    first = budget.admit("cam-b", b"x")
    assert not first.admitted and first.first_drop and "revoked" in first.reason
    budget.set_revoked([])
    assert budget.admit("cam-b", b"x").admitted


def test_sender_reads_the_device_of_update_and_status_topics_only():
    assert sender("fleet/eu", "fleet/eu/update/cam-1/chunk/3") == "cam-1"
    assert sender("fleet/eu", "fleet/eu/status/cam-1") == "cam-1"
    assert sender("fleet/eu", "fleet/eu/round") is None
    assert sender("fleet/eu", "fleet/euro/update/cam-1/manifest") is None
