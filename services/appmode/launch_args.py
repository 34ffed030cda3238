"""The argv SuperExec gives ``flwr-clientapp``: the parts Bouquet reads, and the token kept out of sight.

SuperExec passes the task's token on the command line (``--token T``); it authorises whoever
holds it to pull that message. Nothing Bouquet writes (records, logs) may carry it: ``redact``
is applied to every argv before it is shown anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_FLAGS = ("--token", "--token-file")


@dataclass(frozen=True)
class RuntimeEndpoint:
    """Where the SuperNode's runtime API is and how to reach it (for heartbeats while waiting)."""

    address: str
    insecure: bool
    root_certificates: str | None
    token: str | None


def _value(argv: list[str], name: str) -> str | None:
    for index, item in enumerate(argv):
        if item == name and index + 1 < len(argv):
            return argv[index + 1]
        if item.startswith(name + "="):
            return item.split("=", 1)[1]
    return None


def endpoint(argv: list[str]) -> RuntimeEndpoint:
    return RuntimeEndpoint(
        address=_value(argv, "--runtime-api-address") or "127.0.0.1:9094",
        insecure="--insecure" in argv,
        root_certificates=_value(argv, "--root-certificates"),
        token=_value(argv, "--token"),
    )


def redact(argv: list[str]) -> list[str]:
    """argv with every token value replaced by '***'."""
    out: list[str] = []
    hide_next = False
    for item in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif item == "--token":
            out.append(item)
            hide_next = True
        elif item.startswith("--token="):
            out.append("--token=***")
        else:
            out.append(item)
    return out


def with_token_file(argv: list[str], token_file: str) -> list[str]:
    """The same launch with the token read from a file (for a process Bouquet starts itself,
    whose command line anyone on the host can read)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--token":
            skip = True
            continue
        if item.startswith("--token="):
            continue
        out.append(item)
    return [*out, "--token-file", token_file]


def without_parent_pid(argv: list[str]) -> list[str]:
    """The launch without SuperExec's ``--parent-pid`` (Flower's runtime exits when that pid is gone)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == "--parent-pid":
            skip = True
        elif not item.startswith("--parent-pid="):
            out.append(item)
    return out
