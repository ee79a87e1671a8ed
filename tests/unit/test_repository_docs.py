"""The documentation lives in the repository (issue 13): no tracked file refers to a path outside
it, and every relative link in README.md and docs/*.md reaches a file the repository tracks (and,
with a `#fragment`, a heading of the markdown file it names, as GitHub makes its anchors)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Paths outside the repository that users of the project do not have. Built from parts so that
# this file does not match itself.
OUTSIDE_PATHS = ("../" + "shared", "/work/" + "shared")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def _tracked_files() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing tells which files the repository tracks")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [name for name in listed.split("\0") if name]


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _outside_fences(markdown: str) -> str:
    """The text outside fenced code blocks."""
    kept, fence = [], ""
    for line in markdown.splitlines():
        opening = FENCE.match(line)
        if fence:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = ""
            continue
        if opening:
            fence = opening.group(1)
            continue
        kept.append(line)
    return "\n".join(kept)


def _prose(markdown: str) -> str:
    """The text outside fenced code blocks, with code spans blanked (a link shown as code is
    not a link)."""
    return CODE_SPAN.sub("code", _outside_fences(markdown))


def _links(markdown: str) -> list[str]:
    prose = _prose(markdown)
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: the heading's text, lower case, without punctuation other than
    `-` and `_`, spaces turned into `-`; a repeated one gets `-1`, `-2`, ..."""
    anchors: set[str] = set()
    for line in _outside_fences(markdown).replace("`", "").splitlines():
        heading = HEADING.match(line)
        if heading is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    offenders = []
    for name in _tracked_files():
        path = ROOT / name
        if path.is_symlink() or not path.is_file():
            continue
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            for outside in OUTSIDE_PATHS:
                if outside.encode() in line:
                    offenders.append(f"{name}:{number}: {line.decode(errors='replace').strip()}")
    assert not offenders, (
        "these lines refer to files outside the repository, which its users do not have; "
        "point them at the repository's own docs/ instead:\n" + "\n".join(offenders)
    )


def test_relative_links_in_readme_and_docs_reach_tracked_files():
    tracked = set(_tracked_files())
    tracked_dirs = {str(Path(name).parent.as_posix()) for name in tracked}
    for name in list(tracked_dirs):
        tracked_dirs.update(p.as_posix() for p in Path(name).parents)
    broken = []
    for document in _documents():
        source = document.relative_to(ROOT).as_posix()
        for target in _links(document.read_text(encoding="utf-8")):
            if not target or SCHEME.match(target):
                continue  # an external link (https:, mailto:) is not the repository's to keep
            path_part, _, fragment = target.partition("#")
            resolved = (document.parent / unquote(path_part)).resolve() if path_part else document
            try:
                relative = resolved.relative_to(ROOT).as_posix()
            except ValueError:
                broken.append(f"{source}: {target} leads outside the repository")
                continue
            if relative not in tracked and relative not in tracked_dirs:
                broken.append(f"{source}: {target} is not a file the repository tracks")
                continue
            heading_named = fragment and relative.endswith(".md") and relative in tracked
            if heading_named and fragment not in _anchors((ROOT / relative).read_text("utf-8")):
                broken.append(f"{source}: {target} names no heading of {relative}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_document_in_docs():
    links = {target.partition("#")[0] for target in _links((ROOT / "README.md").read_text("utf-8"))}
    missing = [
        path.relative_to(ROOT).as_posix()
        for path in sorted((ROOT / "docs").glob("*.md"))
        if path.relative_to(ROOT).as_posix() not in links
    ]
    assert (ROOT / "docs").is_dir() and not missing, f"README.md does not link {missing}"


def test_the_link_reader_skips_code_and_finds_links():
    markdown = (
        "See [billing](docs/billing.md#plans) and `[not](a-link.md)`.\n"
        "```\n[also not](inside-a-fence.md)\n```\n"
        "[ref]: docs/api.md\n"
        "## `/healthz` and `/metrics`\n## Incidents (`per_incident`)\n## Plans\n## Plans\n"
    )
    assert sorted(_links(markdown)) == ["docs/api.md", "docs/billing.md#plans"]
    assert _anchors(markdown) == {
        "healthz-and-metrics",
        "incidents-per_incident",
        "plans",
        "plans-1",
    }
