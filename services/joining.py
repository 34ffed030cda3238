"""Who may join a run: a shared secret, proven without sending it.

TLS encrypts the connection but lets anyone who reaches the port in. With a join token set, the
server sends each new connection a fresh random nonce (in the get_properties config it asks
for the identity with) and the client answers HMAC-SHA256(token, nonce + identity); the
token itself never travels, and a proof is good for that one connection and identity only.
Flower-free, so both sides and the tests share it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path

from services.settings import SettingError, secret


def token_of(join_token: str | None, join_token_file: str | None) -> str | None:
    """The token from --join-token or the first line of --join-token-file (not both); a file
    that cannot be read, or holds no usable token, is a bad setting."""
    if join_token is not None and join_token_file is not None:
        raise SettingError("--join-token / FL_JOIN_TOKEN and --join-token-file / FL_JOIN_TOKEN_FILE are both set; give one")
    if join_token_file is None:
        return join_token
    return token_in_file(join_token_file, "--join-token-file / FL_JOIN_TOKEN_FILE")


def token_in_file(file: str, names: str) -> str:
    """The first line of ``file`` (the join token's, app mode's submit token's), checked as a secret;
    a file that cannot be read, or holds no usable token, is a bad setting ``names``."""
    try:
        text = Path(file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as problem:
        raise SettingError(f"{names} = {file!r}: cannot read it ({type(problem).__name__}: {problem.strerror if isinstance(problem, OSError) else problem})") from None
    try:
        return secret(text[0] if text else "")
    except ValueError as allowed:
        raise SettingError(f"{names} = {file!r}: its first line {allowed}") from None


def new_token() -> str:
    """A token for one deployment (the launcher's per run; compose's join-secret service)."""
    return secrets.token_hex(32)


def new_nonce() -> str:
    return secrets.token_hex(16)


def proof(token: str, nonce: str, identity: str) -> str:
    return hmac.new(token.encode(), f"{nonce}\n{identity}".encode(), hashlib.sha256).hexdigest()


def verified(token: str, nonce: str, identity: str, answer: object) -> bool:
    return isinstance(answer, str) and hmac.compare_digest(proof(token, nonce, identity), answer)


def write_token(path: Path) -> bool:
    """Create ``path`` holding a new token unless it exists (True when created). Mode 0440:
    the owner and its group only (compose: root-owned, group bouquet, which the server and every
    replica run with)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o440)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as out:
        out.write(new_token() + "\n")
        out.flush()
        os.fsync(out.fileno())
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m services.joining PATH [GROUP]``: compose's one-shot join-secret service. Makes
    the deployment's token (the join token; app mode's submit token) once (a later `up` keeps it) and, given GROUP, gives the file to it
    (compose: bouquet, which the server and every replica run with); prints whether it made
    one, never the token."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m services.joining PATH [GROUP]", file=sys.stderr)
        return 2
    path, group = Path(args[0]), args[1] if len(args) > 1 else None
    created = write_token(path)
    if group is not None:
        import grp

        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o440)
    print(f"services.joining: token {'created' if created else 'kept'} in {path} (mode {path.stat().st_mode & 0o777:o})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
