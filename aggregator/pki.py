"""The fleet PKI: a CA, the broker's server certificate, per-device client certificates and the
aggregator's identity (client certificate + Ed25519 model-signing key).

Everything cryptographic is done by `cryptography`; this module only picks the parameters and the
file layout. Keys are EC P-256 (ECDSA): every TLS stack a device may carry (OpenSSL 1.1+, mbedTLS,
Android) speaks it, which Ed25519 certificates cannot promise. Private keys are written 0600 with
O_EXCL, so an existing key is never silently replaced.

The file layout is fedwire/pki_layout.py's, shared with the agent's flash tool (see docs/operators.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedwire.errors import ProtocolError
from fedwire.pki_layout import (
    AGGREGATOR_IDENTITY, AggregatorIdentity, CertFiles, aggregator_files, ca_files, device_files,
    server_files,
)
from fedwire.topics import validate_device_id

CA_DAYS = 3650
# OpenSSL (mosquitto) refuses every client once a CRL is past its next update, so it is valid as long as the CA.
CRL_DAYS = CA_DAYS
LEAF_DAYS = 825  # the longest validity Apple/browsers accept for server certificates; devices use the same
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # devices with a slightly slow clock still accept new certs
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")  # RFC 1123 names, no wildcards


class PkiError(Exception):
    """A PKI operation that cannot be done as asked; the message says why and what to do."""


# -- operations ---------------------------------------------------------------------------------


def init_ca(pki_dir: str | Path, common_name: str = "FaceFed fleet CA", days: int = CA_DAYS) -> CertFiles:
    """Create the fleet CA in pki_dir; refuses if a CA is already there."""
    files = ca_files(pki_dir)
    for path in (files.cert, files.key):
        if path.exists():
            raise PkiError(f"{path} already exists: refusing to replace the fleet CA "
                           "(every device certificate chains to it)")
    _make_private_dir(Path(pki_dir))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _validity(x509.CertificateBuilder(), days)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        # pathlen 0: the CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())
    _write_private_key(files.key, key)
    _write_cert(files.cert, cert)
    return files


def issue_server_cert(pki_dir: str | Path, hostnames: Sequence[str] = ("localhost",),
                      ips: Sequence[str] = ("127.0.0.1",), days: int = LEAF_DAYS, replace: bool = False) -> CertFiles:
    """The broker's certificate: valid for the given DNS names and IP addresses, serverAuth only
    (so it cannot be used to log in to the broker as a client).

    `replace` re-issues it, e.g. when the broker moves to another host."""
    if isinstance(hostnames, str) or isinstance(ips, str):
        raise TypeError("hostnames and ips are lists of strings")
    if not hostnames and not ips:
        raise PkiError("the broker certificate needs at least one hostname or IP address")
    names: list[x509.GeneralName] = [x509.DNSName(check_hostname(h)) for h in hostnames]
    names += [x509.IPAddress(check_ip(ip)) for ip in ips]
    common_name = (list(hostnames) + list(ips))[0]
    return _issue_leaf(pki_dir, server_files(pki_dir), common_name, ExtendedKeyUsageOID.SERVER_AUTH, days,
                       x509.SubjectAlternativeName(names), replace=replace)


def issue_device_cert(pki_dir: str | Path, device_id: str, days: int = LEAF_DAYS) -> CertFiles:
    """A device's client certificate, CN = device id (the broker uses it as the username)."""
    _checked_device_id(device_id)
    if device_id == AGGREGATOR_IDENTITY:
        raise PkiError(f"{device_id!r} is the aggregator's identity, not a device id")
    return _issue_leaf(pki_dir, device_files(pki_dir, device_id), device_id, ExtendedKeyUsageOID.CLIENT_AUTH, days)


def _checked_device_id(device_id: str) -> str:
    try:
        return validate_device_id(device_id)
    except ProtocolError as exc:
        raise PkiError(exc.reason) from None


def issue_aggregator_identity(pki_dir: str | Path, days: int = LEAF_DAYS) -> AggregatorIdentity:
    """The aggregator's client certificate (CN = aggregator) and its Ed25519 model-signing key pair."""
    identity = aggregator_files(pki_dir)
    for path in (identity.signing_key, identity.signing_pub):
        if path.exists():
            raise PkiError(f"{path} already exists: refusing to replace the model-signing key "
                           "(devices trust models signed by it)")
    _issue_leaf(pki_dir, identity.client, AGGREGATOR_IDENTITY, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    signing_key = ed25519.Ed25519PrivateKey.generate()
    _write_private_key(identity.signing_key, signing_key)
    public_pem = signing_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(identity.signing_pub, public_pem, 0o644)
    return identity


def crl_file(pki_dir: str | Path) -> Path:
    """The fleet's certificate revocation list (PEM, signed by the CA); mosquitto's `crlfile`."""
    return Path(pki_dir) / "crl.pem"


def revoked_file(pki_dir: str | Path) -> Path:
    """The revoked device ids, one per line: the aggregator's `revoked_devices` (a CRL names serials only)."""
    return Path(pki_dir) / "revoked.txt"


def ensure_crl(pki_dir: str | Path) -> Path:
    """The CRL, created empty (with an empty revoked list) if the fleet has none yet."""
    path = crl_file(pki_dir)
    if not path.exists():
        _write_crl(pki_dir, [])
    if not revoked_file(pki_dir).exists():
        write_replacing(revoked_file(pki_dir), _REVOKED_HEADER.encode(), 0o644)
    return path


def revoke_device(pki_dir: str | Path, device_id: str) -> list[Path]:
    """Add the device's certificate to the CRL and its id to the revoked list; returns the files written.
    Revoking twice changes nothing."""
    files = device_files(pki_dir, _checked_device_id(device_id))
    if not files.cert.is_file():
        raise PkiError(f"no certificate for {device_id!r} in {Path(pki_dir) / 'devices'}: nothing to revoke")
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    entries = list(_load_crl(pki_dir)) if crl_file(pki_dir).exists() else []
    if all(entry.serial_number != cert.serial_number for entry in entries):
        entries.append(x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                       .revocation_date(datetime.datetime.now(datetime.timezone.utc)).build())
    _write_crl(pki_dir, entries)
    revoked = load_revoked(revoked_file(pki_dir)) if revoked_file(pki_dir).exists() else frozenset()
    lines = [_REVOKED_HEADER.rstrip("\n"), *sorted(revoked | {device_id})]
    write_replacing(revoked_file(pki_dir), ("\n".join(lines) + "\n").encode(), 0o644)
    return [crl_file(pki_dir), revoked_file(pki_dir)]


def load_revoked(path: str | Path) -> frozenset[str]:
    """The device ids in a revoked list (blank lines and # comments ignored)."""
    ids = set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.add(validate_device_id(text))
        except ProtocolError as exc:
            raise PkiError(f"{path}:{number}: {exc.reason}") from None
    return frozenset(ids)


def check_hostname(hostname: str) -> str:
    if not _HOSTNAME.fullmatch(hostname):
        raise PkiError(f"{hostname!r} is not a DNS hostname")
    return hostname


def check_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        raise PkiError(f"{ip!r} is not an IP address") from None


# -- helpers ------------------------------------------------------------------------------------

_REVOKED_HEADER = "# Revoked FaceFed devices, one id per line (written by facefed-aggregator revoke).\n"


def _load_crl(pki_dir: str | Path) -> x509.CertificateRevocationList:
    ca_cert, _ = _load_ca(pki_dir)
    crl = x509.load_pem_x509_crl(crl_file(pki_dir).read_bytes())
    if not crl.is_signature_valid(ca_cert.public_key()):
        raise PkiError(f"{crl_file(pki_dir)} is not signed by the fleet CA {ca_files(pki_dir).cert}")
    return crl


def _write_crl(pki_dir: str | Path, entries: Sequence[x509.RevokedCertificate]) -> None:
    ca_cert, ca_key = _load_ca(pki_dir)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - _CLOCK_SKEW).next_update(now + datetime.timedelta(days=CRL_DAYS)))
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    write_replacing(crl_file(pki_dir), crl.public_bytes(serialization.Encoding.PEM), 0o644)


def write_replacing(path: Path, data: bytes, mode: int) -> None:
    """Replace path atomically, created with its final mode (a key is never readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _issue_leaf(pki_dir: str | Path, files: CertFiles, common_name: str, usage: x509.ObjectIdentifier, days: int,
                san: x509.SubjectAlternativeName | None = None, replace: bool = False) -> CertFiles:
    ca_cert, ca_key = _load_ca(pki_dir)
    for path in (files.cert, files.key):
        if path.exists() and not replace:
            raise PkiError(f"{path} already exists: refusing to re-issue {common_name!r} "
                           "(delete its .crt and .key first; the old certificate stays valid until it expires)")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _validity(x509.CertificateBuilder(), days)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    files.cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if replace:
        files.cert.unlink(missing_ok=True)
        files.key.unlink(missing_ok=True)
    _write_private_key(files.key, key)
    _write_cert(files.cert, cert)
    return files


def _load_ca(pki_dir: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    files = ca_files(pki_dir)
    if not (files.cert.is_file() and files.key.is_file()):
        raise PkiError(f"no fleet CA in {pki_dir}: run `facefed-aggregator ca init --dir {pki_dir}` first")
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PkiError(f"{files.key} is not the private key of {files.cert}")
    return cert, key


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    if days < 1:
        raise PkiError(f"validity must be at least 1 day, got {days}")
    now = datetime.datetime.now(datetime.timezone.utc)
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days)))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    # Leaves sign TLS handshakes (ECDHE-ECDSA); the CA signs certificates and CRLs.
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _make_private_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
    elif not path.is_dir():
        raise PkiError(f"{path} exists and is not a directory")


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> None:
    # Unencrypted PKCS#8: mosquitto and the agents load keys unattended; file mode 0600 protects them.
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_new(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_new(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create path with mode from the start (no window where a key is world-readable); never overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PkiError(f"{path} already exists: refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it; make the mode exact
