"""The one way tests run the ``vidq`` command line in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def vidq_command(*, script: bool = False) -> list[str]:
    """``python -m vidq.cli``, or with ``script`` the installed ``vidq`` console script
    beside this Python (what a user types), where it is installed."""
    if script:
        beside = Path(sys.executable).with_name("vidq")
        if beside.exists():
            return [str(beside)]
    return [sys.executable, "-m", "vidq.cli"]


def vidq_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (this process's environment by default) with this checkout first on
    PYTHONPATH, so that a subprocess run from any directory imports this vidq."""
    environ = dict(os.environ if env is None else env)
    paths = [str(REPO), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return environ


def run_vidq(
    *args: str,
    env: Mapping[str, str] | None = None,
    check: bool = False,
    timeout: float = 120,
    cwd: Path | str | None = None,
    script: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``vidq ARGS`` and return what it printed (text) and its exit status.

    ``env`` is the whole environment (default: this process's); ``check`` fails the
    test with vidq's stderr when the exit status is not 0; ``script`` runs the
    installed console script rather than ``python -m vidq.cli``."""
    proc = subprocess.run(
        [*vidq_command(script=script), *args], env=vidq_environment(env), cwd=cwd,
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vidq {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc
