"""Ed25519 signatures on the aggregator's messages (global model manifests, round announcements).

A manifest carries the sha256 of the whole payload and of every chunk, so signing the manifest
signs the model. Devices hold the aggregator's public key and refuse anything unsigned or
altered before loading a byte of it. Keys are PEM files made by `facefed-aggregator ca init`.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ProtocolError

M = TypeVar("M")


class SignatureError(ProtocolError):
    """A message that must be signed is unsigned, or its signature does not verify."""


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_verify_key(path: str | Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def sign(message: M, key: Ed25519PrivateKey) -> M:
    """A copy of the message carrying its signature."""
    signature = key.sign(dataclasses.replace(message, signature="").signing_bytes())
    return dataclasses.replace(message, signature=base64.b64encode(signature).decode("ascii"))


def verify(message, key: Ed25519PublicKey) -> None:
    if not message.signature:
        raise SignatureError("signature", "message is unsigned")
    try:
        key.verify(base64.b64decode(message.signature), message.signing_bytes())
    except InvalidSignature:
        raise SignatureError("signature", "does not verify with the aggregator's key (tampered or forged)") from None
