"""Self-signed certificates, bcrypt hashes and web-config files for the exporter's TLS tests (issue 15).

Shared by the host-side test (tests/monitoring/test_exporter_tls.py) and the deploy tests: made with
cryptography and bcrypt in the operator's venv, never with fixed keys checked into the tree.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PASSWORD = "correct horse"


def self_signed(d: Path, ips: Sequence[str] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A certificate for `ips` (IP SANs) and its key, valid for a day: exporter.crt and exporter.key in d."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sockops-exporter test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = d / "exporter.crt", d / "exporter.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def bcrypt_hash(password: str = PASSWORD) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()  # low cost: tests only


def web_config_file(d: Path, ips: Sequence[str] = ("127.0.0.1",), user: str = "prometheus") -> Path:
    """d/web.yml with TLS (a fresh self-signed certificate for `ips`) and `user` with PASSWORD."""
    self_signed(d, ips)
    path = d / "web.yml"
    # relative cert paths: exporter-toolkit resolves them against the config file's directory
    path.write_text(
        "# as node_exporter reads it\n"
        "tls_server_config:\n"
        "  cert_file: exporter.crt\n"
        "  key_file: exporter.key\n"
        "basic_auth_users:\n"
        f"  {user}: '{bcrypt_hash()}'\n"
    )
    return path
