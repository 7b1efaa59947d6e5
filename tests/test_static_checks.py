"""The project's own standards, enforced with the tests: ruff and strict mypy."""

from __future__ import annotations

import subprocess
import sys

from vdsa_server.paths import REPO_ROOT


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=False)


def test_ruff_is_clean() -> None:
    done = run_tool("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean() -> None:
    done = run_tool("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
