"""Bouquet's ``flwr-clientapp``: first on a SuperNode's PATH, so SuperExec starts it for every message.

The node agent installs this file as ``<its scratch folder>/bin/flwr-clientapp`` with a
shebang of its own interpreter run with ``-S`` (``flower.install_program``), so it needs no
site-packages and works however the package was installed.

It hands its argv to the node agent over the agent's Unix socket (BOUQUET_NODE_SOCKET), waits
for the outcome (the agent runs the message in an admitted worker forked from its warm process)
and exits with it. Standard library only: it starts in milliseconds. If the agent cannot be
reached, the message is failed through Flower (services.appmode.refusal) rather than left to
SuperExec's silent relaunch loop; the token goes to it in a memory file, not on a command line.
"""

import json
import os
import socket
import sys

SOCKET_VARIABLE = "BOUQUET_NODE_SOCKET"


def ask_agent(path: str, argv: list) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
        agent.connect(path)
        agent.sendall(json.dumps({"argv": argv}).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = agent.recv(65536)
            if not chunk:
                raise ConnectionError("the node agent closed the connection without an outcome")
            reply += chunk
    return int(json.loads(reply)["exit_code"])


def refuse(argv: list, cause: str) -> None:
    """Replace this process with Flower's runtime failing the message, naming the cause."""
    token, rest, skip = None, [], False
    for index, item in enumerate(argv):
        if skip:
            skip = False
        elif item == "--token" and index + 1 < len(argv):
            token, skip = argv[index + 1], True
        else:
            rest.append(item)
    memory = os.memfd_create("flwr-token", 0)  # inherited across exec, a regular file to flwr
    os.write(memory, (token or "").encode())
    python = os.environ.get("BOUQUET_PYTHON", sys.executable)
    os.environ["BOUQUET_REFUSAL_CAUSE"] = cause
    os.execv(python, [python, "-m", "services.appmode.refusal", *rest, "--token-file", f"/proc/self/fd/{memory}"])


def main() -> int:
    argv = sys.argv[1:]
    path = os.environ.get(SOCKET_VARIABLE)
    try:
        if not path:
            raise ConnectionError(f"{SOCKET_VARIABLE} is not set (this SuperNode was not started by Bouquet's node agent)")
        return ask_agent(path, argv)
    except (OSError, ValueError, KeyError, TypeError) as error:
        cause = f"Bouquet's node agent could not be reached ({type(error).__name__}: {error})"
        print(f"flwr-clientapp (Bouquet): {cause}; failing the message through Flower", file=sys.stderr, flush=True)
        refuse(argv, cause)
        return 1


if __name__ == "__main__":
    sys.exit(main())
