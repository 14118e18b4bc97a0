"""docs/reference/settings.md is generated from the Settings docstrings: it must be current."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from vidq.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "reference" / "settings.md"
GENERATOR = REPO / "scripts" / "settings_doc.py"


def generated() -> str:
    return subprocess.run([sys.executable, str(GENERATOR)], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def test_settings_reference_is_current() -> None:
    assert PAGE.read_text() == generated(), (
        "docs/reference/settings.md is stale: run "
        "`python scripts/settings_doc.py > docs/reference/settings.md`")


def test_settings_reference_lists_every_setting_once() -> None:
    rows = [line for line in generated().splitlines() if line.startswith("| `VIDQ_")]
    names = [row.split("`")[1] for row in rows]
    assert names == [f"VIDQ_{f.name.upper()}" for f in dataclasses.fields(Settings)]
