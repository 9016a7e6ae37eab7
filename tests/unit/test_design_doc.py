"""docs/design.md carries the design the code cites: every `DESIGN §n` resolves to a section.

The code and tests cite the behaviour contract by section number; the document lives in the
repository so that a reader can follow them (issue 10, item 15). These tests fail with the
file and line of a reference that has no section, and when a section or a setting goes missing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmproxy.config import CONFIG_FILE_ENV, SETTINGS

ROOT = Path(__file__).resolve().parents[2]
DESIGN_DOC = ROOT / "docs" / "design.md"
SCANNED = ("llmproxy", "fake_upstream", "tests", "bench")
SKIPPED_DIRS = frozenset({"__pycache__", ".hypothesis", ".mypy_cache", ".ruff_cache"})

_SECTION = r"§\s*\d+(?:\.\d+)*"
# `DESIGN §3`, `DESIGN §3.2 and §4.1`, `DESIGN §3, §4, §5`, `DESIGN.md §13`: every § of the
# list belongs to the design. A § that follows anything else (`RFC 9110 §7.6.1`) does not.
_REFERENCE_LIST = re.compile(
    rf"\bDESIGN(?:\.md)?\s*{_SECTION}(?:(?:\s*[,/&]\s*|\s+and\s+){_SECTION})*"
)
_SECTION_NUMBER = re.compile(r"§\s*(\d+(?:\.\d+)*)")
# `## 13. Connections`, `### 4.2 Streaming`, `### 4.2. Streaming`.
_HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def design_references(text: str) -> list[tuple[int, str]]:
    """(line number, section number) of every design reference in `text`."""
    found: list[tuple[int, str]] = []
    for listing in _REFERENCE_LIST.finditer(text):
        for section in _SECTION_NUMBER.finditer(listing.group()):
            line = text.count("\n", 0, listing.start() + section.start()) + 1
            found.append((line, section.group(1)))
    return found


def design_sections(markdown: str) -> set[str]:
    """The section numbers that headings of the document define."""
    return set(_HEADING.findall(markdown))


def scanned_files() -> list[Path]:
    """Every text file under the scanned directories."""
    files: list[Path] = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts):
                files.append(path)
    return files


def read_design_doc() -> str:
    if not DESIGN_DOC.is_file():
        pytest.fail(f"{DESIGN_DOC.relative_to(ROOT)} is missing: the code cites its sections")
    return DESIGN_DOC.read_text(encoding="utf-8")


# Spelled with a variable, so that scanning this file does not find them as references.
_D = "DESIGN"
EXTRACTION_CASES = [
    (f"({_D} §2), not a usage dump", ["2"]),
    (f"Contract: {_D} §3.2 and §4.1.", ["3.2", "4.1"]),
    (f"the forwarder ({_D} §3, §4, §5).", ["3", "4", "5"]),
    (f"(issue 5, {_D} §3.3, §5)", ["3.3", "5"]),
    (f"{_D}.md §13 (new)", ["13"]),
    (f"{_D} §4.4; issue 4, RFC 9110 §7.6.1", ["4.4"]),
    ("RFC 9110 §5.1 field-name = token; §5.5 field values", []),
    (f"WHATWG HTML §9.2.6 and {_D}\n    §8.4", ["8.4"]),
]


@pytest.mark.parametrize(("text", "sections"), EXTRACTION_CASES)
def test_references_are_found_and_others_ignored(text: str, sections: list[str]) -> None:
    assert [section for _, section in design_references(text)] == sections


def test_headings_define_sections() -> None:
    markdown = "# Title\n\n## 4. Response path\n\n### 4.2 Streaming\n\n### 4.3. Disconnect\n"
    assert design_sections(markdown) == {"4", "4.2", "4.3"}


def test_every_design_reference_resolves_to_a_section() -> None:
    sections = design_sections(read_design_doc())
    references: list[tuple[str, str]] = []
    for path in scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # not text
        where = path.relative_to(ROOT).as_posix()
        references.extend((f"{where}:{line}", section) for line, section in design_references(text))
    assert references, "no DESIGN § reference found: the scan itself is broken"
    unresolved = [
        f"{where}: DESIGN §{section}" for where, section in references if section not in sections
    ]
    assert not unresolved, (
        f"no section of docs/design.md for: {', '.join(unresolved)} "
        f"(its sections: {', '.join(sorted(sections, key=_numeric))})"
    )


def test_the_document_keeps_sections_1_to_13() -> None:
    sections = design_sections(read_design_doc())
    missing = [str(n) for n in range(1, 14) if str(n) not in sections]
    assert not missing, f"docs/design.md lacks section(s) {', '.join(missing)}"


def test_every_setting_is_in_the_settings_table() -> None:
    markdown = read_design_doc()
    names = [CONFIG_FILE_ENV]
    for setting in SETTINGS:
        names.extend(name for name in (setting.env, setting.flag) if name)
    missing = [name for name in names if f"`{name}`" not in markdown]
    assert not missing, f"docs/design.md §2.3 does not list: {', '.join(missing)}"


def _numeric(section: str) -> tuple[int, ...]:
    return tuple(int(part) for part in section.split("."))
