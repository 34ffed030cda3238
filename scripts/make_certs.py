#!/usr/bin/env python3
"""Make a TLS folder for Bouquet (FL_TLS_DIR): a private CA and a server certificate.

    .venv/bin/python scripts/make_certs.py --out certs --name server --name localhost --ip 127.0.0.1

Writes ca.crt, ca.key, server.crt, server.key (keys readable by you only); never overwrites.
The server certificate must name the host the clients dial: `server` inside compose, the
server machine's DNS name or IP for clients on other hosts. Give the folder to the server
(all files but ca.key, which stays with you) and ca.crt to every client.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from services import settings
from services.certs import make_certificates
from services.settings import CommandLineOnly, identifier, ip_address, path, positive_int, repeated, setting


@dataclass(frozen=True, kw_only=True)
class MakeCertsSettings(CommandLineOnly):
    out: str = setting(path, "certs", "folder to write")
    name: list[str] = repeated(identifier, ["server", "localhost"], "DNS name the clients dial (repeat for several)")
    ip: list[str] = repeated(ip_address, ["127.0.0.1"], "IP address the clients dial (repeat for several)")
    days: int = setting(positive_int, 365, "validity in days")


def main(argv: list[str] | None = None) -> int:
    options = settings.parse(MakeCertsSettings, argv, program="make_certs.py", description=__doc__)
    try:
        written = make_certificates(Path(options.out), options.name, options.ip, options.days)
    except (ValueError, FileExistsError) as problem:
        print(f"make_certs.py: error: {problem}", file=sys.stderr)
        return settings.EXIT_BAD_SETTING
    print(f"make_certs.py: wrote {', '.join(str(path) for path in written)} (server certificate for {', '.join(options.name + options.ip)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
