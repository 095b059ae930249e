"""Every relative link in README.md and docs/*.md resolves: the file exists, and a #anchor names a heading in it.

Documents move and headings get renamed; a reader who follows a dead link from the README is lost.
Anchors follow GitHub's rule for heading ids (lower case, punctuation dropped, spaces to hyphens).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(markdown: str) -> str:
    """The text outside code blocks and inline code, where links are links."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def links(markdown: str) -> list[str]:
    """Targets of the markdown links and images in a document's prose."""
    return LINK.findall(prose(markdown))


def anchor(heading: str) -> str:
    """GitHub's id of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading id of a document, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        base = anchor(heading)
        count = seen.get(base, 0)
        ids.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return ids


def broken_links(document: Path) -> list[str]:
    """The relative links of one document that do not resolve, each with the reason."""
    problems = []
    for target in links(document.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto: ... are not checked (no network in tests)
        path_part, _, fragment = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        if not linked.exists():
            problems.append(f"{target}: {path_part} does not exist")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked.read_text()):
            problems.append(f"{target}: no heading #{fragment} in {linked.name}")
    return problems


def test_anchor_follows_githubs_rule():
    assert anchor("Troubleshooting in Slicer") == "troubleshooting-in-slicer"
    assert anchor("Options of `kantumorseg segment`") == "options-of-kantumorseg-segment"
    assert anchor("How good it is") == "how-good-it-is"
    assert anchor("Runs G8-G9: a worker, and reads") == "runs-g8-g9-a-worker-and-reads"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_links_skip_code_and_find_images_and_anchors():
    text = 'See [a](a.md#x) and ![b](fig.png "Fig. 1").\n`[no](c.md)`\n```\n[no](d.md)\n```\n[e](e.md)'
    assert links(text) == ["a.md#x", "fig.png", "e.md"]


def test_a_dead_link_and_a_dead_anchor_are_reported(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n[ok](#title) [gone](missing.md) [bad](#nowhere) [web](https://example.org/x)\n")
    assert broken_links(tmp_path / "a.md") == ["missing.md: missing.md does not exist", "#nowhere: no heading #nowhere in a.md"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(document):
    assert broken_links(document) == []
