"""Every relative link in the README and the docs leads somewhere: the file exists, and an anchor
(`page.md#section`, `#section`) names a heading of that page as GitHub renders it.

The README is short and links to docs/ for the rest, so a page moved or a heading renamed
would otherwise leave a newcomer at a dead link. Links inside code blocks and to other sites are
not checked.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import REPO

PAGES = sorted({REPO / "README.md", REPO / "task" / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("examples/*/README.md")})
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> list[str]:
    """The page's lines outside fenced code blocks (indented code is rare here and has no links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text as rendered (code and link markup dropped),
    lower-cased, everything but letters, digits, '_', '-' and spaces removed, spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text()):
        found = HEADING.match(line)
        if not found:
            continue
        slug = _slug(found.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _show(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _broken(page: Path) -> list[str]:
    broken = []
    for line in _prose(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / unquote(path)).resolve() if path else page
            if not dest.exists():
                broken.append(f"{target}: no such file {_show(dest)}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{target}: no heading with anchor #{anchor} in {_show(dest)}")
    return broken


def test_the_pages_are_found():
    names = {str(page.relative_to(REPO)) for page in PAGES}
    assert {"README.md", "docs/settings.md", "docs/containers.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = _broken(page)
    assert not broken, f"{page.relative_to(REPO)} has broken links:\n" + "\n".join(broken)


def test_the_checker_catches_a_broken_link_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Worker slots: admission (and the CPU)\n")
    page.write_text("# Page\n\n[ok](other.md#worker-slots-admission-and-the-cpu) [ok](#page)\n"
                    "[gone](missing.md) [no anchor](other.md#nope) [web](https://example.org/x)\n"
                    "```\n[in code](ignored.md)\n```\n")
    found = _broken(page)
    assert len(found) == 2 and "missing.md" in found[0] and "#nope" in found[1], found
