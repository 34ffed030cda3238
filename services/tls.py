"""TLS for Flower's gRPC connection: the files a server and a client need, checked before
anything starts, and a handshake probe that names a TLS mismatch instead of retrying it.

A TLS folder (``--tls-dir`` / ``FL_TLS_DIR``) holds ``ca.crt`` (the authority both sides
trust), and on the server ``server.crt`` + ``server.key`` (signed by that authority, naming
the host the clients dial). ``scripts/make_certs.py`` makes such a folder (services.certs).
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from services.net import split_address
from services.settings import SettingError

CA_FILE = "ca.crt"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
LABEL = "--tls-dir / FL_TLS_DIR"
# Set by bouquet-entrypoint when it handed the stepped-down server a private copy of the TLS
# folder (docker/entrypoint.sh says why): errors then name the folder the user mounted too.
SOURCE_ENV = "BOUQUET_TLS_SOURCE"


def _shown(tls_dir: str) -> str:
    """The folder as a user should read it in an error: the value, and what it is a copy of."""
    source = os.environ.get(SOURCE_ENV)
    return f"{tls_dir!r} (a private copy of {source!r})" if source else repr(tls_dir)


@dataclass(frozen=True)
class ServerFiles:
    ca: bytes
    certificate: bytes
    private_key: bytes

    def for_flower(self) -> tuple[bytes, bytes, bytes]:
        """``start_server(certificates=...)`` takes (CA, certificate, key) as PEM bytes."""
        return self.ca, self.certificate, self.private_key


def _read(tls_dir: str, name: str) -> bytes:
    path = Path(tls_dir) / name
    if not Path(tls_dir).is_dir():
        raise SettingError(f"{LABEL} = {_shown(tls_dir)}: no such folder")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SettingError(f"{LABEL} = {_shown(tls_dir)}: {name} is missing (scripts/make_certs.py makes it)") from None
    except OSError as error:
        raise SettingError(f"{LABEL} = {_shown(tls_dir)}: cannot read {name} as uid {os.getuid()} ({error.strerror})") from None


def _certificate(tls_dir: str, name: str) -> tuple[bytes, x509.Certificate]:
    data = _read(tls_dir, name)
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise SettingError(f"{LABEL} = {_shown(tls_dir)}: {name} is not a PEM certificate") from None
    if certificate.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        raise SettingError(f"{LABEL} = {_shown(tls_dir)}: {name} expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    return data, certificate


def client_ca(tls_dir: str) -> bytes:
    """The CA a client trusts, checked; SettingError naming the problem otherwise."""
    return _certificate(tls_dir, CA_FILE)[0]


def server_files(tls_dir: str) -> ServerFiles:
    """The server's three files, checked against each other: the key belongs to the
    certificate, and the certificate is signed by the CA its clients trust."""
    ca, ca_certificate = _certificate(tls_dir, CA_FILE)
    certificate, server_certificate = _certificate(tls_dir, SERVER_CERT_FILE)
    key = _read(tls_dir, SERVER_KEY_FILE)
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise SettingError(f"{LABEL} = {_shown(tls_dir)}: {SERVER_KEY_FILE} is not an unencrypted PEM private key") from None
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if private_key.public_key().public_bytes(*public) != server_certificate.public_key().public_bytes(*public):
        raise SettingError(f"{LABEL} = {_shown(tls_dir)}: {SERVER_KEY_FILE} is not the key of {SERVER_CERT_FILE}")
    try:
        server_certificate.verify_directly_issued_by(ca_certificate)
    except (InvalidSignature, ValueError, TypeError) as error:  # InvalidSignature has no message
        raise SettingError(f"{LABEL} = {_shown(tls_dir)}: {SERVER_CERT_FILE} is not signed by {CA_FILE} ({type(error).__name__})") from None
    return ServerFiles(ca, certificate, key)


def mismatch(address: str, ca: bytes | None, timeout: float = 5.0) -> str | None:
    """Why this client cannot talk to the server at ``address`` (a sentence saying TLS is the
    problem), or None when the client's TLS choice matches the server's.

    One TLS handshake, as gRPC would start it: a TLS client (``ca`` given) needs the server to
    answer with a certificate the CA signed for the host it dials; a plaintext client (``ca``
    None) must find a server that does not answer TLS at all. gRPC itself would retry either
    mismatch until its timeout and then report an unrelated-looking UNAVAILABLE."""
    host, port = split_address(address)
    if ca is not None:
        context = ssl.create_default_context(cadata=ca.decode("ascii", "replace"))
    else:  # only asking whether the server speaks TLS at all
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None  # not reachable (any more): the caller's wait for the server handles that
    try:
        with raw, context.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as error:
        return (
            f"TLS: the server at {address} presented a certificate that {LABEL}/{CA_FILE} does not accept "
            f"({error.verify_message}); use the CA that signed the server's certificate, for a name the client dials"
        )
    except (ssl.SSLError, ConnectionError, socket.timeout, OSError) as error:
        if ca is not None:
            return (
                f"TLS: the server at {address} did not answer a TLS handshake ({type(error).__name__}: {error}); "
                f"it runs without TLS: give it the same {LABEL}, or unset it on this client"
            )
        return None
    if ca is None:
        return f"TLS: the server at {address} requires TLS and this client has no {LABEL}: set it to a folder holding the server's {CA_FILE}"
    return None
