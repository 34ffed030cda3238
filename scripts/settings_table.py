#!/usr/bin/env python3
"""Print the settings table of docs/settings.md from the declarations in services/settings.py."""

from __future__ import annotations

from services import settings

GROUPS = [
    ("server (`python -m services.server`)", settings.SERVER),
    ("client (`python -m services.client`)", settings.CLIENT),
    ("monitor (`python -m services.monitor`)", settings.MONITOR),
    ("link (`python -m services.appmode.link`, the server with FL_MODE=app)", settings.LINK),
    ("node (`python -m services.appmode.node`, a client with FL_MODE=app)", settings.NODE),
    ("submit (`python -m services.appmode.submit`)", settings.SUBMIT),
]


def main() -> None:
    print("| flag | environment variable | default | used by | meaning |")
    print("| --- | --- | --- | --- | --- |")
    rows: dict[str, list] = {}
    for group, table in GROUPS:
        for setting in table:
            row = rows.setdefault(setting.env, [setting, []])
            row[1].append(group.split(" ")[0])
    for setting, users in rows.values():
        default = "(unset)" if setting.default is None else f"`{setting.default}`"
        print(f"| `{setting.flag}` | `{setting.env}` | {default} | {', '.join(users)} | {setting.help.replace('|', '/')} |")


if __name__ == "__main__":
    main()
