"""Make a TLS folder for Bouquet: a private CA and one server certificate signed by it.

Enough for a federation whose operator controls both ends (the clients trust only this CA);
an organisation with its own PKI puts its own files under the same names instead
(services.tls reads ca.crt, server.crt, server.key). Keys are ECDSA P-256, which gRPC accepts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.tls import CA_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE

CA_KEY_FILE = "ca.key"
FILES = (CA_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bouquet"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """KeyUsage with only the named uses (its constructor wants all nine, by position)."""
    uses = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{use: allowed.get(use, False) for use in uses})


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_certificates(out: Path, dns_names: list[str], ip_addresses: list[str], days: int = 365) -> list[Path]:
    """Write ca.crt, ca.key, server.crt and server.key into ``out`` (created); refuse to
    overwrite any of them (a CA that clients already trust must not be replaced by accident).
    The server certificate is valid for every name and address given."""
    if not dns_names and not ip_addresses:
        raise ValueError("the server certificate needs at least one DNS name or IP address")
    addresses = [ipaddress.ip_address(raw) for raw in ip_addresses]  # ValueError names a bad one
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if created:  # the replicas (another uid) read ca.crt in it, whatever the user's umask
        out.chmod(0o755)
    existing = [name for name in FILES if (out / name).exists()]
    if existing:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; choose another folder or remove them first")
    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_until = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = _name("Bouquet federation CA")
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    alternative_names = [x509.DNSName(name) for name in dns_names] + [x509.IPAddress(address) for address in addresses]
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else ip_addresses[0]))
        .issuer_name(ca_subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    contents = {
        CA_FILE: (ca_certificate.public_bytes(serialization.Encoding.PEM), 0o644),
        CA_KEY_FILE: (_pem_key(ca_key), 0o600),
        SERVER_CERT_FILE: (server_certificate.public_bytes(serialization.Encoding.PEM), 0o644),
        SERVER_KEY_FILE: (_pem_key(server_key), 0o600),  # its owner only; in compose the entrypoint hands the server a copy
    }
    written = []
    for name, (data, mode) in contents.items():
        path = out / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(descriptor, mode)  # exactly this mode: open()'s is narrowed by the umask (077: ca.crt unreadable)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        written.append(path)
    return written
