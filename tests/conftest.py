"""Broker fixtures: the embedded amqtt broker and throwaway mosquitto brokers on 127.0.0.1
(plain, TLS, and hardened with the fleet PKI and the generated ACL)."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedwire.broker import EmbeddedBroker, free_port

MOSQUITTO = Path("/usr/sbin/mosquitto")
BROKER_START_TIMEOUT_S = 10.0


def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {process.returncode}: {log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{port}: {log_path.read_text()}")


def _stop(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def embedded_broker() -> Iterator[str]:
    with EmbeddedBroker() as broker:
        yield broker.url


def _run_mosquitto(tmp_path: Path, scheme: str, extra_config: str = "") -> Iterator[str]:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip(f"mosquitto is not installed at {MOSQUITTO} (apt-get install mosquitto)")
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    # `user` keeps mosquitto from dropping root privileges to a 'mosquitto' user that may not exist.
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                      f"user {getpass.getuser()}\n{extra_config}")
    log_path = tmp_path / "mosquitto.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([str(MOSQUITTO), "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, log_path)
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        _stop(process)


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


@pytest.fixture
def hardened_broker(tmp_path: Path) -> Iterator[HardenedBroker]:
    """mosquitto run with the config and ACL of `facefed-aggregator broker-config` (TLS, client
    certificates, per-device ACL) on 127.0.0.1, with a fresh PKI that provisioned cam-a and cam-b."""
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip(f"mosquitto is not installed at {MOSQUITTO} (apt-get install mosquitto)")
    from aggregator import pki
    from aggregator.broker_config import write_broker_config

    pki_dir, prefix, port = tmp_path / "pki", "facefed", free_port()
    pki.init_ca(pki_dir)
    pki.issue_server_cert(pki_dir, ["localhost"], ["127.0.0.1"])
    pki.issue_aggregator_identity(pki_dir)
    for device_id in ("cam-a", "cam-b"):
        pki.issue_device_cert(pki_dir, device_id)
    files = write_broker_config(pki_dir, tmp_path / "broker", port=port, topic_prefix=prefix)
    with files.config.open("a") as config:
        # Stay this user: dropping root to 'mosquitto' would leave the 0600 server key unreadable.
        config.write(f"user {getpass.getuser()}\n")
    log_path = tmp_path / "mosquitto.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([str(MOSQUITTO), "-c", str(files.config)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, log_path)
        yield HardenedBroker(f"mqtts://127.0.0.1:{port}", pki_dir, prefix, log_path)
    finally:
        _stop(process)
