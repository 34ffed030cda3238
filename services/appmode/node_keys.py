"""SuperNode keys: each replica makes its own at start, the link registers it, the SuperLink refuses any other.

With TLS the SuperLink runs with ``--enable-supernode-auth``: a SuperNode is served only if its
public key was registered through Control (what ``flwr supernode register`` does), and Control
is not on the published port (``front``). A replica makes a fresh ECDSA key (P-384) when it
starts, keeps the private key in its own private folder and puts the public key on the shared
data folder (``<data>/appmode-node-keys/<identity>.pub``), which only the deployment's own
services mount. The link registers the key of each identity it gave a partition, on the
SuperLink's own loopback address (the name in Flower is the identity), drops the key that
identity held before (a restarted replica), and writes ``<identity>.registered`` with the key's
fingerprint; the replica starts its SuperNode once that names its key.

Flower allows SuperNode auth only with TLS: without FL_TLS_DIR it is off, and both sides say so once.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.appmode.front import fingerprint
from services.files import atomic_write

log = logging.getLogger("bouquet.node_keys")

FOLDER = "appmode-node-keys"
OFF = ("SuperNode authentication is off: Flower allows it only over TLS (FL_TLS_DIR unset), so any SuperNode that reaches "
       "the published port may join; Control and Runtime stay off that port (docs/security.md: \"Who may join\")")
WAIT_S = 0.2


def folder(data_dir: str | Path) -> Path:
    return Path(data_dir) / FOLDER


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The form Flower registers and compares (``public_key_to_bytes``): SubjectPublicKeyInfo PEM."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- the replica's side -------------------------------------------------------------------------

def supernode_arguments(tls_dir: str | None, data_dir: str, identity: str, private_dir: Path, patience: float) -> list[str]:
    """The extra ``flower-supernode`` arguments: a new key, registered by the link, or none without TLS.
    Exits 1 when the link has not registered the key within ``patience`` seconds (FL_CONNECT_TIMEOUT)."""
    if tls_dir is None:
        log.warning(OFF)
        return []
    key = ec.generate_private_key(ec.SECP384R1())
    private = private_dir / "supernode-key"
    private.touch(mode=0o600)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = public_pem(key)
    folder(data_dir).mkdir(parents=True, exist_ok=True)
    with atomic_write(folder(data_dir) / f"{identity}.pub", "wb") as out:
        out.write(public)
    wanted, marker = fingerprint(public), folder(data_dir) / f"{identity}.registered"
    deadline = time.monotonic() + patience
    while _read(marker) != wanted:
        if time.monotonic() > deadline:
            log.error("the server did not register this replica's SuperNode key (%s) within %g s (FL_CONNECT_TIMEOUT); does it run app mode with TLS (FL_TLS_DIR)?", wanted, patience)
            raise SystemExit(1)
        time.sleep(WAIT_S)
    log.info("SuperNode key %s registered on the SuperLink", wanted)
    return ["--auth-supernode-private-key", str(private)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


# -- the link's side ----------------------------------------------------------------------------

def control_client(superlink_port: int, ca_file: str):  # -> flwr's ControlHttpClient
    """Flower's own Control client (as ``flwr`` builds it) on the SuperLink's loopback address; the
    chain is checked against Bouquet's CA, the name not (the certificate need not name 127.0.0.1)."""
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    return ControlHttpClient(f"https://127.0.0.1:{superlink_port}", interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")], verify=context)


class Registrar:
    """Registers the keys of the identities ``allowed()`` names, as their replicas put them on the data folder."""

    def __init__(self, data_dir: str, client, allowed: Callable[[], set[str]]) -> None:
        self.folder = folder(data_dir)
        self.client = client
        self.allowed = allowed
        self.registered: dict[str, tuple[str, int]] = {}  # identity -> (key fingerprint, Flower node id)

    def register_new(self) -> None:
        from flwr.proto.control_pb2 import RegisterNodeRequest, UnregisterNodeRequest  # pylint: disable=E0611

        allowed = self.allowed()
        for public_file in sorted(self.folder.glob("*.pub")):
            identity = public_file.name[: -len(".pub")]
            if identity not in allowed:
                continue
            try:
                public = public_file.read_bytes()
            except OSError:
                continue
            name = fingerprint(public)
            held = self.registered.get(identity)
            if held is not None and held[0] == name:
                continue
            try:
                node_id = self.client.RegisterNode(RegisterNodeRequest(public_key=public, name=identity)).node_id
            except Exception as refused:  # a broken key file, the SuperLink going down: said, tried again
                log.warning("could not register the SuperNode key %s of %s: %s", name, identity, refused)
                continue
            if held is not None:
                try:
                    self.client.UnregisterNode(UnregisterNodeRequest(node_id=held[1]))
                except Exception as stale:  # the old node stays registered but its key is gone with its replica
                    log.warning("could not drop %s's previous SuperNode key %s: %s", identity, held[0], stale)
            self.registered[identity] = (name, node_id)
            with atomic_write(self.folder / f"{identity}.registered") as out:
                out.write(name + "\n")
            log.info("registered %s's SuperNode key %s (Flower node %d)", identity, name, node_id)

    def watch(self, stop: threading.Event, every: float = 0.5) -> None:
        while not stop.wait(every):
            self.register_new()
