"""Exceptions raised by the wire layer."""


class ProtocolError(ValueError):
    """A message or topic violates the protocol; `field` names the offending part."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class TransferError(ProtocolError):
    """A chunked transfer is broken (missing, conflicting, corrupt or inconsistent data)."""
