#!/usr/bin/env python3
"""Make a TLS folder for Bouquet (FL_TLS_DIR): a private CA and a server certificate.

    .venv/bin/python scripts/make_certs.py --out certs --name server --name localhost --ip 127.0.0.1

Writes ca.crt, ca.key, server.crt, server.key (keys readable by you only); never overwrites.
The server certificate must name the host the clients dial: `server` inside compose, the
server machine's DNS name or IP for clients on other hosts. Give the folder to the server
(all files but ca.key, which stays with you) and ca.crt to every client.
"""

import argparse
import sys
from pathlib import Path

from services.certs import make_certificates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("certs"), help="folder to write (default: certs)")
    parser.add_argument("--name", action="append", default=None, help="DNS name the clients dial (repeat; default: server, localhost)")
    parser.add_argument("--ip", action="append", default=None, help="IP address the clients dial (repeat; default: 127.0.0.1)")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    options = parser.parse_args(argv)
    names = options.name if options.name is not None else ["server", "localhost"]
    ips = options.ip if options.ip is not None else ["127.0.0.1"]
    try:
        written = make_certificates(options.out, names, ips, options.days)
    except (ValueError, FileExistsError) as problem:
        print(f"make_certs.py: error: {problem}", file=sys.stderr)
        return 2
    print(f"make_certs.py: wrote {', '.join(str(path) for path in written)} (server certificate for {', '.join(names + ips)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
