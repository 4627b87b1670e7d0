"""The project stands on its own (issue 16, item 11): what code and docs cite lives in the repository.

Every "docs/<page>.md §N" citation names a section heading of that page, every Markdown link and every
mentioned `.md` file exists in the repository, and nothing cites the old out-of-repository design page.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"runs", "build", "dist", "node_modules", "__pycache__"}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg"}
CITATION = re.compile(r"([\w/.-]+\.md)\)? §(\d+)(?:\s*[-–]\s*(\d+))?")
MENTIONED_MD = re.compile(r"(?<![\w/.-])([\w.-]+/[\w/.-]*\.md)\b")  # a path: at least one folder
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _text_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") or part in SKIP_DIRS or part.endswith(".egg-info")
                              for part in p.relative_to(ROOT).parts[:-1]))


def _resolve(name: str, cited_from: Path) -> Path | None:
    for base in (cited_from.parent, ROOT, ROOT / "docs"):
        if (base / name).is_file():
            return base / name
    return None


def _sections(page: Path) -> set[int]:
    return {int(m.group(1)) for m in re.finditer(r"^## (\d+)\.", page.read_text(), re.MULTILINE)}


FILES = _text_files()


def test_the_scan_sees_the_code_and_the_docs():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"README.md", "docs/design.md", "docs/algorithm.md", "dendrite_convert/core/layers.py"} <= names
    assert _sections(ROOT / "docs/design.md") == set(range(1, 10))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_citations_and_links_resolve_inside_the_repository(path):
    text = path.read_text(errors="replace")
    if path.name != "test_docs.py":  # this file names what it looks for
        assert "DESIGN §" not in text and "reference/pai_algorithm" not in text, "cites a page outside the repository"
    for match in CITATION.finditer(text):
        page = _resolve(match.group(1), path)
        assert page is not None, f"{match.group(0)!r}: {match.group(1)} is not in the repository"
        first, last = int(match.group(2)), int(match.group(3) or match.group(2))
        missing = set(range(first, last + 1)) - _sections(page)
        assert not missing, f"{match.group(0)!r}: {page.relative_to(ROOT)} has no section {sorted(missing)}"
    if path.suffix == ".md":
        for target in LINK.findall(text):
            if not re.match(r"[a-z]+:", target):  # http(s), mailto: not files
                assert (path.parent / target).exists(), f"link to {target} does not resolve"
    if path.name != "test_docs.py":
        for name in MENTIONED_MD.findall(text):
            assert _resolve(name, path) is not None, f"mentions {name}, which is not in the repository"
