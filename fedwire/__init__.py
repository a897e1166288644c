"""fedwire: the FaceFed Edge wire protocol (topics, messages, chunked tensor transfers, MQTT link).

See PROTOCOL.md for the specification. Depends on numpy, safetensors and paho-mqtt only;
the embedded broker (fedwire.broker) additionally needs amqtt and is not imported here. The MQTT link
(fedwire.mqtt, paho) is imported on first use, so that transport-free users (aggregator/rounds.py) stay so.
"""

from .chunking import (
    CHUNK_HEADER_BYTES,
    DEFAULT_MAX_CHUNK_BYTES,
    CompletedTransfer,
    Reassembler,
    build_transfer,
)
from .codec import decode_tensors, encode_tensors, sha256_hex, tensor_specs
from .errors import ProtocolError, TransferError
from .messages import (
    PROTOCOL_VERSION,
    DeviceStatus,
    RoundAnnouncement,
    RoundSummary,
    TensorSpec,
    TransferManifest,
    UpdateAck,
)
from .topics import DEVICE_ID_RE, ParsedTopic, Topics, validate_device_id

__all__ = [
    "CHUNK_HEADER_BYTES",
    "DEFAULT_MAX_CHUNK_BYTES",
    "DEVICE_ID_RE",
    "PROTOCOL_VERSION",
    "BrokerAddress",
    "CompletedTransfer",
    "DeviceStatus",
    "MqttLink",
    "ParsedTopic",
    "ProtocolError",
    "Reassembler",
    "RoundAnnouncement",
    "RoundSummary",
    "TensorSpec",
    "TlsFiles",
    "Topics",
    "TransferError",
    "TransferManifest",
    "UpdateAck",
    "build_transfer",
    "decode_tensors",
    "encode_tensors",
    "parse_broker_url",
    "sha256_hex",
    "tensor_specs",
    "validate_device_id",
]

_MQTT_NAMES = frozenset({"BrokerAddress", "MqttLink", "TlsFiles", "parse_broker_url"})


def __getattr__(name: str):
    if name in _MQTT_NAMES:
        from . import mqtt

        return getattr(mqtt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
