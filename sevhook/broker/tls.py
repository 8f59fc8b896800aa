"""The broker's own TLS: a private CA and a server certificate it signs, made with cryptography
(EC P-256), so an owner needs no openssl recipe. Hosts pin the CA (`ca-file` in their
sevhook.toml or metadata); `broker serve` uses the server pair by default when it exists."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sevhook.errors import UsageError
from sevhook.files import write_private_file

TLS_DIR = "tls"
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime TLS clients commonly accept for a server certificate


@dataclass(frozen=True)
class TlsFiles:
    """Where `init --tls` puts the CA and the server pair inside a broker data directory."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    def complete(self) -> bool:
        return self.server_cert.is_file() and self.server_key.is_file()


def tls_files(data_dir: Path) -> TlsFiles:
    return TlsFiles(data_dir / TLS_DIR)


def default_names() -> list[str]:
    """What a server certificate names when no --san is given: this machine and loopback."""
    return list(dict.fromkeys([socket.getfqdn(), socket.gethostname(), "localhost", "127.0.0.1", "::1"]))


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    label_ok = all(part and len(part) <= 63 and part.replace("-", "").isalnum() for part in name.split("."))
    if not name or len(name) > 253 or not label_ok:
        raise UsageError(f"--san {name!r}: give a DNS name (e.g. kbs.example.org) or an IP address")
    return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def check_names(names: list[str]) -> list[x509.GeneralName]:
    """The subject alternative names for `names`; a malformed one is a usage error naming it."""
    general = [_general_name(name) for name in dict.fromkeys(names)]
    if not general:
        raise UsageError("--san: give at least one name for the server certificate")
    return general


def make_tls(data_dir: Path, names: list[str]) -> tuple[TlsFiles, bool]:
    """Create DATA_DIR/tls with a CA (key 0600) and a server certificate for `names` (key 0600);
    the files and whether they were made now. Existing files are never overwritten: a CA hosts
    already pin must not change under them."""
    files = tls_files(data_dir)
    general = check_names(names)
    present = [path.exists() for path in (files.ca_cert, files.ca_key, files.server_cert, files.server_key)]
    if all(present):
        return files, False
    if any(present):
        raise UsageError(f"{files.directory}: some TLS files are missing ({CA_CERT}, {CA_KEY}, {SERVER_CERT}, "
                         f"{SERVER_KEY}); restore them from backup, or remove the directory to start over "
                         "(every host then needs the new CA)")
    try:
        files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{files.directory}: cannot create it ({exc.strerror})") from exc
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sevhook broker CA {now:%Y-%m-%d}")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    server_cert = (
        x509.CertificateBuilder().subject_name(server_name).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
    write_private_file(files.ca_key, _pem_key(ca_key))
    write_private_file(files.server_key, _pem_key(server_key))
    write_private_file(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    write_private_file(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return files, True
