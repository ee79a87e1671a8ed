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


# A path into the package, as the docs name it: `meterd/services/funding.py`, `meterd/core/usage/`.
# Not one inside another path (`/etc/meterd/secrets`, `/opt/meterd/bin/meterd`).
PACKAGE_PATH = re.compile(r"(?<![\w/.~$-])meterd/[\w./*-]*")
# A name in the README's layout tree: a module (`funding.py`) or a package (`usage/`).
TREE_NAME = re.compile(r"(?<![\w/.-])[a-z_][a-z0-9_]*(?:\.py|/)(?![\w/])")
LAYOUT_HEADING = "## Layout"


def _package_paths(markdown: str) -> set[str]:
    """Every `meterd/...` path the text names, code blocks and code spans included (that is
    where the docs name modules), without a sentence's closing punctuation."""
    return {match.rstrip(".") for match in PACKAGE_PATH.findall(markdown)}


def _exists(path: str) -> bool:
    if any(c in path for c in "*?["):
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def _layout_tree(readme: str) -> list[str]:
    """The lines of the first fenced block under the README's layout heading."""
    lines = readme.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(LAYOUT_HEADING))
    opening = next(n for n in range(start, len(lines)) if FENCE.match(lines[n]))
    closing = next(n for n in range(opening + 1, len(lines)) if FENCE.match(lines[n]))
    return lines[opening + 1 : closing]


def _tree_paths(tree: list[str]) -> list[str]:
    """The paths the layout tree names. Its first line is `meterd/`; a line indented two spaces
    starting with `name/` opens that package, and it and the lines indented deeper under it
    name that package's modules; a line indented two spaces starting with a module names
    top-level modules."""
    assert tree and tree[0] == "meterd/", "the layout tree starts with meterd/"
    paths, directory = [], "meterd"
    for line in tree[1:]:
        stripped = line.lstrip()
        names = TREE_NAME.findall(line)
        if len(line) - len(stripped) == 2:
            first = stripped.split()[0]
            directory = "meterd"
            if first.endswith("/"):
                directory = f"meterd/{first.rstrip('/')}"
                paths.append(f"{directory}/")
                names = names[1:]
        paths.extend(f"{directory}/{name}" for name in names)
    return paths


def test_every_package_path_in_readme_and_docs_exists():
    """README.md and docs/*.md name modules by path (docs/architecture.md draws a webhook's path
    through them): a module moved or renamed must take its docs with it."""
    missing = [
        f"{document.relative_to(ROOT).as_posix()}: {path}"
        for document in _documents()
        for path in sorted(_package_paths(document.read_text(encoding="utf-8")))
        if not _exists(path)
    ]
    assert "meterd/services/funding.py" in _package_paths(
        (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    )
    assert not missing, "these paths name nothing in the repository:\n" + "\n".join(missing)


def test_readme_layout_names_what_exists_and_every_top_level_module():
    named = _tree_paths(_layout_tree((ROOT / "README.md").read_text(encoding="utf-8")))
    missing = [path for path in named if not _exists(path)]
    assert not missing, f"README.md's layout names what does not exist: {missing}"
    top_level = {
        f"meterd/{path.name}/" if path.is_dir() else f"meterd/{path.name}"
        for path in (ROOT / "meterd").iterdir()
        if (path.is_dir() and (path / "__init__.py").exists())
        or (path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py"))
    }
    unnamed = sorted(top_level - set(named))
    assert not unnamed, f"README.md's layout does not name {unnamed}"


def test_the_tree_reader_resolves_names_under_their_package():
    tree = [
        "meterd/",
        "  core/      pure: money.py  usage/ (rows and files)",
        "             timeline.py (see /etc/meterd/x and meterd run)",
        "  web/       app.py; ops.py (healthz)",
        "  cli.py  config.py",
    ]
    assert _tree_paths(tree) == [
        "meterd/core/",
        "meterd/core/money.py",
        "meterd/core/usage/",
        "meterd/core/timeline.py",
        "meterd/web/",
        "meterd/web/app.py",
        "meterd/web/ops.py",
        "meterd/cli.py",
        "meterd/config.py",
    ]
    assert _package_paths("see `meterd/web/app.py`. Not /etc/meterd/secrets.") == {
        "meterd/web/app.py"
    }
