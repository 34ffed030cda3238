#!/usr/bin/env python3
"""Let your own ``flwr`` reach app mode's private Control listener: a FLWR_HOME of its own whose
connection "bouquet" names the listener and carries the submit token.

    .venv/bin/python scripts/flwr_connection.py --flwr-home ~/.bouquet-flwr --address 127.0.0.1:9095 \\
        --submit-token-file ./submit-token [--ca certs/ca.crt]
    FLWR_HOME=~/.bouquet-flwr flwr run . bouquet --stream

Writes config.toml and credentials.yaml (mode 0600: it holds the token) into --flwr-home, created
0700; your usual FLWR_HOME is left alone. docs/appmode.md "Your own flwr".
"""

import argparse
import sys
from pathlib import Path

from services import joining
from services.appmode import flower
from services.settings import SettingError


def main() -> int:
    parser = argparse.ArgumentParser(prog="flwr_connection.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flwr-home", required=True, help="folder to write (FLWR_HOME for your flwr)")
    parser.add_argument("--address", required=True, help="the Control listener, HOST:PORT (docker-compose.publish.yml: 127.0.0.1:9095)")
    parser.add_argument("--submit-token-file", required=True, help="a copy of the deployment's submit token")
    parser.add_argument("--ca", help="ca.crt of Bouquet's certificates when the server runs with TLS")
    args = parser.parse_args()
    try:
        token = joining.token_in_file(args.submit_token_file, "--submit-token-file")
    except SettingError as problem:
        parser.error(str(problem))
    if args.ca is not None and not Path(args.ca).is_file():
        parser.error(f"--ca {args.ca!r}: no such file")
    home = Path(args.flwr_home).expanduser()
    flower.write_cli_config(home, args.address, None if args.ca is None else str(Path(args.ca).resolve()), token)
    print(f"FLWR_HOME={home} flwr run <app folder> bouquet --stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
