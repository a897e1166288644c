"""Broker fixtures: the embedded amqtt broker and throwaway mosquitto brokers on 127.0.0.1
(plain, TLS, and hardened with the fleet PKI and the generated ACL)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedwire.broker import MOSQUITTO, EmbeddedBroker, MosquittoBroker, free_port, loopback_config, mosquitto_available


def _require_mosquitto() -> None:
    if not mosquitto_available():
        pytest.skip(f"mosquitto is not installed at {MOSQUITTO} (apt-get install mosquitto)")


@pytest.fixture
def embedded_broker() -> Iterator[str]:
    with EmbeddedBroker() as broker:
        yield broker.url


def _run_mosquitto(tmp_path: Path, scheme: str, extra_config: str = "") -> Iterator[str]:
    _require_mosquitto()
    with MosquittoBroker(tmp_path, loopback_config(free_port(), extra_config), scheme) as broker:
        yield broker.url


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[str]:
    yield from _run_mosquitto(tmp_path, "mqtt")


@pytest.fixture
def mosquitto_acl_broker(tmp_path: Path) -> Iterator[str]:
    """mosquitto where anonymous clients may only use topics under open/."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite open/#\n")
    yield from _run_mosquitto(tmp_path, "mqtt", f"acl_file {acl}\n")


@pytest.fixture
def tls_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def mosquitto_tls_broker(tmp_path: Path, tls_certificate: tuple[Path, Path]) -> Iterator[str]:
    cert, key = tls_certificate
    yield from _run_mosquitto(tmp_path, "mqtts", f"certfile {cert}\nkeyfile {key}\n")


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker_url(request: pytest.FixtureRequest) -> str:
    fixture = {"amqtt": "embedded_broker", "mosquitto": "mosquitto_broker"}[request.param]
    return request.getfixturevalue(fixture)


@dataclass(frozen=True)
class HardenedBroker:
    url: str  # mqtts://127.0.0.1:PORT
    pki: Path  # fleet PKI: CA, broker, aggregator and the devices cam-a and cam-b
    prefix: str
    log: Path
    broker: MosquittoBroker  # the process: reload() after a revocation, kill() / start() to restart it


@pytest.fixture
def hardened_broker(tmp_path: Path) -> Iterator[HardenedBroker]:
    """mosquitto run with the config and ACL of `facefed-aggregator broker-config` (TLS, client
    certificates, per-device ACL) on 127.0.0.1, with a fresh PKI that provisioned cam-a and cam-b."""
    _require_mosquitto()
    from aggregator import pki
    from aggregator.broker_config import write_broker_config

    pki_dir, prefix, port = tmp_path / "pki", "facefed", free_port()
    pki.init_ca(pki_dir)
    pki.issue_server_cert(pki_dir, ["localhost"], ["127.0.0.1"])
    pki.issue_aggregator_identity(pki_dir)
    for device_id in ("cam-a", "cam-b"):
        pki.issue_device_cert(pki_dir, device_id)
    files = write_broker_config(pki_dir, tmp_path / "broker", port=port, topic_prefix=prefix)
    with MosquittoBroker(tmp_path, files.config.read_text(), "mqtts") as broker:
        yield HardenedBroker(broker.url, pki_dir, prefix, broker.log, broker)
