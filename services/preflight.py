"""``python -m services.preflight``: check every service's settings before any of them starts.

Compose runs this once, as the ``check`` service that the server, the client replicas and the
memory sidecar wait for (``service_completed_successfully``): a bad value stops ``up`` with the
line naming the setting, instead of an "unhealthy" server, a sidecar left running or replicas
restarting in a loop. Each program's own parser does the checking, so the rules are declared
once (``services.settings``); a program whose compose variable differs from the shared
environment (the client's FL_DEVICE comes from BOUQUET_CLIENT_DEVICE) gets it with ``--set``.
"""

from __future__ import annotations

import argparse
import os
import sys

from services import settings as settings_module
from services.server.__main__ import validate as validate_server

PROGRAMS = {
    "server": (settings_module.SERVER, validate_server),
    "client": (settings_module.CLIENT, None),
    "monitor": (settings_module.MONITOR, None),
}


def overrides(pairs: list[str]) -> dict[str, dict[str, str]]:
    """['client:FL_DEVICE=cuda'] -> {'client': {'FL_DEVICE': 'cuda'}}."""
    out: dict[str, dict[str, str]] = {name: {} for name in PROGRAMS}
    for pair in pairs:
        program, _, assignment = pair.partition(":")
        key, equals, value = assignment.partition("=")
        if program not in PROGRAMS or not equals or not key.startswith("FL_"):
            raise SystemExit(f"services.preflight: error: --set {pair!r}: must be PROGRAM:FL_NAME=VALUE with PROGRAM one of {', '.join(PROGRAMS)}")
        out[program][key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="services.preflight", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="PROGRAM:FL_NAME=VALUE", help="a value one program sees instead of the environment's")
    parser.add_argument("--programs", default=",".join(PROGRAMS), help="which programs to check (default: all)")
    options = parser.parse_args(argv)
    extra = overrides(options.set)
    failed = []
    for program in options.programs.split(","):
        declared, validate = PROGRAMS[program]
        try:
            settings_module.parse(declared, [], environ={**os.environ, **extra[program]}, program=f"services.{program}", validate=validate)
        except SystemExit as bad:  # parse printed the line naming the setting
            if bad.code != 0:
                failed.append(program)
    if failed:
        print(f"services.preflight: bad settings for {', '.join(failed)}; nothing was started. Fix them in .env or your shell.", file=sys.stderr)
        return settings_module.EXIT_BAD_SETTING
    print(f"services.preflight: settings of {options.programs.replace(',', ', ')} are valid", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
