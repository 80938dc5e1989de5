"""Every relative link of the project's Markdown documents leads somewhere: the file exists and,
when the link names a section (``protocol.md#14-delivery-guarantee``), so does that heading.

Sections get renumbered and renamed; a reader who follows a dead link from the README is lost
on the first page. Anchors are made as GitHub makes them: the heading in lower case, without
punctuation other than ``-`` and ``_``, spaces turned into hyphens."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "protocol.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$")


def anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    found, in_code = set(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := HEADING.match(line)):
            found.add(anchor(m.group(1)))
    return found


def test_anchors_are_made_as_github_makes_them() -> None:
    assert anchor("14. Delivery guarantee") == "14-delivery-guarantee"
    assert anchor("6.1 `welcome`") == "61-welcome"
    assert anchor("One connection for all tabs") == "one-connection-for-all-tabs"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_lead_to_a_file_and_a_section(doc: Path) -> None:
    dead = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto: ... : not ours to check
        path, _, section = target.partition("#")
        linked = (doc.parent / path) if path else doc
        if not linked.exists():
            dead.append(f"{target} (no such file)")
        elif section and linked.suffix == ".md" and section not in anchors(linked):
            dead.append(f"{target} (no such section)")
    assert not dead, f"{doc.name}: {dead}"
