"""The fleet PKI: what `ca init` and `provision` write, what they refuse, and that the broker
lets in exactly the certificates of its own fleet."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aggregator import pki
from aggregator.cli import main as aggregator_main
from fedwire import pki_layout
from fedwire.mqtt import MqttLink, TlsFiles
from fedwire.signing import load_signing_key, load_verify_key


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_ca(directory)
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _assert_key_pair(files: pki.CertFiles) -> None:
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == _cert(files.cert).public_key()
    assert _mode(files.key) == 0o600


def _connect(url: str, tls: TlsFiles, protocol: str = "5") -> MqttLink:
    link = MqttLink(url, "probe", lambda topic, payload: None, [], tls=tls, protocol=protocol)
    link.connect(timeout=5)
    return link


# -- files and certificates ---------------------------------------------------------------------


def test_ca_is_a_self_signed_p256_ca_with_a_private_key(pki_dir):
    ca = pki_layout.ca_files(pki_dir)
    cert = _cert(ca.cert)
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    _assert_key_pair(ca)
    assert _mode(pki_dir) == 0o700


def test_init_ca_refuses_to_replace_a_ca(pki_dir):
    ca = pki_layout.ca_files(pki_dir)
    before = ca.cert.read_bytes(), ca.key.read_bytes()
    with pytest.raises(pki.PkiError, match="refusing to replace the fleet CA"):
        pki.init_ca(pki_dir)
    assert (ca.cert.read_bytes(), ca.key.read_bytes()) == before


def test_device_certificate_names_the_device_and_only_allows_client_auth(pki_dir):
    files = pki.issue_device_cert(pki_dir, "cam-01")
    assert files == pki_layout.device_files(pki_dir, "cam-01")
    cert = _cert(files.cert)
    cert.verify_directly_issued_by(_cert(pki_layout.ca_files(pki_dir).cert))
    assert _common_name(cert) == "cam-01"
    assert _usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    _assert_key_pair(files)


@pytest.mark.parametrize("device_id", ["", "a/b", "cam+", "#", "-lead", "x" * 65, "aggregator"])
def test_provision_rejects_bad_device_ids(pki_dir, device_id):
    with pytest.raises(pki.PkiError):
        pki.issue_device_cert(pki_dir, device_id)
    assert not (pki_dir / "devices").exists()


def test_provision_refuses_to_reissue_and_needs_a_ca(pki_dir, tmp_path):
    pki.issue_device_cert(pki_dir, "cam-01")
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.issue_device_cert(pki_dir, "cam-01")
    with pytest.raises(pki.PkiError, match="ca init"):
        pki.issue_device_cert(tmp_path / "no-ca", "cam-01")


def test_server_certificate_covers_its_names_and_only_allows_server_auth(pki_dir):
    files = pki.issue_server_cert(pki_dir, ["broker.lan", "localhost"], ["10.0.0.5", "::1"])
    cert = _cert(files.cert)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["broker.lan", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    assert _usages(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    _assert_key_pair(files)
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.issue_server_cert(pki_dir)
    old_key = files.key.read_bytes()
    pki.issue_server_cert(pki_dir, ["broker2.lan"], [], replace=True)
    assert files.key.read_bytes() != old_key
    _assert_key_pair(files)


@pytest.mark.parametrize("hostnames, ips, message", [
    (["bad host"], [], "not a DNS hostname"),
    (["*.lan"], [], "not a DNS hostname"),
    ([], ["10.0.0.256"], "not an IP address"),
    ([], [], "at least one"),
])
def test_server_certificate_rejects_bad_names(pki_dir, hostnames, ips, message):
    with pytest.raises(pki.PkiError, match=message):
        pki.issue_server_cert(pki_dir, hostnames, ips)


def test_aggregator_identity_has_a_client_cert_and_an_ed25519_signing_key(pki_dir):
    identity = pki.issue_aggregator_identity(pki_dir)
    assert _common_name(_cert(identity.client.cert)) == pki.AGGREGATOR_IDENTITY
    assert _usages(_cert(identity.client.cert)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _assert_key_pair(identity.client)
    assert _mode(identity.signing_key) == 0o600
    signing, verifying = load_signing_key(identity.signing_key), load_verify_key(identity.signing_pub)
    verifying.verify(signing.sign(b"manifest"), b"manifest")  # raises if the files are not one pair
    with pytest.raises(pki.PkiError, match="model-signing key"):
        pki.issue_aggregator_identity(pki_dir)


def test_cli_builds_a_pki_and_a_broker_config(tmp_path, capsys):
    directory, broker = tmp_path / "pki", tmp_path / "broker"
    assert aggregator_main(["ca", "init", "--dir", str(directory), "--broker-host", "broker.lan"]) == 0
    assert aggregator_main(["provision", "cam-01", "--dir", str(directory)]) == 0
    assert aggregator_main(["broker-config", "--pki", str(directory), "--out", str(broker), "--port", "9883"]) == 0
    out = capsys.readouterr().out
    for path in (pki_layout.ca_files(directory).cert, pki_layout.device_files(directory, "cam-01").key, broker / "acl"):
        assert f"wrote {path}" in out and path.is_file()
    assert (pki_layout.aggregator_files(directory).signing_pub).is_file()
    assert "listener 9883 127.0.0.1" in (broker / "mosquitto.conf").read_text()
    assert _mode(broker / "server.key") == 0o600 and not (broker / "ca.key").exists()

    assert aggregator_main(["ca", "init", "--dir", str(directory)]) == 1
    assert aggregator_main(["provision", "cam-01", "--dir", str(directory)]) == 1
    assert aggregator_main(["provision", "no/slash", "--dir", str(directory)]) == 1
    assert aggregator_main(["broker-config", "--pki", str(directory), "--out", str(broker),
                            "--topic-prefix", "a/#"]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace the fleet CA" in err and "already exists" in err
    assert "not a device id" in err and "prefix" in err


# -- who the broker lets in ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_provisioned_device_and_aggregator_connect(hardened_broker, protocol):
    for identity in ("cam-a", pki.AGGREGATOR_IDENTITY):
        link = _connect(hardened_broker.url, pki_layout.client_tls(hardened_broker.pki, identity), protocol)
        assert link.connected
        link.close()


def test_client_without_certificate_cannot_connect(hardened_broker):
    with pytest.raises(ConnectionError):
        _connect(hardened_broker.url, TlsFiles(ca_cert=str(pki_layout.ca_files(hardened_broker.pki).cert)))


def test_certificate_from_another_ca_cannot_connect(hardened_broker, tmp_path):
    other = tmp_path / "other-pki"
    pki.init_ca(other)
    pki.issue_device_cert(other, "cam-a")  # same name, wrong issuer
    files = pki_layout.device_files(other, "cam-a")
    tls = TlsFiles(ca_cert=str(pki_layout.ca_files(hardened_broker.pki).cert), certfile=str(files.cert),
                   keyfile=str(files.key))
    with pytest.raises(ConnectionError):
        _connect(hardened_broker.url, tls)


def test_broker_certificate_cannot_log_in_as_a_client(hardened_broker):
    # It is signed by the fleet CA, but its extended key usage is serverAuth only.
    server = pki.server_files(hardened_broker.pki)
    tls = TlsFiles(ca_cert=str(pki_layout.ca_files(hardened_broker.pki).cert), certfile=str(server.cert),
                   keyfile=str(server.key))
    with pytest.raises(ConnectionError):
        _connect(hardened_broker.url, tls)


def test_device_refuses_a_broker_outside_its_fleet(hardened_broker, tmp_path):
    other = tmp_path / "other-pki"
    pki.init_ca(other)
    device = pki_layout.device_files(hardened_broker.pki, "cam-a")
    tls = TlsFiles(ca_cert=str(pki_layout.ca_files(other).cert), certfile=str(device.cert), keyfile=str(device.key))
    with pytest.raises(ConnectionError, match="certificate verify failed"):
        _connect(hardened_broker.url, tls)
