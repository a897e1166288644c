"""Where a fleet PKI directory keeps each file; both the aggregator (which writes them) and the
agent's flash tool (which bundles a device's share) follow this one layout.

    ca.crt  ca.key                      the fleet CA; ca.key never leaves the operator's machine
    broker/server.crt  server.key       the broker's TLS certificate (serverAuth only)
    devices/<id>.crt  <id>.key          one client certificate per device, CN = device id
    aggregator/client.crt  client.key   the aggregator's client certificate, CN = aggregator
    aggregator/signing.key  signing.pub Ed25519 key pair that signs global models
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .mqtt import TlsFiles
from .topics import validate_device_id

AGGREGATOR_IDENTITY = "aggregator"  # the aggregator's certificate CN = its broker username


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class AggregatorIdentity:
    client: CertFiles
    signing_key: Path
    signing_pub: Path


# -- layout -------------------------------------------------------------------------------------


def ca_files(pki_dir: str | Path) -> CertFiles:
    pki = Path(pki_dir)
    return CertFiles(pki / "ca.crt", pki / "ca.key")


def server_files(pki_dir: str | Path) -> CertFiles:
    broker = Path(pki_dir) / "broker"
    return CertFiles(broker / "server.crt", broker / "server.key")


def device_files(pki_dir: str | Path, device_id: str) -> CertFiles:
    devices = Path(pki_dir) / "devices"
    device_id = validate_device_id(device_id)
    return CertFiles(devices / f"{device_id}.crt", devices / f"{device_id}.key")


def aggregator_files(pki_dir: str | Path) -> AggregatorIdentity:
    agg = Path(pki_dir) / "aggregator"
    return AggregatorIdentity(CertFiles(agg / "client.crt", agg / "client.key"),
                              agg / "signing.key", agg / "signing.pub")


def client_tls(pki_dir: str | Path, identity: str) -> TlsFiles:
    """TlsFiles for an mqtts:// MqttLink of a device id or of `aggregator`."""
    files = aggregator_files(pki_dir).client if identity == AGGREGATOR_IDENTITY else device_files(pki_dir, identity)
    return TlsFiles(ca_cert=str(ca_files(pki_dir).cert), certfile=str(files.cert), keyfile=str(files.key))
