"""The docs name the tests that prove each promise: every name must still exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TEST_REF = re.compile(r"((?:tests/)?[A-Za-z0-9_/]+\.py)::([A-Za-z0-9_]+)")
TEST_FILE = re.compile(r"`(tests/[A-Za-z0-9_/]+\.py)`")


def _test_path(name: str) -> Path:
    return ROOT / name if name.startswith("tests/") else ROOT / "tests" / name


def test_every_test_the_docs_name_exists() -> None:
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for path, function in TEST_REF.findall(text):
            file = _test_path(path)
            if not file.is_file() or not re.search(rf"^\s*(async )?def {function}\(",
                                                    file.read_text(), re.M):
                missing.append(f"{doc.relative_to(ROOT)}: {path}::{function}")
        for path in TEST_FILE.findall(text):
            if not (ROOT / path).is_file():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "docs name tests that do not exist:\n" + "\n".join(missing)


def test_the_reliability_page_names_tests() -> None:
    refs = TEST_REF.findall((ROOT / "docs" / "reliability.md").read_text())
    assert len(refs) >= 20  # one per fault row at least: the page is a map to the tests
